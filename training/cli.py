"""`captioner train` and `captioner evaluate`."""

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
    export = commands.add_parser("export", help="strip a checkpoint's training state and store it in fp16")
    export.add_argument("source", metavar="CHECKPOINT")
    export.add_argument("target", metavar="OUT")
    export.add_argument("--fp32", action="store_true", help="keep fp32 weights")
    export.add_argument("--no-tagger", action="store_true",
                        help="do not attach the encoder's ImageNet tagger (guided decoding then has no tags)")
    export.set_defaults(func=_export)

    from captioner.cli import add_decode_arguments, add_model_arguments

    add_model_arguments(evaluate)
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
    from captioner.cli import decode_options
    from captioner.decoding import DecodeConfig

    from .data import DataSpec
    from .evaluate import evaluate_checkpoint, format_table

    logging.basicConfig(level=logging.WARNING)
    decode = DecodeConfig.from_kwargs(**decode_options(args))
    path = args.path or args.checkpoint
    model = Captioner.from_checkpoint(path, device=args.device) if path else Captioner.default(device=args.device)
    spec = DataSpec(format=args.format, path=args.data, images=args.images)
    metrics = evaluate_checkpoint(model, spec, args.split, decode, cache_dir=args.cache_dir,
                                  results_path=args.results, meteor=not args.no_meteor, instances=args.instances,
                                  resamples=args.bootstrap)
    print(json.dumps(metrics) if args.json else format_table(metrics))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    size = export_checkpoint(args.source, args.target, half=not args.fp32, tagger=not args.no_tagger)
    print(f"{args.target}: {size / 1e6:.1f} MB")
    return 0
