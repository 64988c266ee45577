"""The web page's "under the hood" panel in real headless Chromium: after a caption, a unit picked
by name (with the keyboard) colours the caption's words by its value after reading each word, and
its gates fill a table; the screenshot shows those colours; it fits a 375-px phone; and the
hidden states are asked for only while the panel is open."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from captioner.decoder import GATES
from tests.conftest import make_photo
from tests.service.conftest import build_app
from tests.service.test_browser import browser, collect_errors, page, serving  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration  # headless Chromium

PHONE = {"width": 375, "height": 812}


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("hood") / "photo.jpg"
    path.write_bytes(make_photo(seed=11))
    return path


@pytest.fixture(scope="module")
def expected(tiny_captioner, photo):
    """The caption the panel's request gets (one sequence, hidden states on)."""
    result = tiny_captioner.caption(photo.read_bytes(), num_beams=3, num_return_sequences=1,
                                    output_hidden_states=True)
    return result.sequences[0]


def reading_aligned(caption, kind: str, index: int) -> list[float | None]:
    """Word t's value: the state after reading it, hidden_states entry t + 1 (None past the end)."""
    states = caption.hidden_states[kind]
    return [float(states[t + 1, index]) if t + 1 < len(states) else None for t in range(len(caption.words))]


@pytest.fixture(scope="module")
def units(expected):
    """Two units of the tiny model that vary most over the caption, as `captioner cells` would list them."""
    def spread(kind):
        values = expected.hidden_states[kind][1:]  # (T - 1, D)
        return int((values.max(0).values - values.min(0).values).argmax())
    return [{"name": f"unit {spread('c')} (c): test tracker", "kind": "c", "index": spread("c"),
             "direction": "rises with testing", "score": 0.9, "over_shuffled_max": 12.5},
            {"name": f"unit {spread('h')} (h): another", "kind": "h", "index": spread("h"), "score": 0.5}]


@pytest.fixture(scope="module")
def hood_url(tiny_checkpoint, units, tmp_path_factory):
    path = tmp_path_factory.mktemp("units") / "units.json"
    path.write_text(json.dumps({"alignment": "reading", "units": units}))
    app = build_app(tiny_checkpoint, cells=str(path), max_wait_ms=2.0)
    with serving(app) as url:
        yield url
    app.extensions["captioner"].close()


def caption_requests(page) -> list[bytes]:
    """The bodies of the page's caption requests (intercepted: a request event omits a form's file)."""
    sent: list[bytes] = []

    def record(route) -> None:
        sent.append(route.request.post_data_buffer or b"")
        route.continue_()

    page.route("**/v1/captions", record)
    return sent


def field(body: bytes, name: str) -> str | None:
    marker = f'name="{name}"\r\n\r\n'.encode()
    if marker not in body:
        return None
    return body.split(marker, 1)[1].split(b"\r\n", 1)[0].decode()


def shown_values(page, selector: str) -> list[float | None]:
    return page.eval_on_selector_all(
        selector, "els => els.map(e => e.dataset.value === undefined ? null : Number(e.dataset.value))")


def word_backgrounds(page) -> list[str]:
    return page.eval_on_selector_all("#cell-words span", "els => els.map(e => getComputedStyle(e).backgroundColor)")


def colours_in(png: bytes) -> set[tuple[int, int, int]]:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    return {tuple(int(c) for c in p) for p in np.unique(pixels, axis=0)}


def rgb(css: str) -> tuple[int, int, int]:
    return tuple(int(part) for part in css[css.index("(") + 1:css.index(")")].split(",")[:3])


def assert_values(shown, wanted) -> None:
    assert len(shown) == len(wanted)
    for got, want in zip(shown, wanted):
        assert (got is None) == (want is None)
        if want is not None:
            assert got == pytest.approx(want, abs=2e-3)


def open_with_keyboard(page) -> None:
    page.focus("#hood summary")
    page.keyboard.press("Enter")


