"""The web page in real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
pick an image, see the captions, hover a word and see its attention heat map."""

from __future__ import annotations

import shutil
import threading

import pytest
from playwright.sync_api import sync_playwright
from werkzeug.serving import make_server

from tests.conftest import make_photo

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def live_url(app):
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page()
        yield page
        browser.close()


def test_page_captions_an_image_and_shows_attention_per_word(page, live_url, tmp_path, tiny_captioner):
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(make_photo(seed=11))
    expected = tiny_captioner.caption(photo.read_bytes(), num_beams=3, num_return_sequences=3,
                                      return_attention=True)

    page.goto(live_url + "/")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#words span", timeout=30_000)

    words = page.locator("#words span")
    assert [words.nth(i).inner_text() for i in range(words.count())] == expected.sequences[0].words
    assert page.locator("#nbest li").count() == 3
    assert page.locator("#nbest li").first.inner_text().startswith(expected.text)
    assert page.is_visible("#preview")

    def heat_pixels() -> list[int]:
        return page.evaluate("""() => {
            const c = document.getElementById('heat');
            return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
        }""")

    assert set(heat_pixels()[3::4]) == {0}  # nothing drawn before hovering
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
