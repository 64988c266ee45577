"""The web page in real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; the
`chromium` fixture skips without it, and fails under CI=true): pick, drop or paste an image, see
the captions, hover a word and see its attention heat map, at desktop and at phone width."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from typing import Iterator

import pytest
from playwright.sync_api import sync_playwright
from werkzeug.serving import make_server

from tests.conftest import make_photo

pytestmark = pytest.mark.integration  # headless Chromium

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHONE = {"width": 390, "height": 844}  # an iPhone 12-14 in CSS pixels

# Images the page renders that are not (yet) decoded: an empty or broken image on show.
BROKEN_IMAGES = """() => Array.from(document.images)
    .filter((img) => img.getClientRects().length > 0 && !(img.complete && img.naturalWidth > 0))
    .map((img) => img.id || img.src)"""

# Hands the page a file the way the browser does for Ctrl+V ("paste") or a drag and drop ("drop").
DELIVER = """([kind, selector, b64, name, type]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], name, { type }));
    const target = document.querySelector(selector);
    if (kind === "paste") {
        target.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true }));
        return;
    }
    for (const step of ["dragenter", "dragover", "drop"]) {
        target.dispatchEvent(new DragEvent(step, { dataTransfer: data, bubbles: true, cancelable: true }));
    }
}"""


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """The app on a free local port, in a thread, for the browser: -> its URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)


@pytest.fixture(scope="module")
def live_url(app):
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=FLAGS)
        yield context
        context.close()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    yield page
    page.close()


def collect_errors(page) -> list[str]:
    """Script errors and console errors, except the 404 of GET /v1/models on a service that has no
    model list (the page then hides its model selector)."""
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    def on_console(message) -> None:
        if message.type == "error" and not message.location.get("url", "").endswith("/v1/models"):
            errors.append(message.text)

    page.on("console", on_console)
    return errors


def deliver(page, kind: str, data: bytes, name: str, selector: str = "body", type: str = "image/png") -> None:
    page.evaluate(DELIVER, [kind, selector, base64.b64encode(data).decode(), name, type])


def caption_words(page) -> list[str]:
    words = page.locator("#words span")
    return [words.nth(i).inner_text() for i in range(words.count())]


def test_page_captions_an_image_and_shows_attention_per_word(page, live_url, tmp_path, tiny_captioner):
    errors = collect_errors(page)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(make_photo(seed=11))
    expected = tiny_captioner.caption(photo.read_bytes(), num_beams=3, num_return_sequences=3,
                                      return_attention=True)

    page.goto(live_url + "/")
    assert page.evaluate(BROKEN_IMAGES) == [] and not page.is_visible("#preview")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#words span", timeout=30_000)

    assert caption_words(page) == expected.sequences[0].words
    assert page.locator("#nbest li").count() == 3
    assert page.locator("#nbest li").first.inner_text().startswith(expected.text)
    page.wait_for_selector("#preview", state="visible")
    assert page.evaluate(BROKEN_IMAGES) == []

    def heat_pixels() -> list[int]:
        return page.evaluate("""() => {
            const c = document.getElementById('heat');
            return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
        }""")

    assert set(heat_pixels()[3::4]) == {0}  # nothing drawn before hovering
    words = page.locator("#words span")
    words.nth(0).hover()
    assert page.get_attribute("#heat", "data-word") == expected.sequences[0].words[0]
    drawn = heat_pixels()
    assert set(drawn[3::4]) == {255}  # one opaque cell per attention region
    grid = tiny_captioner.encoder.grid_size
    assert page.evaluate("() => [document.getElementById('heat').height, document.getElementById('heat').width]") == list(grid)
    box, image = page.locator("#heat").bounding_box(), page.locator("#preview").bounding_box()
    assert (box["width"], box["height"]) == (image["width"], image["height"])  # laid over the image

    attention = expected.sequences[0].attention[0]  # the hovered word's (H', W') map
    hottest = divmod(int(attention.argmax()), grid[1])
    coldest = divmod(int(attention.argmin()), grid[1])
    red = lambda cell: drawn[4 * (cell[0] * grid[1] + cell[1])]  # noqa: E731
    assert red(hottest) > red(coldest)  # hot regions are drawn red, cold ones blue

    page.mouse.move(0, 0)
    assert page.get_attribute("#heat", "data-word") == ""
    page.screenshot(path=str(tmp_path / "page.png"))
    assert errors == []


