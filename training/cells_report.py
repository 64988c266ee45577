"""Writes what `training.cells` found: cells.json, cells.md and one picture per top unit, its
values coloured on the words of a few captions as in Karpathy's notes on character-level RNNs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from captioner.files import write_atomically

FONT_SIZE = 11
CHAR_INCHES = 0.6 * FONT_SIZE / 72  # a monospace character's advance
ROW_INCHES = 0.34


def write_report(report: dict, recording, out: Path, *, top: int = 10, examples: int = 4) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "units").mkdir(exist_ok=True)
    chosen = example_captions(recording.words, examples)
    drawn = {}
    best_per_property = [prop["top"][0] for prop in report["by_property"].values()]
    for unit in [*report["units"][:top], *report["by_group"].get("context", [])[:top], *best_per_property]:
        key = unit["kind"], unit["index"]
        if key not in drawn:
            values = recording.activations[unit["kind"]][:, unit["index"]]  # (W,)
            low, high = np.percentile(values, [1, 99])
            drawn[key] = f"units/unit-{unit['kind']}-{unit['index']}.png"
            plot_unit([recording.words[i] for i in chosen],
                      [recording.trace(unit["kind"], unit["index"], i) for i in chosen],
                      (float(low), float(high)), unit["name"], out / drawn[key])
        unit["picture"] = drawn[key]
    write_atomically(out / "cells.json", json.dumps(report, indent=1).encode())
    write_atomically(out / "cells.md", markdown(report, top).encode())


def example_captions(words: list[list[str]], count: int) -> list[int]:
    """`count` captions of 8 to 14 words spread over the set (any captions, if too few are)."""
    eligible = [i for i, w in enumerate(words) if 8 <= len(w) <= 14] or list(range(len(words)))
    count = min(count, len(eligible))
    return [eligible[j * len(eligible) // count] for j in range(count)]


def plot_unit(captions: list[list[str]], traces: list[np.ndarray], scale: tuple[float, float],
              title: str, path: Path) -> None:
    """One row per caption, each word on a background coloured by the unit's value there:
    blue at the unit's 1st percentile over all words, red at its 99th."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    cmap, norm = plt.get_cmap("RdBu_r"), Normalize(*scale, clip=True)
    width = max(len(" ".join(words)) for words in captions) + 2  # in characters
    fig = plt.figure(figsize=(max(4.0, width * CHAR_INCHES + 0.3), ROW_INCHES * (len(captions) + 1.3)))
    ax = fig.add_axes((0.02, 0, 0.96, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(len(captions) + 1.3, 0)
    ax.axis("off")
    ax.text(0, 0.55, f"{title}   (blue {scale[0]:.2f}, red {scale[1]:.2f})", fontsize=FONT_SIZE - 1, va="center")
    for row, (words, values) in enumerate(zip(captions, traces)):
        x = 0.0
        for word, value in zip(words, values):
            colour = cmap(norm(value))
            dark = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] < 0.5
            ax.text(x, row + 1.6, word, family="monospace", fontsize=FONT_SIZE, va="center",
                    color="white" if dark else "black",
                    bbox={"boxstyle": "square,pad=0.15", "facecolor": colour, "edgecolor": "none"})
            x += len(word) + 1
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(report: dict, top: int) -> str:
    base = report["baseline"]
    lines = [
        f"# Interpretable cells: {report.get('data', '')} {report.get('split', '')}",
        "",
        f"{report.get('captions', '?')} reference captions ({report.get('words', '?')} words, "
        f"{report.get('images', '?')} photos) read teacher-forced; kinds {', '.join(report['kinds'])}, "
        f"{report['units_per_kind']} units each; {report['alignment']}.",
        "",
        f"Score: |Spearman rho| for numeric properties, |2 AUC - 1| (rank-biserial) for binary ones. "
        f"Baseline, each unit's activations shuffled across words: the best |score| of a shuffled unit is at "
        f"most {base['shuffled_max']:.3f} (99th percentile {base['shuffled_p99']:.3f}, median "
        f"{base['shuffled_median']:.3f}); {report['beats_baseline']} of {len(report['units'])} real units beat "
        f"that maximum. *Length-matched*: the unit's score when each caption's activations are swapped with "
        f"another caption's of the same length, which keeps what position alone explains.",
        "",
        "## Top units", "",
        *_table(report["units"][:top]),
    ]
    context = report["by_group"].get("context", [])[:top]
    if context:
        lines += ["", "## Top units on properties that need memory of the caption", "",
                  "Position, words left, in a noun phrase, subject already named: not a property of the "
                  "word just read.", "", *_table(context)]
    lines += ["", "## Best unit per property", "",
              "| property | best unit | score | shuffled max | length-matched max |", "| --- | --- | --- | --- | --- |"]
    for prop in report["by_property"].values():
        best = prop["top"][0]
        unit = f"[{best['name'].split(':')[0]}]({best['picture']})" if "picture" in best else best["name"].split(":")[0]
        lines.append(f"| {prop['label']} | {unit} | {best['score']:.3f} | "
                     f"{prop['shuffled_max']:.3f} | {prop['length_matched_max']:.3f} |")
    lines += ["", "## The top units over a few captions", "",
              "Each word's background is the unit's value after reading it (blue: the unit's 1st percentile "
              "over all words, red: its 99th).", ""]
    shown = set()
    for unit in [*report["units"][:top], *context]:
        if "picture" in unit and unit["picture"] not in shown:
            shown.add(unit["picture"])
            lines += [f"**{unit['name']}** ({unit['direction']}, {unit['score']:.3f})", "",
                      f"![{unit['name']}]({unit['picture']})", ""]
    return "\n".join(lines)


def _table(units: list[dict]) -> list[str]:
    lines = ["| rank | unit | tracks | score | x shuffled max | length-matched |", "| --- | --- | --- | --- | --- | --- |"]
    for unit in units:
        auc = f" (AUC {unit['auc']:.3f})" if "auc" in unit else ""
        lines.append(f"| {unit['rank']} | {unit['name']} | {unit['direction']} | {unit['score']:.3f}{auc} | "
                     f"{unit['over_shuffled_max']:.1f} | {unit['length_matched']:.3f} |")
    return lines
