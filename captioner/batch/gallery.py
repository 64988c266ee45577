"""A static HTML gallery of captioned images: one self-contained page, no server, no copies.

Cards show each image (linked by a relative URL from the page to the original file, loaded lazily
and scaled down by the browser) with its caption and score; failed images show their error. The
cards are rendered in path order, so the page reads without JavaScript; a few lines of script
re-sort them by score (best or worst first, the default) or path, and filter them by caption text;
the order is kept in the address (`gallery.html#sort=score-asc`).
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

from ..files import write_atomically

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }
header { display: flex; flex-wrap: wrap; gap: 1rem; align-items: baseline; margin-bottom: 1rem; }
h1 { font-size: 1.3rem; margin: 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 1rem; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; overflow: hidden; }
figure img { width: 100%; height: 180px; object-fit: cover; display: block; background: #eee; }
figcaption { padding: .5rem .6rem; font-size: .9rem; }
.caption { display: block; margin-bottom: .3rem; }
.meta { color: #777; font-size: .75rem; word-break: break-all; }
figure.failed { border-color: #d66; }
figure.failed .caption { color: #b22; }
"""

_SCRIPT = """
const grid = document.getElementById("cards");
const cards = Array.from(grid.children);
function show() {
  const order = document.getElementById("sort").value;
  const needle = document.getElementById("filter").value.toLowerCase();
  const score = c => c.dataset.score === "" ? -Infinity : parseFloat(c.dataset.score);
  const sorted = cards.slice().sort((a, b) =>
    order === "path" ? (a.dataset.path < b.dataset.path ? -1 : a.dataset.path > b.dataset.path ? 1 : 0)
    : order === "score-asc" ? score(a) - score(b) || (a.dataset.path < b.dataset.path ? -1 : 1)
    : score(b) - score(a) || (a.dataset.path < b.dataset.path ? -1 : 1));
  for (const card of sorted) {
    card.hidden = needle !== "" && !card.textContent.toLowerCase().includes(needle);
    grid.appendChild(card);
  }
}
const select = document.getElementById("sort");
const wanted = new URLSearchParams(location.hash.slice(1)).get("sort");  // e.g. gallery.html#sort=path
if (Array.from(select.options).some(o => o.value === wanted)) select.value = wanted;
select.addEventListener("change", () => { history.replaceState(null, "", "#sort=" + select.value); show(); });
document.getElementById("filter").addEventListener("input", show);
show();
"""


def render_gallery(records: Iterable[dict[str, Any]], image_root: Path, page: Path, *, title: str) -> str:
    """The page for `records` (dicts with path and caption/score or error; paths relative to
    `image_root`), with image URLs relative to where `page` will be written."""
    records = sorted(records, key=lambda r: r["path"])
    base = page.resolve().parent
    captioned = sum(1 for r in records if "caption" in r)
    cards = []
    for record in records:
        path = record["path"]
        url = _relative_url(image_root.resolve() / path, base)
        score = record.get("score")
        if "caption" in record:
            text, css, meta = record["caption"], "", f"score {score:.3f} · {path}"
        else:
            text, css, meta = f"error: {record.get('error', 'unknown')}", " failed", path
        cards.append(
            f'<figure class="card{css}" data-path="{html.escape(path)}" '
            f'data-score="{"" if score is None else repr(float(score))}">'
            f'<a href="{url}"><img src="{url}" loading="lazy" alt="{html.escape(text)}"></a>'
            f'<figcaption><span class="caption">{html.escape(text)}</span>'
            f'<span class="meta">{html.escape(meta)}</span></figcaption></figure>'
        )
    return "\n".join([
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1>",
        f"<span>{captioned} captioned, {len(records) - captioned} failed</span>",
        '<label>Sort <select id="sort"><option value="score-desc">score, best first</option>'
        '<option value="score-asc">score, worst first</option><option value="path">path</option>'
        "</select></label>",
        '<label>Filter <input id="filter" type="search" placeholder="words in captions"></label></header>',
        '<main class="grid" id="cards">',
        *cards,
        "</main>",
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
        "",
    ])


def write_gallery(records: Iterable[dict[str, Any]], image_root: Path, page: Path, *, title: str) -> None:
    """Render and write the page atomically (`captioner.files`)."""
    write_atomically(page, render_gallery(records, image_root, page, title=title))


def _relative_url(target: Path, base: Path) -> str:
    try:
        relative = os.path.relpath(target, base)
    except ValueError:  # another drive (Windows): an absolute file URL
        return target.as_uri()
    return quote(Path(relative).as_posix(), safe="/")
