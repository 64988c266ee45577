"""Command-line arguments that several commands share: which model to load, and how to decode.

`captioner caption`, `info`, `caption-folder` and `evaluate` read them; one flag per `DecodeConfig`
field, with the help and bounds its field describes, so a decoding option added there is a flag of
every command at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from .decode_config import DecodeConfig, option_kind, option_range
from .runtime.precision import PRECISIONS


def add_model_arguments(parser: argparse.ArgumentParser, *, precision: bool = True) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="model checkpoint, .pt or an ONNX export (default: the model bundled with the package)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    if precision:
        parser.add_argument("--precision", choices=PRECISIONS, default=os.environ.get("CAPTIONER_PRECISION", "auto"),
                            help="encoder path: auto picks the fastest that this CPU runs natively and whose "
                                 "quality was measured to hold (`captioner info` says which and why; default: "
                                 "$CAPTIONER_PRECISION, else auto)")


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `DecodeConfig` field, with its Hugging Face name: --num-beams, --top-p, ..."""
    group = parser.add_argument_group("decoding")
    for field in dataclasses.fields(DecodeConfig):
        flag = "--" + field.name.replace("_", "-")
        kind, bounds = option_kind(field), option_range(field)
        default = field.default
        default = str(default).lower() if isinstance(default, bool) else "none" if default in (None, ()) else default
        # argparse reads % as a format; the help says what the value means, its bounds and default
        help = field.metadata["help"].replace("%", "%%") + f" ({bounds + '; ' if bounds else ''}default: {default})"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif kind is tuple:
            group.add_argument(flag, metavar="WORD[,WORD]", default=None, help=help)
        else:
            group.add_argument(flag, type=kind, default=None, help=help)


def decode_options(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding flags the user gave; the others keep `DecodeConfig`'s defaults."""
    options = {}
    for field in dataclasses.fields(DecodeConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            options[field.name] = value
    return options
