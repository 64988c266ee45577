"""`captioner train`, `evaluate`, `export` and `cells`."""

from __future__ import annotations

import argparse
import json


def register(commands) -> None:
    train = commands.add_parser(
        "train", help="train or fine-tune a model (YAML config + --section.key=value overrides)",
        description="captioner train --config training/configs/flickr8k.yaml --optim.lr=5e-4 [--resume]. "
                    "Multi-GPU / multi-node: torchrun --nproc_per_node=N -m training.train --config ...",
    )
    train.add_argument("--config", help="YAML config file")
    train.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    train.add_argument("--backbone", help="encoder backbone (same as --model.encoder.backbone=NAME)")
    train.add_argument("--encoder-weights", metavar="PATH",
                       help="local backbone weights file, for offline machines (--model.encoder.weights_path)")
    train.set_defaults(func=_train, accepts_overrides=True)

    evaluate = commands.add_parser("evaluate", help="score a checkpoint on a data split")
    evaluate.add_argument("path", nargs="?", metavar="CHECKPOINT", help="default: the bundled model")
    evaluate.add_argument("--data", required=True, help="annotation file or data folder")
    evaluate.add_argument("--format", default="flickr", choices=["flickr", "coco", "karpathy", "jsonl"])
    evaluate.add_argument("--images", help="image folder, when not the usual one")
    evaluate.add_argument("--split", default="dev")
    evaluate.add_argument("--results", help="write COCO results JSON here")
    evaluate.add_argument("--cache-dir", default="cache/features")
    evaluate.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java)")
    evaluate.add_argument("--instances", metavar="PATH",
                          help="COCO instances JSON for the CHAIR hallucination figures (default, for COCO data: "
                               "instances_<split>2017.json beside the captions file, when there)")
    evaluate.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                          help="bootstrap draws for the 95%% intervals (0: none)")
    evaluate.add_argument("--json", action="store_true")
    cells = commands.add_parser(
        "cells", help="find the decoder's LSTM units that track something nameable (position, nouns, ...)",
        description="captioner cells [CHECKPOINT] --data DIR --split dev --out DIR: reads the split's reference "
                    "captions teacher-forced, scores every unit's h and c against properties of the words and of "
                    "the attention, with a shuffled baseline; writes cells.json, cells.md and pictures "
                    "(docs/under-the-hood.md)")
    cells.add_argument("path", nargs="?", metavar="CHECKPOINT", help="default: the bundled model")
    cells.add_argument("--data", required=True, help="annotation file or data folder")
    cells.add_argument("--format", default="flickr", choices=["flickr", "coco", "karpathy", "jsonl"])
    cells.add_argument("--images", help="image folder, when not the usual one")
    cells.add_argument("--split", default="dev")
    cells.add_argument("--out", required=True, help="folder for cells.json, cells.md and units/*.png")
    cells.add_argument("--cache-dir", default="cache/features")
    cells.add_argument("--captions-per-image", type=int, default=5, metavar="N")
    cells.add_argument("--max-captions", type=int, default=None, metavar="N", help="read at most N captions")
    cells.add_argument("--gates", action="store_true", help="score the i, f, g, o gates too")
    cells.add_argument("--top", type=int, default=10, metavar="N", help="units in the report, with pictures")
    cells.add_argument("--units-file", metavar="PATH",
                       help="also write the top 20 h and c units here, small (the bundled model's: "
                            "captioner/weights/default_cells.json, offered by the web page)")
    cells.add_argument("--seed", type=int, default=0, help="for the shuffled baselines")
    cells.add_argument("--device", default="cpu")
    cells.set_defaults(func=_cells)

    export = commands.add_parser(
        "export", help="a checkpoint for shipping (fp16, no training state), or ONNX graphs (--format onnx)",
        description="captioner export RUN/best.pt OUT.pt | captioner export CHECKPOINT OUT.onnx --format onnx "
                    "(encoder, decoder init and word step, and the int8 encoder where a calibration fits; "
                    "run with --checkpoint OUT.onnx, needs captioner[onnx])")
    export.add_argument("source", metavar="CHECKPOINT")
    export.add_argument("target", metavar="OUT")
    export.add_argument("--format", choices=["pt", "onnx"], default=None,
                        help="pt or onnx (default: onnx for an OUT ending in .onnx, else pt)")
    export.add_argument("--fp32", action="store_true", help="keep fp32 weights (pt)")
    export.add_argument("--no-tagger", action="store_true",
                        help="do not attach the encoder's ImageNet tagger (guided decoding then has no tags)")
    export.add_argument("--tagger", metavar="FILE", default=None,
                        help="attach this tagger of word detectors (python -m training.concepts) instead of the ImageNet one")
    export.add_argument("--int8-calibration", metavar="FILE", default=None,
                        help="onnx: activation ranges from training/calibrate_int8.py for the int8 encoder "
                             "(default: the bundled one, where it fits the encoder)")
    export.add_argument("--no-int8", action="store_true", help="onnx: do not write the int8 encoder")
    export.set_defaults(func=_export)

    from captioner.arguments import add_decode_arguments, add_model_arguments

    add_model_arguments(evaluate, precision=False)  # the fp32 feature cache; paths: training/evaluate_paths.py
    add_decode_arguments(evaluate)
    evaluate.set_defaults(func=_evaluate)


