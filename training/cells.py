"""`captioner cells`: which LSTM units of the decoder track something a reader can name.

The decoder reads a split's reference captions teacher-forced (<bos>, then each word). After it
reads word t, the top layer's hidden state h and memory cell c (and, with `gates`, its i, f, g, o
gate activations) are recorded for word t: reading-aligned, as the Karpathy notes colour text, so
the state at a word is the one that predicts the word after it. Each unit is then scored against
properties of the words (`training.text_properties`) and of where attention is (`attention_properties`):
Spearman's rho for numeric properties, the rank-biserial correlation 2 AUC - 1 for binary ones,
so both lie in [-1, 1] and a unit's best property is the one of largest |score|.

Two baselines say what an untracked unit scores:
  shuffled words    each unit's activations permuted across all words, scored like the real ones;
                    the maximum (and 99th percentile) over units of their best |score| is the bar
                    a real unit must clear (the same many-properties-per-unit selection, no link
                    between activation and word).
  length-matched    whole captions' activation traces swapped among captions of the same length,
                    one swap for every unit: keeps everything that follows from position alone, so
                    a "noun" unit that only knows where nouns tend to sit keeps its score here.

Shapes: W words (all captions, concatenated), D units per kind, P attention regions, Q properties.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from captioner.api import Captioner
from captioner.vocab import tokenize

from .text_properties import TEXT_PROPERTIES, Property, caption_properties

log = logging.getLogger(__name__)

ATTENTION_PROPERTIES = (
    Property("attention_row", "attention row (top to bottom)", False, "attention"),
    Property("attention_column", "attention column (left to right)", False, "attention"),
    Property("attention_border", "attention on the border", False, "attention"),
    Property("attention_spread", "attention spread (entropy)", False, "attention"),
)
MIN_CLASS = 10  # a binary property needs this many words on each side to be scored


@dataclass
class Recording:
    """What the decoder held after reading each word of the captions."""

    words: list[list[str]]  # per caption
    activations: dict[str, np.ndarray]  # kind (h, c, i, f, g, o) -> (W, D)
    attention: np.ndarray | None  # (W, P), None for a decoder without attention
    caption_of: np.ndarray  # (W,) index of each word's caption

    def trace(self, kind: str, unit: int, caption: int) -> np.ndarray:
        """One unit's values over one caption's words."""
        return self.activations[kind][self.caption_of == caption, unit]


@torch.inference_mode()
def record(model: Captioner, captions: Sequence[tuple[str, list[str]]],
           regions_of: Callable[[list[str]], torch.Tensor], *, gates: bool = False,
           batch_size: int = 128) -> Recording:
    """captions: (image path, words); regions_of(paths) -> (B, P, E) encoder features."""
    decoder, vocab = model.decoder, model.vocabulary
    if decoder.config.cell != "lstm":
        raise ValueError(f"cells reads an LSTM's memory cell; this decoder is a {decoder.config.cell!r}")
    kinds = ["h", "c", *("ifgo" if gates else "")]
    columns: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    attention: list[np.ndarray] = []
    for start in range(0, len(captions), batch_size):
        batch = captions[start:start + batch_size]
        lengths = torch.tensor([len(words) for _, words in batch])  # (N,)
        tokens = torch.full((len(batch), int(lengths.max()) + 1), vocab.pad_id)  # (N, T+1): <bos> w1 .. wn
        tokens[:, 0] = vocab.bos_id
        for row, (_, words) in enumerate(batch):
            tokens[row, 1:len(words) + 1] = torch.tensor([vocab.index.get(w, vocab.unk_id) for w in words])
        paths = list(dict.fromkeys(path for path, _ in batch))
        regions = regions_of(paths).to(model.device)[[paths.index(p) for p, _ in batch]]  # (N, P, E)
        state = decoder.init_state(regions, regions.mean(dim=1), record_gates=gates)
        steps: dict[str, list[torch.Tensor]] = {k: [] for k in [*kinds, "alpha"]}
        for t in range(tokens.shape[1]):
            _, state, alpha = decoder.step(tokens[:, t].to(model.device), state)
            if t == 0:  # <bos>: no word read yet
                continue
            steps["h"].append(state.h[-1])  # (N, D), the top layer
            steps["c"].append(state.c[-1])
            for g, kind in enumerate("ifgo" if gates else ""):
                steps[kind].append(state.gates[:, g])
            if alpha is not None:
                steps["alpha"].append(alpha)  # (N, P)
        read = torch.arange(tokens.shape[1] - 1)[None] < lengths[:, None]  # (N, T): real words, caption-major
        for kind in kinds:
            columns[kind].append(torch.stack(steps[kind], dim=1)[read.to(model.device)].float().cpu().numpy())
        if steps["alpha"]:
            attention.append(torch.stack(steps["alpha"], dim=1)[read.to(model.device)].float().cpu().numpy())
    caption_of = np.repeat(np.arange(len(captions)), [len(words) for _, words in captions])  # (W,)
    return Recording([words for _, words in captions], {k: np.concatenate(v) for k, v in columns.items()},
                     np.concatenate(attention) if attention else None, caption_of)


def attention_properties(alpha: np.ndarray) -> dict[str, np.ndarray]:
    """alpha (W, P) over a square S x S grid -> property name -> (W,): the row and column of the
    most attended region (0 = top / left), the attention mass on the outer ring of regions, and
    the attention's entropy in nats (low: one region; high: spread out)."""
    side = math.isqrt(alpha.shape[1])
    if side * side != alpha.shape[1]:
        return {}
    top = alpha.argmax(axis=1)  # (W,)
    grid = np.arange(alpha.shape[1])
    border = (grid // side == 0) | (grid // side == side - 1) | (grid % side == 0) | (grid % side == side - 1)
    entropy = -(alpha * np.log(np.clip(alpha, 1e-12, None))).sum(axis=1)
    return {"attention_row": (top // side).astype(float), "attention_column": (top % side).astype(float),
            "attention_border": alpha[:, border].sum(axis=1), "attention_spread": entropy}


def property_table(recording: Recording) -> tuple[list[Property], np.ndarray]:
    """-> the properties that can be scored here, and their values (W, Q)."""
    per_caption = [caption_properties(words) for words in recording.words]
    values = {p.name: np.concatenate([c[p.name] for c in per_caption]) for p in TEXT_PROPERTIES}
    if recording.attention is not None:
        values.update(attention_properties(recording.attention))
    kept = []
    for prop in (*TEXT_PROPERTIES, *ATTENTION_PROPERTIES):
        column = values.get(prop.name)
        if column is None or np.ptp(column) == 0:
            continue
        if prop.binary and min(column.sum(), len(column) - column.sum()) < MIN_CLASS:
            continue
        kept.append(prop)
    return kept, np.stack([values[p.name] for p in kept], axis=1)


class Scorer:
    """Signed scores of every unit against every property, from ranks: (W, U) ranks -> (U, Q)."""

    def __init__(self, properties: Sequence[Property], values: np.ndarray):
        """values (W, Q)."""
        self.binary = np.array([p.binary for p in properties])  # (Q,)
        numeric = rankdata(values, axis=0)  # (W, Q)
        numeric -= numeric.mean(axis=0)
        self.numeric = numeric / np.linalg.norm(numeric, axis=0)  # unit columns: rho is a dot product
        self.positive = values.astype(bool)  # (W, Q), read for binary columns only
        self.n1 = self.positive.sum(axis=0)  # (Q,)
        self.n0 = len(values) - self.n1
        self.pairs = np.maximum(self.n1 * self.n0, 1)  # numeric columns have no classes

    def __call__(self, ranks: np.ndarray) -> np.ndarray:
        """ranks (W, U) of each unit's activations over the words -> (U, Q) in [-1, 1]."""
        centred = ranks - ranks.mean(axis=0)
        rho = (centred.T @ self.numeric) / np.linalg.norm(centred, axis=0)[:, None]  # Spearman
        rank_sum = ranks.T @ self.positive.astype(ranks.dtype)  # (U, Q)
        auc = (rank_sum - self.n1 * (self.n1 + 1) / 2) / self.pairs  # Mann-Whitney
        return np.where(self.binary, 2 * auc - 1, rho)


def length_matched_swap(recording: Recording, rng: np.random.Generator) -> np.ndarray:
    """(W,) word order in which every caption's words are taken from another caption of the same
    length, position by position (captions of a length no other has stay where they are)."""
    lengths = np.array([len(w) for w in recording.words])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    order = np.empty(len(recording.caption_of), dtype=np.int64)
    for length in np.unique(lengths):
        group = np.flatnonzero(lengths == length)
        for target, source in zip(group, rng.permutation(group)):
            order[starts[target]:starts[target] + length] = np.arange(starts[source], starts[source] + length)
    return order


@dataclass
class UnitScores:
    kinds: list[str]
    properties: list[Property]
    scores: np.ndarray  # (K, D, Q) signed, real
    shuffled: np.ndarray  # (K, D, Q) signed, each unit's activations permuted across words
    swapped: np.ndarray  # (K, D, Q) signed, length-matched caption swap


def score_units(recording: Recording, seed: int = 0) -> UnitScores:
    properties, values = property_table(recording)
    scorer = Scorer(properties, values)
    rng = np.random.default_rng(seed)
    swap = length_matched_swap(recording, rng)
    real, shuffled, swapped = [], [], []
    for kind, activations in recording.activations.items():  # one kind at a time bounds memory: (W, D)
        ranks = rankdata(activations, axis=0).astype(np.float32)
        real.append(scorer(ranks))
        shuffled.append(scorer(rng.permuted(ranks, axis=0)))
        swapped.append(scorer(ranks[swap]))
    return UnitScores(list(recording.activations), properties, np.stack(real), np.stack(shuffled), np.stack(swapped))


def rank_units(result: UnitScores) -> dict:
    """The JSON report: every unit's best property, the baselines, the units ranked overall, by
    group of properties (word, context, attention) and per property."""
    noise = np.abs(result.shuffled).max(axis=2)  # (K, D): each shuffled unit's best
    baseline = {"shuffled_max": float(noise.max()), "shuffled_p99": float(np.percentile(noise, 99)),
                "shuffled_median": float(np.median(noise))}
    units = _ranked(result, np.ones(len(result.properties), dtype=bool), baseline["shuffled_max"])
    groups = {}
    for group in dict.fromkeys(p.group for p in result.properties):
        mask = np.array([p.group == group for p in result.properties])
        groups[group] = _ranked(result, mask, baseline["shuffled_max"])[:20]
    by_property = {}
    for q, prop in enumerate(result.properties):
        column = np.abs(result.scores[..., q])  # (K, D)
        top = np.argsort(column, axis=None)[::-1][:5]
        by_property[prop.name] = {
            "label": prop.label, "group": prop.group,
            "measure": "rank-biserial (2 AUC - 1)" if prop.binary else "Spearman rho",
            "shuffled_max": float(np.abs(result.shuffled[..., q]).max()),
            "length_matched_max": float(np.abs(result.swapped[..., q]).max()),
            "top": [_unit(result, k, d, q, baseline["shuffled_max"]) for k, d in zip(*np.unravel_index(top, column.shape))],
        }
    return {"alignment": "reading: the state after reading word t, coloured on word t",
            "kinds": result.kinds, "units_per_kind": int(result.scores.shape[1]),
            "properties": [{"name": p.name, "label": p.label, "binary": p.binary, "group": p.group}
                           for p in result.properties],
            "baseline": baseline, "beats_baseline": sum(u["score"] > baseline["shuffled_max"] for u in units),
            "units": units, "by_group": groups, "by_property": by_property}


def _ranked(result: UnitScores, properties: np.ndarray, noise_max: float) -> list[dict]:
    """Every unit with its best property among `properties` (Q,) bool, best first."""
    strength = np.where(properties, np.abs(result.scores), -1.0)  # (K, D, Q)
    best = strength.argmax(axis=2)  # (K, D)
    units = [_unit(result, k, d, int(best[k, d]), noise_max)
             for k in range(len(result.kinds)) for d in range(result.scores.shape[1])]
    units.sort(key=lambda u: -u["score"])
    for rank, unit in enumerate(units, 1):
        unit["rank"] = rank
    return units


def _unit(result: UnitScores, k: int, d: int, q: int, noise_max: float) -> dict:
    prop, kind = result.properties[q], result.kinds[k]
    signed = float(result.scores[k, d, q])
    unit = {"name": f"unit {d} ({kind}): {prop.label}", "kind": kind, "index": int(d), "property": prop.name,
            "label": prop.label, "group": prop.group, "score": abs(signed), "signed": signed,
            "direction": ("higher on" if signed > 0 else "lower on") + f" {prop.label}" if prop.binary else
            ("rises with" if signed > 0 else "falls with") + f" {prop.label}",
            "over_shuffled_max": abs(signed) / noise_max if noise_max > 0 else math.inf,
            "length_matched": abs(float(result.swapped[k, d, q]))}
    if prop.binary:
        unit["auc"] = (signed + 1) / 2
    return unit


def reference_captions(samples, captions_per_image: int, max_captions: int | None) -> list[tuple[str, list[str]]]:
    """(image path, words) of up to `captions_per_image` captions per photo, at most `max_captions`."""
    captions = [(str(s.image), words) for s in samples for text in s.captions[:captions_per_image]
                if (words := tokenize(text))]
    return captions[:max_captions] if max_captions is not None else captions


def find_cells(model: Captioner, spec, split: str, out: str | os.PathLike, *,
               cache_dir: str | os.PathLike = "cache/features", captions_per_image: int = 5,
               max_captions: int | None = None, gates: bool = False, top: int = 10, examples: int = 4,
               seed: int = 0, progress: bool = True) -> dict:
    """Record, score and rank the units over `split`; write cells.json, cells.md and the unit
    pictures into `out`. Returns the JSON report."""
    from . import features
    from .cells_report import write_report
    from .data import load_dataset

    samples = load_dataset(spec, split)
    cache = features.build_or_load(model.encoder, model.preprocessing, [s.image for s in samples], cache_dir,
                                   progress=progress)
    samples = [s for s in samples if cache.usable(s.image)]
    captions = reference_captions(samples, captions_per_image, max_captions)
    recording = record(model, captions, cache.regions, gates=gates)
    report = rank_units(score_units(recording, seed))
    report.update(split=split, data=spec.label, data_path=str(spec.path), captions=len(captions), words=len(recording.caption_of),
                  images=len({path for path, _ in captions}))
    write_report(report, recording, Path(out), top=top, examples=examples)
    return report


def shipped_units(report: dict, count: int = 20) -> dict:
    """The small file the web page offers units from, h and c only: each property's best unit
    where it beats the shuffled baseline, then the best of the rest, up to `count`, best first."""
    keys = ("name", "kind", "index", "property", "label", "group", "direction", "score", "over_shuffled_max")
    chosen: dict[tuple, dict] = {}
    for prop in report["by_property"].values():
        best = next((u for u in prop["top"] if u["kind"] in ("h", "c")), None)
        if best is not None and best["score"] > report["baseline"]["shuffled_max"]:
            chosen.setdefault((best["kind"], best["index"]), best)
    for unit in report["units"]:
        if len(chosen) >= count:
            break
        if unit["kind"] in ("h", "c"):
            chosen.setdefault((unit["kind"], unit["index"]), unit)
    units = sorted(list(chosen.values())[:count], key=lambda u: -u["score"])
    rounded = lambda v: round(v, 4) if isinstance(v, float) else v  # noqa: E731
    return {"alignment": report["alignment"], "split": report.get("split"), "data": report.get("data"),
            "baseline": {k: rounded(v) for k, v in report["baseline"].items()},
            "units": [{k: rounded(u[k]) for k in keys} for u in units]}
