"""`captioner` command line: every entry point in one place.

    captioner caption IMG... [--num-beams 3 --num-return-sequences 3 --json]
    captioner info [CHECKPOINT]
    captioner caption-folder DIR -o OUT ...     (captioner/batch/command.py)
    captioner train / evaluate ...              (training/cli.py)
    captioner serve ...                         (service/cli.py)

This module is the composition root: it is the one place in `captioner/` that names `training`
and `service`, and it imports their command modules only to register their arguments (those
modules import their heavy dependencies inside the command itself). The arguments that several
commands share are in `captioner/arguments.py`, so no command module imports this one.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import import_module

from .arguments import add_decode_arguments, add_model_arguments, decode_options
from .decoding import DecodeConfig
from .runtime.cpu import keep_freed_memory

COMMAND_MODULES = ("captioner.batch.command", "training.cli", "service.cli")


def load_model(args: argparse.Namespace):
    from .api import Captioner

    precision = getattr(args, "precision", "auto")
    if args.checkpoint:
        return Captioner.from_checkpoint(args.checkpoint, device=args.device, precision=precision)
    return Captioner.default(device=args.device, precision=precision)


def _caption(args: argparse.Namespace) -> int:
    from .images import ImageError

    options = decode_options(args)
    DecodeConfig.from_kwargs(**options)  # report bad options before loading the model
    model = load_model(args)
    failed = 0
    for path in args.images:
        try:
            result = model.caption(path, **options)
        except (ImageError, OSError) as error:
            failed += 1
            print(f"error: {error}", file=sys.stderr)
            continue
        if args.json:
            # a caption-folder record: the path, then the result's one JSON shape
            print(json.dumps({"path": path, **result.to_dict(attention=bool(options.get("return_attention")))}))
            continue
        if len(result.sequences) == 1:
            print(f"{path}\t{result.text}")
        else:
            print(path)
            for rank, seq in enumerate(result.sequences, 1):
                print(f"  {rank}. {seq.text}  (score {seq.score:.3f}, log-prob {seq.log_prob:.2f})")
        if result.required and not args.quiet_required:
            print("  required: " + "; ".join(_why(r) for r in result.required), file=sys.stderr)
    return 1 if failed else 0


def _why(requirement) -> str:
    if requirement.source == "tag":
        seen = f", seen as {requirement.classes[0]}" if requirement.classes else ""
        return f"{requirement.word!r} (tagger, confidence {requirement.confidence:.2f}{seen})"
    return f"{requirement.word!r} (requested)"


def _info(args: argparse.Namespace) -> int:
    from .api import DEFAULT_CHECKPOINT, Captioner

    path = args.path or args.checkpoint or DEFAULT_CHECKPOINT
    description = Captioner.from_checkpoint(path, device=args.device, precision=args.precision).describe()
    description["path"] = str(path)
    if args.json:
        print(json.dumps(description, indent=2, default=str))
    else:
        provenance = description.pop("provenance", {}) or {}
        inference = description.pop("inference")
        for key, value in description.items():
            print(f"{key:18} {value}")
        cpu = inference["cpu"]
        print(f"{'inference':18} {inference['precision']} on {inference['runtime']} "
              f"(asked: {inference['requested']}): {inference['reason']}")
        print(f"{'cpu':18} {cpu['name']}; PyTorch {cpu['torch_capability']}; "
              f"{', '.join(cpu['flags']) or 'no AVX2/AVX-512/AMX flags'}")
        metrics = provenance.get("metrics") or {}
        if metrics:
            print("metrics            " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
        if provenance.get("saved"):
            print(f"{'trained':18} {provenance.get('saved')} ({provenance.get('train_images')} images, "
                  f"{provenance.get('epochs_completed')} epochs)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description="Image captioning: caption, serve, train.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    caption = commands.add_parser("caption", help="caption image files")
    caption.add_argument("images", nargs="+", metavar="IMAGE")
    caption.add_argument("--json", action="store_true", help="one JSON object per image")
    caption.add_argument("--quiet-required", action="store_true",
                         help="do not list the required words and why on stderr")
    add_model_arguments(caption)
    add_decode_arguments(caption)
    caption.set_defaults(func=_caption)

    info = commands.add_parser("info", help="describe a checkpoint")
    info.add_argument("path", nargs="?", metavar="CHECKPOINT")
    info.add_argument("--json", action="store_true")
    add_model_arguments(info)
    info.set_defaults(func=_info)

    for name in COMMAND_MODULES:
        import_module(name).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    bad = [e for e in extra if not e.startswith("--") or "=" not in e]
    if bad:
        parser.error(f"overrides must look like --section.key=value: {' '.join(bad)}")
    args.overrides = extra
    keep_freed_memory()  # large tensors reuse freed pages instead of faulting fresh ones in per batch
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"captioner {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
