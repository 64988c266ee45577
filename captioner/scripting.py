"""TorchScript for the few functions inference calls many times per caption with small tensors.

There, each operation called from Python costs a few microseconds of argument conversion more
than its arithmetic (an int8 product of 3 rows: 13 us from Python, 6.5 us inside a script, whose
prepacked-weight argument needs no conversion), and a decoder step is about 30 of them. The
TorchScript interpreter calls the same CPU kernels, so results are the same bit for bit (tested).
TorchScript is deprecated upstream but still ships with torch; where it is missing or cannot
compile a function (no source files, a future torch, PYTORCH_JIT=0), the function runs as plain
Python, with the same results, slower."""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Callable, TypeVar

import torch

Fn = TypeVar("Fn", bound=Callable)
log = logging.getLogger(__name__)
_compiled: dict[Callable, Callable] = {}
_lock = threading.Lock()  # one compile per function, and catch_warnings is not thread-safe


def scripted(fn: Fn) -> Fn:
    """`fn` compiled by TorchScript (once per process), else `fn` itself."""
    found = _compiled.get(fn)
    if found is not None:
        return found
    with _lock:
        if fn not in _compiled:
            _compiled[fn] = _compile(fn)
        return _compiled[fn]


def _compile(fn: Fn) -> Fn:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
            return torch.jit.script(fn)
    except Exception as error:  # noqa: BLE001 - any failure leaves the plain function, which is correct
        log.warning("TorchScript cannot compile %s, which runs as Python, slower (%s)", fn.__name__, error)
        return fn