def test_hood_colours_the_caption_by_a_unit_picked_with_the_keyboard(page, hood_url, photo, expected, units,
                                                                   tmp_path):
    errors = collect_errors(page)
    sent = caption_requests(page)
    page.goto(hood_url + "/")
    assert not page.is_visible("#hood")  # nothing to look under before a caption
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#hood", state="visible", timeout=30_000)
    assert len(sent) == 1 and field(sent[0], "output_hidden_states") is None  # a plain caption costs no states
    assert page.eval_on_selector_all("#unit option", "os => os.map(o => o.textContent)") == [u["name"] for u in units]

    open_with_keyboard(page)
    page.wait_for_selector("#cell-words span", timeout=30_000)
    assert len(sent) == 2
    assert field(sent[1], "output_hidden_states") == "true" and field(sent[1], "num_return_sequences") == "1"
    assert page.eval_on_selector_all("#cell-words span", "els => els.map(e => e.textContent)") == expected.words

    first, second = units
    assert_values(shown_values(page, "#cell-words span"), reading_aligned(expected, "c", first["index"]))
    assert "rises with testing" in page.inner_text("#unit-about")
    backgrounds = word_backgrounds(page)
    assert len(set(backgrounds)) >= 3  # the words differ in colour with the unit's value

    rows = page.locator("#gates tbody tr")
    assert rows.count() == len(expected.words)
    gates = expected.hidden_states["gates"]  # (T, 4, D)
    for g, gate in enumerate(GATES):
        shown = shown_values(page, f"#gates tbody tr td:nth-child({3 + g})")
        assert_values(shown, [float(gates[t + 1, g, first["index"]]) if t + 1 < len(gates) else None
                              for t in range(len(expected.words))])
    assert all(0 <= v <= 1 for v in shown_values(page, "#gates tbody tr td:nth-child(3)") if v is not None)

    # Keyboard: Tab from the summary reaches the select; an arrow key picks the next unit.
    page.focus("#hood summary")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "unit"
    before = page.eval_on_selector("#cell-words span", "e => e.dataset.value")
    page.keyboard.press("ArrowDown")
    page.wait_for_function("() => document.getElementById('unit').value === '1'")
    page.wait_for_function("(old) => document.querySelector('#cell-words span').dataset.value !== old",
                           arg=before, timeout=5_000)
    assert_values(shown_values(page, "#cell-words span"), reading_aligned(expected, "h", second["index"]))
    assert len(sent) == 2  # the states are reused for every unit

    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    png = page.locator("#hood").screenshot(path=str(tmp_path / "hood.png"))
    seen = colours_in(png)
    assert len(seen) > 20  # text, legend, bars: not blank
    painted = {rgb(css) for css in word_backgrounds(page)}
    assert len(painted) >= 3
    # every word's colour is on the screenshot (within rounding), not only in the DOM
    near = lambda c: any(max(abs(a - b) for a, b in zip(c, s)) <= 2 for s in seen)  # noqa: E731
    assert all(near(c) for c in painted), painted
    assert errors == []


def test_hood_at_phone_width(page, hood_url, photo, expected, tmp_path):
    errors = collect_errors(page)
    page.set_viewport_size(PHONE)
    page.goto(hood_url + "/")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#hood", state="visible", timeout=30_000)
    page.locator("#hood summary").click()  # a tap
    page.wait_for_selector("#cell-words span", timeout=30_000)
    page.wait_for_selector("#preview", state="visible")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    for selector in ("#hood", "#unit", "#gates", "#preview"):
        box = page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (selector, box)
    assert page.locator("#unit").bounding_box()["height"] >= 44  # a tap target
    assert page.locator("#gates tbody tr").count() == len(expected.words)
    assert page.locator("#hood").bounding_box()["y"] > page.locator("#preview").bounding_box()["y"]  # stacked
    png = page.screenshot(path=str(tmp_path / "phone-hood.png"), full_page=True)
    assert {rgb(css) for css in word_backgrounds(page)} and len(colours_in(png)) > 20
    assert errors == []


def test_hood_stays_hidden_for_a_model_without_units(page, hood_url, photo):
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url))
    page.route("**/v1/models", lambda route: route.fulfill(
        json={"default": "default", "models": [{"name": "default", "cells": False}]}))
    sent = caption_requests(page)
    page.goto(hood_url + "/")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#words span", timeout=30_000)
    page.wait_for_load_state("networkidle")
    assert not page.is_visible("#hood")
    assert not any(url.endswith("/cells") for url in asked)
    assert len(sent) == 1 and field(sent[0], "output_hidden_states") is None


def test_hood_without_gates_shows_the_values_only(page, hood_url, photo, expected, units):
    """ONNX Runtime records h and c but no gates: the gate columns go, the colours stay."""
    sequence = expected.to_dict()
    del sequence["hidden_states"]["gates"]

    def without_gates(route) -> None:  # the panel's request answered as ONNX Runtime would
        if field(route.request.post_data_buffer or b"", "output_hidden_states") != "true":
            route.continue_()
            return
        route.fulfill(json={"model_name": "default", "images": [{"index": 0, "sequences": [sequence]}]})

    page.route("**/v1/captions", without_gates)
    page.goto(hood_url + "/")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#hood", state="visible", timeout=30_000)
    open_with_keyboard(page)
    page.wait_for_selector("#cell-words span", timeout=30_000)
    assert_values(shown_values(page, "#cell-words span"), reading_aligned(expected, "c", units[0]["index"]))
    assert not page.is_visible("#gates th.gate") and page.is_visible("#gates tbody td")