def _train(args: argparse.Namespace) -> int:
    import logging

    from .config import load_config
    from .train import main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = list(args.overrides)
    if args.backbone:
        overrides.append(f"--model.encoder.backbone={args.backbone}")
    if args.encoder_weights:
        overrides.append(f"--model.encoder.weights_path={args.encoder_weights}")
    cfg = load_config(args.config, overrides)
    print(json.dumps(main(cfg, resume=args.resume)))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import logging

    from captioner.api import Captioner
    from captioner.arguments import decode_options
    from captioner.decoding import DecodeConfig

    from .data import DataSpec
    from .evaluate import evaluate_checkpoint, format_table

    logging.basicConfig(level=logging.WARNING)
    decode = DecodeConfig.from_kwargs(**decode_options(args))
    path = args.path or args.checkpoint
    model = (Captioner.from_checkpoint(path, device=args.device, precision="fp32") if path
             else Captioner.default(device=args.device, precision="fp32"))
    if model.inference.runtime != "pytorch":
        raise ValueError(f"{path}: evaluate scores PyTorch checkpoints from the fp32 feature cache; for an ONNX "
                         "export use python -m training.evaluate_paths --onnx PATH")
    spec = DataSpec(format=args.format, path=args.data, images=args.images)
    metrics = evaluate_checkpoint(model, spec, args.split, decode, cache_dir=args.cache_dir,
                                  results_path=args.results, meteor=not args.no_meteor, instances=args.instances,
                                  resamples=args.bootstrap)
    print(json.dumps(metrics) if args.json else format_table(metrics))
    return 0


def _cells(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from captioner.api import Captioner
    from captioner.files import write_atomically

    from .cells import find_cells, shipped_units
    from .data import DataSpec

    logging.basicConfig(level=logging.WARNING)
    model = (Captioner.from_checkpoint(args.path, device=args.device, precision="fp32") if args.path
             else Captioner.default(device=args.device, precision="fp32"))
    if model.inference.runtime != "pytorch":
        raise ValueError(f"{args.path}: cells reads the PyTorch decoder's state; give the .pt checkpoint")
    for name in ("captions_per_image", "max_captions", "top"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    spec = DataSpec(format=args.format, path=args.data, images=args.images)
    report = find_cells(model, spec, args.split, args.out, cache_dir=args.cache_dir,
                        captions_per_image=args.captions_per_image, max_captions=args.max_captions,
                        gates=args.gates, top=args.top, seed=args.seed)
    if args.units_file:
        write_atomically(args.units_file, json.dumps(shipped_units(report), indent=1) + "\n")
    base = report["baseline"]
    print(f"{report['captions']} captions, {report['words']} words; shuffled baseline max {base['shuffled_max']:.3f}, "
          f"p99 {base['shuffled_p99']:.3f}")
    for unit in report["units"][:args.top]:
        print(f"{unit['rank']:>3}  {unit['name']:<48} {unit['score']:.3f}  ({unit['over_shuffled_max']:.1f}x shuffled max)")
    print(f"report: {Path(args.out) / 'cells.md'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint, export_onnx

    fmt = args.format or ("onnx" if str(args.target).lower().endswith(".onnx") else "pt")
    if fmt == "pt":
        size = export_checkpoint(args.source, args.target, half=not args.fp32, tagger=not args.no_tagger,
                                 tagger_file=args.tagger)
        print(f"{args.target}: {size / 1e6:.1f} MB")
        return 0
    files = export_onnx(args.source, args.target, tagger=not args.no_tagger, calibration=args.int8_calibration,
                        int8=not args.no_int8, tagger_file=args.tagger)
    for kind, path in files.items():
        print(f"{path}: {path.stat().st_size / 1e6:.1f} MB ({kind})")
    if "encoder_int8" not in files and not args.no_int8:
        print("no int8 encoder: no calibration fits this encoder (training/calibrate_int8.py makes one; "
              "pass it with --int8-calibration)")
    return 0