def test_page_shows_the_problem_for_a_bad_file(page, live_url, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    page.goto(live_url + "/")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("() => document.getElementById('error').textContent.length > 0", timeout=30_000)
    assert "Unsupported Media Type" in page.inner_text("#error")
    assert page.locator("#words span").count() == 0
    assert page.evaluate(BROKEN_IMAGES) == []  # the undecodable file is not shown as a broken image


@pytest.mark.parametrize("kind, target", [("paste", "body"), ("drop", "h1")])
def test_page_captions_a_pasted_or_dropped_image(page, live_url, tiny_captioner, kind, target):
    errors = collect_errors(page)
    png = make_photo(seed=5, fmt="PNG")
    expected = tiny_captioner.caption(png, num_beams=3, num_return_sequences=3)
    page.goto(live_url + "/")
    deliver(page, kind, png, "clipboard.png", selector=target)  # a drop beside the zone counts too
    page.wait_for_selector("#words span", timeout=30_000)
    assert caption_words(page) == expected.sequences[0].words
    assert [page.locator("#nbest li").nth(i).inner_text().rsplit(" (log-prob", 1)[0] for i in range(3)] == \
        [seq.text for seq in expected.sequences]
    page.wait_for_selector("#preview", state="visible")
    assert page.evaluate("() => document.getElementById('preview').naturalWidth") == 320
    assert errors == []


def test_page_ignores_a_text_paste(page, live_url):
    page.goto(live_url + "/")
    page.evaluate("""() => {
        const data = new DataTransfer();
        data.setData("text/plain", "hello");
        document.body.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true }));
    }""")
    assert page.inner_text("#status") == "" and page.locator("#words span").count() == 0


def test_page_at_phone_width(page, live_url, tmp_path, tiny_captioner):
    """390 px wide: nothing broken or wider than the screen before or after an upload (a pasted
    screenshot), and a tap on a word shows its attention."""
    errors = collect_errors(page)
    page.set_viewport_size(PHONE)
    page.goto(live_url + "/")
    width = "() => document.documentElement.scrollWidth"
    assert page.evaluate(BROKEN_IMAGES) == []
    assert page.evaluate(width) <= PHONE["width"]
    assert page.is_visible("#drop") and page.locator("#drop").bounding_box()["height"] >= 44  # a tap target
    page.screenshot(path=str(tmp_path / "phone-empty.png"), full_page=True)

    photo = make_photo(width=1200, height=900, seed=3, fmt="PNG")  # wider than the screen
    expected = tiny_captioner.caption(photo, num_beams=3, num_return_sequences=3)
    deliver(page, "paste", photo, "image.png")
    page.wait_for_selector("#words span", timeout=30_000)
    page.wait_for_selector("#preview", state="visible")
    assert caption_words(page) == expected.sequences[0].words
    assert page.locator("#nbest li").count() == 3
    assert page.evaluate(BROKEN_IMAGES) == []
    assert page.evaluate(width) <= PHONE["width"]
    image = page.locator("#preview").bounding_box()
    assert image["x"] >= 0 and image["x"] + image["width"] <= PHONE["width"] and image["height"] > 100
    page.locator("#words span").nth(1).click()
    assert page.get_attribute("#heat", "data-word") == expected.sequences[0].words[1]
    page.screenshot(path=str(tmp_path / "phone-captioned.png"), full_page=True)
    assert errors == []


CANNED = {"images": [{"sequences": [{"text": "a cat", "words": ["a", "cat"], "log_prob": -1.5,
                                     "attention": [[[0.5, 0.5]], [[0.9, 0.1]]]}]}],
          "timings_ms": {"total": 3.0}}


@pytest.mark.parametrize("listing", [None, ["tiny"], ["tiny", "big"]])
def test_page_model_selector_follows_get_v1_models(page, live_url, listing):
    """Shown when GET /v1/models lists more than one model, the service's default chosen, and then
    its choice is sent as the `model` form field; hidden, and no field sent, when the list is absent
    (404) or has one model."""
    def models(route) -> None:
        if listing is None:
            route.fulfill(status=404, content_type="application/problem+json",
                          body=json.dumps({"status": 404, "title": "Not Found", "detail": "", "type": "about:blank"}))
        else:
            route.fulfill(json={"default": listing[-1], "models": [{"name": name} for name in listing]})

    sent: list[bytes] = []

    def captions(route) -> None:
        sent.append(route.request.post_data_buffer)
        route.fulfill(json=CANNED)

    page.route("**/v1/models", models)
    page.route("**/v1/captions", captions)
    page.goto(live_url + "/")
    page.wait_for_load_state("networkidle")
    shown = listing is not None and len(listing) > 1
    assert page.is_visible("#model") == shown
    if shown:
        assert page.eval_on_selector_all("#model option", "options => options.map(o => o.value)") == listing
        assert page.input_value("#model") == "big"  # the default
        page.select_option("#model", "tiny")
    deliver(page, "paste", make_photo(fmt="PNG"), "image.png")
    page.wait_for_selector("#words span")
    assert caption_words(page) == ["a", "cat"]
    assert (b'name="model"\r\n\r\ntiny\r\n' in sent[0]) == shown
    assert (b'name="model"' in sent[0]) == shown
