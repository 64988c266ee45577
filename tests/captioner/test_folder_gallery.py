"""The `--html` gallery in a real headless Chromium: its script sorts the cards by score.

Needs Chromium (the `chromium` fixture: skipped without it, failed without it under CI=true)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from captioner.cli import main
from tests.conftest import make_photo


def rendered_order(chromium: str, page: Path, fragment: str, profile: Path) -> list[str]:
    """The cards' paths in the order the page's script leaves them."""
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--dump-dom", page.as_uri() + fragment]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    return re.findall(r'<figure class="card[^"]*" data-path="([^"]*)"', dom)


@pytest.mark.integration  # headless Chromium
def test_gallery_sorts_by_score_in_a_browser(chromium, tmp_path, tiny_checkpoint):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        (folder / f"p{i}.jpg").write_bytes(make_photo(seed=i * 7 + 1))
    (folder / "broken.jpg").write_text("not an image")
    out, page = tmp_path / "o.jsonl", tmp_path / "gallery.html"
    assert main(["caption-folder", str(folder), "-o", str(out), "--html", str(page), "--checkpoint",
                 tiny_checkpoint, "--workers", "0", "--quiet", "--num-beams", "2", "--max-new-tokens", "6",
                 "--precision", "fp32"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    score = {r["path"]: r.get("score", float("-inf")) for r in records}
    assert len(set(score.values())) > 2  # the order below is a real test

    best_first = sorted(score, key=lambda p: (-score[p], p))
    worst_first = sorted(score, key=lambda p: (score[p], p))
    assert rendered_order(chromium, page, "", tmp_path / "profile") == best_first
    assert rendered_order(chromium, page, "#sort=score-asc", tmp_path / "profile") == worst_first
    assert rendered_order(chromium, page, "#sort=path", tmp_path / "profile") == sorted(score)
    assert best_first[-1] == "broken.jpg" and worst_first[0] == "broken.jpg"
