"""Where a caption's time goes: the encoder, the decoder's per-image start (`init_state`), its
word steps (`Decoder.step`), beam search's own work (token rules, candidate selection, ending
hypotheses, advancing beams, reordering the decoder's state, checking for done images) and the
tagger's guidance, per image at batch 1 and 16.

    python benchmarks/profile_decoding.py [--precision auto] [--images DIR] [--count 32] [--no-tags] [--batches 1,16]

Each phase is timed by wrapping the function that does it (wall clock, so the phases add up to
the whole less the rest: setting up the search, the loop itself, building the results, reported
as "other"); best of `--repeats` passes over the same photos. One more pass counts the tensor
operations that decoding dispatches per photo (views included; the encoder's not), the word
steps per batch and the rows they decode per photo: on a shared machine, where times wander,
figures that do not. Photos: as bench_inference.py. The last line is one JSON object with the
figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_inference import load_photos  # noqa: E402

import captioner.decoding as decoding  # noqa: E402
from captioner.api import DEFAULT_CHECKPOINT, Captioner  # noqa: E402
from captioner.decoder import DecoderState  # noqa: E402
from captioner.decoding import DecodeConfig  # noqa: E402
from captioner.tagger import Tagger  # noqa: E402
from captioner.runtime import cpu  # noqa: E402


class CountOperations(TorchDispatchMode):
    """Counts the tensor operations dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))

PHASES = {  # phase -> (object, attribute) whose calls it times
    "rules": (decoding.Bans, "log_probs"), "select": (decoding.BeamState, "select"),
    "finish": (decoding.BeamState, "finish"), "advance": (decoding.BeamState, "advance"),
    "reorder": (DecoderState, "reorder"), "done": (decoding.BeamState, "done"), "tagger": (Tagger, "guide"),
}


def timed(owner, name: str, totals: dict, key: str) -> None:
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - started

    setattr(owner, name, wrapper)


def count_steps(decoder) -> dict:
    """Counts the decoder's word steps ("calls") and the rows they decode ("rows") from here on."""
    counts = {"calls": 0, "rows": 0}
    step = decoder.step

    def counting(tokens, state):
        counts["calls"] += 1
        counts["rows"] += tokens.shape[0]
        return step(tokens, state)

    decoder.step = counting
    return counts


def main() -> None:
    cpu.keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-tags", action="store_true")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    args = parser.parse_args()
    model = Captioner.from_checkpoint(args.checkpoint, precision=args.precision)
    pixels = load_photos(args.images, args.count, model)
    config = DecodeConfig(num_beams=3, tags=not args.no_tags)
    totals: dict[str, float] = {}
    timed(model, "encode", totals, "encoder")
    timed(model.decoder, "init_state", totals, "init")
    timed(model.decoder, "step", totals, "step")
    steps = count_steps(model.decoder)
    for key, (owner, name) in PHASES.items():
        timed(owner, name, totals, key)
    figures: dict = {"precision": model.inference.precision, "runtime": model.inference.runtime,
                     "cpu": cpu.capabilities()["name"], "tags": not args.no_tags}
    print(f"{model.inference.precision} on {model.inference.runtime}; beam 3, tags {'off' if args.no_tags else 'on'}; "
          f"{len(pixels)} photos; ms per image")
    columns = ["encoder", "init", "step", *PHASES, "other"]
    print(f"{'batch':>6}{'total':>8}" + "".join(f"{c:>9}" for c in columns) + f"{'decoding':>10}")
    for batch in (int(b) for b in args.batches.split(",")):
        runs = []
        for repeat in range(args.repeats + 1):
            totals.clear()
            started = time.perf_counter()
            for start in range(0, len(pixels), batch):
                model.caption_pixels(pixels[start:start + batch], config)
            if repeat:  # the first pass warms up
                runs.append({"total": (time.perf_counter() - started) * 1000 / len(pixels),
                             **{k: v * 1000 / len(pixels) for k, v in totals.items()}})
        counter = CountOperations()
        steps.update(calls=0, rows=0)
        for start in range(0, len(pixels), batch):
            regions, pooled = model.encode(pixels[start:start + batch])
            with counter:
                model.caption_features(regions, pooled, config)
        batches = -(-len(pixels) // batch)
        best = min(runs, key=lambda r: r["total"])
        run = {c: best.get(c, 0.0) for c in columns[:-1]}
        run["other"] = best["total"] - sum(run.values())
        share = 1 - run["encoder"] / best["total"]
        print(f"{batch:>6}{best['total']:>8.2f}" + "".join(f"{run[c]:>9.2f}" for c in columns) + f"{share:>10.0%}")
        figures[f"b{batch}"] = {"total_ms": round(best["total"], 3), **{f"{c}_ms": round(run[c], 3) for c in columns},
                                "decoder_share": round(share, 3),
                                "operations_per_photo": round(counter.count / len(pixels)),
                                "word_steps_per_batch": round(steps["calls"] / batches, 2),
                                "rows_per_photo": round(steps["rows"] / len(pixels), 2)}
        print(f"{'':>6}{counter.count / len(pixels):.0f} tensor operations dispatched per photo in decoding; "
              f"{steps['calls'] / batches:.1f} word steps a batch, "
              f"{steps['rows'] / len(pixels):.1f} rows decoded a photo")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
