"""TorchScript for the few functions inference calls many times per caption with small tensors.

There, each operation called from Python costs a few microseconds of argument conversion more
than its arithmetic (an int8 product of 3 rows: 13 us from Python, 6.5 us inside a script, whose
prepacked-weight argument needs no conversion), and a decoder step is about 30 of them. The
TorchScript interpreter calls the same kernels, so results are the same bit for bit. TorchScript
is deprecated upstream but still ships with torch; where it is missing or cannot compile a
function (no source files, a future torch), the function runs as plain Python."""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Callable, TypeVar

import torch

Fn = TypeVar("Fn", bound=Callable)
log = logging.getLogger(__name__)


@functools.cache
def scripted(fn: Fn) -> Fn:
    """`fn` compiled by TorchScript (once per process), else `fn` itself."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice, once per function
            return torch.jit.script(fn)
    except Exception as error:  # noqa: BLE001 - any failure leaves the plain function, which is correct
        log.info("TorchScript unavailable for %s (%s): running it as Python", fn.__name__, error)
        return fn
