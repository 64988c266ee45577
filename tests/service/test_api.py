"""Every route and every error through the Flask test client."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import sys
import threading
import time

import pytest
import torch
from openapi_spec_validator import validate
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from captioner.decoding import DecodeConfig
from service.app import GIL_SWITCH_INTERVAL_S, PYTHON_SWITCH_INTERVAL_S
from service.config import ServiceConfig
from tests.conftest import make_photo
from tests.service.conftest import assert_problem


def metric_samples(client) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").get_data(as_text=True)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# -- captions -----------------------------------------------------------------------------------

def test_raw_image_gives_the_library_caption(client, tiny_captioner):
    photo = make_photo(seed=5)
    response = client.post("/v1/captions?num_beams=3&num_return_sequences=3", data=photo,
                           content_type="image/jpeg")
    assert response.status_code == 200
    body = response.get_json()
    expected = tiny_captioner.caption(photo, num_beams=3, num_return_sequences=3)
    [image] = body["images"]
    assert image["caption"] == expected.text
    assert [s["text"] for s in image["sequences"]] == [s.text for s in expected.sequences]
    assert [s["log_prob"] for s in image["sequences"]] == pytest.approx([s.log_prob for s in expected.sequences])
    scores = [s["score"] for s in image["sequences"]]
    assert scores == sorted(scores, reverse=True)
    assert body["model"].startswith("captioner-efficientnet_lite0-")
    assert body["options"]["num_beams"] == 3
    assert set(body["timings_ms"]) == {"preprocess", "queue", "inference", "total"}
    assert "attention" not in image["sequences"][0]
    # the library's one JSON shape of a result, with the image's place in the request
    assert image.keys() == {"index", "filename", *expected.to_dict()}
    assert image["sequences"][0].keys() == expected.sequences[0].to_dict().keys()


def test_multipart_images_and_form_options(client, tiny_captioner):
    photos = [make_photo(seed=s) for s in (1, 2, 3)]
    data = {"image": [(io.BytesIO(p), f"p{i}.jpg", "image/jpeg") for i, p in enumerate(photos)],
            "num_beams": "2", "max_new_tokens": "5"}
    response = client.post("/v1/captions", data=data, content_type="multipart/form-data")
    assert response.status_code == 200, response.data
    body = response.get_json()
    expected = tiny_captioner.caption(photos, num_beams=2, max_new_tokens=5)
    assert [i["caption"] for i in body["images"]] == [e.text for e in expected]
    assert [i["filename"] for i in body["images"]] == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert [i["index"] for i in body["images"]] == [0, 1, 2]
    assert all(len(i["sequences"][0]["words"]) <= 5 for i in body["images"])


def test_attention_grids_are_distributions(client, app):
    response = client.post("/v1/captions?return_attention=true&num_beams=1", data=make_photo(),
                           content_type="image/jpeg")
    seq = response.get_json()["images"][0]["sequences"][0]
    grid = torch.tensor(seq["attention"])
    h, w = app.extensions["captioner"].models.get().model.encoder.grid_size
    assert list(grid.shape) == seq["attention_shape"] == [len(seq["words"]) + int(seq["finished"]), h, w]
    assert torch.allclose(grid.sum(dim=(1, 2)), torch.ones(grid.shape[0]), atol=2e-3)


def test_hidden_states_are_opt_in_and_bounded(client, app):
    """output_hidden_states=true: h, c and the four gates per word (then <eos>) of the returned
    sequence, D numbers each; absent by default; a request that would return too many is a 422."""
    plain = client.post("/v1/captions?num_beams=1", data=make_photo(), content_type="image/jpeg").get_json()
    assert "hidden_states" not in plain["images"][0]["sequences"][0]
    response = client.post("/v1/captions?num_beams=1&output_hidden_states=true", data=make_photo(),
                           content_type="image/jpeg")
    seq = response.get_json()["images"][0]["sequences"][0]
    steps = len(seq["words"]) + int(seq["finished"])
    hidden_dim = app.extensions["captioner"].models.get().model.decoder.config.hidden_dim
    states = seq["hidden_states"]
    for matrix in (states["h"], states["c"], *states["gates"].values()):
        assert torch.tensor(matrix).shape == (steps, hidden_dim)
    assert set(states["gates"]) == {"i", "f", "g", "o"}
    gates = torch.tensor(states["gates"]["f"])
    assert bool(((gates >= 0) & (gates <= 1)).all())  # a sigmoid gate
    too_many = client.post("/v1/captions?num_beams=4&num_return_sequences=4&max_new_tokens=100"
                           "&output_hidden_states=true", data=make_photo(), content_type="image/jpeg")
    assert too_many.status_code == 422 and "output_hidden_states" in too_many.get_json()["detail"]


def test_sampling_with_seed_is_reproducible(client):
    url = "/v1/captions?do_sample=true&num_beams=1&seed=7&num_return_sequences=2&temperature=1.5"
    first = client.post(url, data=make_photo(), content_type="image/jpeg").get_json()
    again = client.post(url, data=make_photo(), content_type="image/jpeg").get_json()
    assert first["images"] == again["images"]


def test_attention_png_has_one_panel_per_word(client):
    response = client.post("/v1/captions/attention.png?num_beams=1&max_new_tokens=6", data=make_photo(),
                           content_type="image/jpeg")
    assert response.status_code == 200 and response.mimetype == "image/png"
    words = response.headers["X-Caption"].split()
    sheet = Image.open(io.BytesIO(response.data))
    panels = len(words) + 1  # the input, then one per word
    assert sheet.width == min(5, panels) * 224
    assert sheet.height == -(-panels // 5) * (224 + 18)


def test_attention_png_needs_exactly_one_image(client):
    data = {"image": [(io.BytesIO(make_photo()), "a.jpg"), (io.BytesIO(make_photo()), "b.jpg")]}
    assert_problem(client.post("/v1/captions/attention.png", data=data, content_type="multipart/form-data"), 400)


# -- the other routes ---------------------------------------------------------------------------

def test_model_card(client, tiny_checkpoint):
    body = client.get("/v1/model").get_json()
    with open(tiny_checkpoint, "rb") as handle:
        assert body["checkpoint_sha256"] == hashlib.sha256(handle.read()).hexdigest()
    assert body["backbone"] == "efficientnet_lite0"
    assert body["attention"] is True
    assert body["vocabulary_size"] == 20
    assert body["provenance"] == {"note": "test model"}
    assert body["metrics"] == {}


def test_health_and_readiness(client, make_app):
    assert client.get("/healthz").get_json() == {"status": "alive"}
    assert client.get("/readyz").get_json()["status"] == "ready"
    closing = make_app(warmup=False)
    closing.extensions["captioner"].close()
    assert_problem(closing.test_client().get("/readyz"), 503)


def test_the_service_asks_for_the_gil_back_soon(make_app):
    """The batching thread's word steps wait on the request threads' Python at most this long
    (Python's default, 5 ms, cost a fifth of the requests/s at 16 clients)."""
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        state = make_app(warmup=False).extensions["captioner"]
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
        assert GIL_SWITCH_INTERVAL_S <= 0.0005 < PYTHON_SWITCH_INTERVAL_S  # the drain's check below tells them apart
        state.begin_drain()  # the drain's accept-then-close runs at Python's own interval
        assert sys.getswitchinterval() == pytest.approx(PYTHON_SWITCH_INTERVAL_S)
    finally:
        sys.setswitchinterval(before)


def test_metrics_count_requests_batches_and_latency(client):
    client.post("/v1/captions", data=make_photo(), content_type="image/jpeg")
    client.get("/no/such/route")
    samples = metric_samples(client)
    ok = ("captioner_http_requests_total", (("method", "POST"), ("route", "/v1/captions"), ("status", "200")))
    missing = ("captioner_http_requests_total", (("method", "GET"), ("route", "(unmatched)"), ("status", "404")))
    assert samples[ok] >= 1 and samples[missing] >= 1
    assert samples[("captioner_http_request_duration_seconds_count", (("route", "/v1/captions"),))] >= 1
    assert samples[("captioner_batch_size_count", ())] >= 1
    assert samples[("captioner_inference_seconds_count", ())] >= 1
    assert ("captioner_queue_depth", ()) in samples
    assert samples[("captioner_ready", ())] == 1


def test_openapi_document_is_valid_3_1_and_lists_every_option(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.1")
    validate(spec)  # raises on an invalid document
    names = {p["name"] for p in spec["paths"]["/v1/captions"]["post"]["parameters"]}
    assert names == set(DecodeConfig.__dataclass_fields__) | {"model", "X-Request-ID"}
    assert {"/v1/captions", "/v1/captions/attention.png", "/v1/model", "/v1/models", "/v1/models/{name}/reload",
            "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])


def test_openapi_and_the_http_parser_read_each_options_own_description_and_bounds(client):
    spec = client.get("/openapi.json").get_json()
    parameters = {p["name"]: p for p in spec["paths"]["/v1/captions"]["post"]["parameters"]}
    for field in dataclasses.fields(DecodeConfig):
        parameter, meta = parameters[field.name], field.metadata
        assert parameter["description"] == meta["help"]
        if meta["minimum"] is None:
            continue
        schema = parameter["schema"]
        low = schema.get("exclusiveMinimum", schema.get("minimum"))
        assert (low, schema["maximum"]) == (meta["minimum"], meta["maximum"])
        # a value past the documented bounds is a 422 naming the option
        body = assert_problem(client.post(f"/v1/captions?{field.name}={schema['maximum'] * 2 + 1}",
                                          data=make_photo(), content_type="image/jpeg"), 422)
        assert field.name in body["detail"]


def test_docs_page_and_web_page(client):
    docs = client.get("/docs/")
    assert docs.status_code == 200 and b"/openapi.json" in docs.data
    assert client.get("/docs/swagger-ui-bundle.js").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and b"/static/app.js" in page.data
    assert client.get("/static/app.js").status_code == 200


# -- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("query, fragment", [
    ("num_beams=0", "num_beams"),
    ("num_beams=17", "num_beams"),
    ("num_beams=three", "integer"),
    ("num_beams=2.5", "integer"),
    ("temperature=nan", "finite"),
    ("temperature=0", "temperature"),
    ("top_p=1.5", "top_p"),
    ("do_sample=maybe", "true or false"),
    ("num_beams=2&num_return_sequences=3", "num_return_sequences"),
    ("do_sample=true&num_beams=3", "num_beams=1"),
    ("max_new_tokens=101", "max_new_tokens"),
    ("colour=blue", "unknown option"),
    ("num_beams=1&num_beams=2", "more than once"),
])
def test_bad_options_are_422(client, query, fragment):
    body = assert_problem(client.post(f"/v1/captions?{query}", data=make_photo(), content_type="image/jpeg"), 422)
    assert fragment in body["detail"]


def test_bad_option_in_form_field_is_422(client):
    data = {"image": (io.BytesIO(make_photo()), "a.jpg"), "top_k": "-1"}
    assert_problem(client.post("/v1/captions", data=data, content_type="multipart/form-data"), 422)


def test_body_over_the_limit_is_413(make_app):
    small = make_app(max_body_bytes=50_000, warmup=False).test_client()
    big = make_photo(1200, 900, seed=4, fmt="PNG")
    assert len(big) > 50_000
    body = assert_problem(small.post("/v1/captions", data=big, content_type="image/png"), 413)
    assert "50000" in body["detail"]
    data = {"image": (io.BytesIO(big), "big.png")}
    assert_problem(small.post("/v1/captions", data=data, content_type="multipart/form-data"), 413)
    assert small.post("/v1/captions", data=make_photo(64, 48), content_type="image/jpeg").status_code == 200


def test_default_body_limit_is_ten_megabytes(client):
    assert_problem(client.post("/v1/captions", data=b"\0" * (10 * 1024 * 1024 + 1), content_type="image/png"), 413)


def test_too_many_pixels_is_413(make_app):
    strict = make_app(max_pixels=320 * 240 - 1, warmup=False).test_client()
    body = assert_problem(strict.post("/v1/captions", data=make_photo(320, 240), content_type="image/jpeg"), 413)
    assert "megapixels" in body["detail"]


def test_too_many_images_is_413(client):
    data = {"image": [(io.BytesIO(b"x"), f"{i}.jpg") for i in range(17)]}
    assert_problem(client.post("/v1/captions", data=data, content_type="multipart/form-data"), 413)


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", ""])
def test_unsupported_content_type_is_415(client, content_type):
    assert_problem(client.post("/v1/captions", data=make_photo(), content_type=content_type), 415)


def test_multipart_without_an_image_file_is_400(client):
    assert_problem(client.post("/v1/captions", data={"num_beams": "2"}, content_type="multipart/form-data"), 400)
    # A URL or a path where an image belongs is neither fetched nor read.
    data = {"image": "/etc/passwd"}
    assert_problem(client.post("/v1/captions", data=data, content_type="multipart/form-data"), 400)
    data = {"photo": (io.BytesIO(make_photo()), "a.jpg")}
    assert_problem(client.post("/v1/captions", data=data, content_type="multipart/form-data"), 400)


def test_a_url_as_the_body_is_not_fetched(client):
    body = assert_problem(client.post("/v1/captions", data=b"http://127.0.0.1:9/cat.jpg", content_type="image/jpeg"), 415)
    assert "not an image" in body["detail"]


def test_multipart_error_names_the_image(client):
    data = {"image": [(io.BytesIO(make_photo()), "ok.jpg"), (io.BytesIO(b"nope"), "bad.jpg")]}
    body = assert_problem(client.post("/v1/captions", data=data, content_type="multipart/form-data"), 415)
    assert body["detail"].startswith("image 1:")


def test_unknown_route_is_404_and_wrong_method_405(client):
    assert_problem(client.get("/v2/captions"), 404)
    response = client.get("/v1/captions")
    assert_problem(response, 405)
    assert "POST" in response.headers["Allow"]


# -- security -----------------------------------------------------------------------------------

def test_api_keys(make_app):
    secured = make_app(api_keys=["k1-secret", "k2-secret"], warmup=False).test_client()
    photo = make_photo()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic k1-secret"},
                    {"Authorization": "Bearer "}):
        response = secured.post("/v1/captions", data=photo, content_type="image/jpeg", headers=headers)
        assert_problem(response, 401)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert_problem(secured.get("/v1/model"), 401)
    for key in ("k1-secret", "k2-secret"):
        ok = secured.post("/v1/captions", data=photo, content_type="image/jpeg",
                          headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
    assert secured.get("/healthz").status_code == 200


def test_cors_is_off_unless_configured(client, make_app):
    response = client.get("/v1/model", headers={"Origin": "https://example.org"})
    assert "Access-Control-Allow-Origin" not in response.headers
    open_app = make_app(cors_origins=["https://example.org"], warmup=False).test_client()
    allowed = open_app.get("/v1/model", headers={"Origin": "https://example.org"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://example.org"
    other = open_app.get("/v1/model", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    preflight = open_app.options("/v1/captions", headers={"Origin": "https://example.org",
                                                          "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 204
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]


# -- the queue and the deadline -----------------------------------------------------------------

def _block_inference(app):
    """Make the model wait for `release`; returns (entered, release)."""
    batcher = app.extensions["captioner"].models.get().batcher
    entered, release = threading.Event(), threading.Event()
    real = batcher.infer

    def slow(pixels, config):
        entered.set()
        release.wait(10)
        return real(pixels, config)

    batcher.infer = slow
    return entered, release


def test_full_queue_answers_503_at_once(make_app):
    app = make_app(max_queue=1, max_images_per_request=1, max_batch_size=1, warmup=False)
    entered, release = _block_inference(app)
    statuses: list[int] = []

    def post() -> None:
        statuses.append(app.test_client().post("/v1/captions?max_new_tokens=2", data=make_photo(),
                                               content_type="image/jpeg").status_code)

    running = threading.Thread(target=post)
    running.start()
    assert entered.wait(10)  # the first image is being captioned
    queued = threading.Thread(target=post)
    queued.start()
    deadline = time.monotonic() + 10
    while app.extensions["captioner"].models.get().batcher.depth < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    response = app.test_client().post("/v1/captions", data=make_photo(), content_type="image/jpeg")
    assert time.monotonic() - started < 2
    assert_problem(response, 503)
    assert response.headers["Retry-After"] == "1"
    release.set()
    running.join(10)
    queued.join(10)
    assert statuses == [200, 200]
    assert metric_samples(app.test_client())[("captioner_rejected_total", (("reason", "queue_full"),))] == 1


def test_request_deadline_answers_503(make_app):
    app = make_app(request_timeout_s=0.3, warmup=False)
    entered, release = _block_inference(app)
    try:
        started = time.monotonic()
        response = app.test_client().post("/v1/captions", data=make_photo(), content_type="image/jpeg")
        assert_problem(response, 503)
        assert "deadline" in response.get_json()["detail"]
        assert "Retry-After" in response.headers
        assert time.monotonic() - started < 3
    finally:
        release.set()


# -- configuration ------------------------------------------------------------------------------

def test_config_precedence_defaults_env_overrides():
    env = {"CAPTIONER_MAX_BATCH_SIZE": "4", "CAPTIONER_API_KEYS": "a, b", "CAPTIONER_WARMUP": "false",
           "CAPTIONER_MAX_WAIT_MS": "2.5"}
    config = ServiceConfig.resolve({"max_batch_size": 8}, environ=env)
    assert config.max_batch_size == 8  # test overrides beat the environment
    assert config.api_keys == ["a", "b"] and config.warmup is False and config.max_wait_ms == 2.5
    assert config.max_queue == ServiceConfig().max_queue  # untouched: the default
    with pytest.raises(ValueError, match="CAPTIONER_MAX_QUEUE"):
        ServiceConfig.resolve(environ={"CAPTIONER_MAX_QUEUE": "many"})
    with pytest.raises(ValueError, match="unknown service setting"):
        ServiceConfig.resolve({"max_batch": 3}, environ={})


@pytest.mark.parametrize("route", ["/v1/captions", "/v1/captions/attention.png"])
@pytest.mark.parametrize("beams", [1, 3])
def test_options_that_exhaust_the_vocabulary_still_caption(client, route, beams):
    # Found by the fuzzer: no_repeat_ngram_size=1 with min_new_tokens beyond the 16-word vocabulary
    # left no allowed word; beam search returned no caption (a 500) and greedy emitted <pad>.
    query = f"num_beams={beams}&no_repeat_ngram_size=1&min_new_tokens=30&max_new_tokens=30"
    response = client.post(f"{route}?{query}", data=make_photo(), content_type="image/jpeg")
    assert response.status_code == 200, response.data[:300]
    if route == "/v1/captions":
        seq = response.get_json()["images"][0]["sequences"][0]
        assert seq["finished"] and "<pad>" not in seq["words"]
        assert len(seq["words"]) == len(set(seq["words"]))


def test_force_words_over_http_say_why_and_unknown_words_are_422(client, tiny_captioner):
    photo = make_photo(seed=6)
    response = client.post("/v1/captions?force_words=bike,sofa&num_beams=2", data=photo, content_type="image/jpeg")
    assert response.status_code == 200, response.data
    body = response.get_json()
    [image] = body["images"]
    assert {"bike", "sofa"} <= set(image["sequences"][0]["words"])
    assert [(r["word"], r["source"], r["satisfied"]) for r in image["required"]] == [
        ("bike", "request", True), ("sofa", "request", True)]
    assert image["caption"] == tiny_captioner.caption(photo, num_beams=2, force_words=["bike", "sofa"]).text
    assert body["options"]["force_words"] == ["bike", "sofa"]
    problem = assert_problem(client.post("/v1/captions?force_words=giraffe", data=photo, content_type="image/jpeg"), 422)
    assert "giraffe" in problem["detail"] and "vocabulary" in problem["detail"]
    assert_problem(client.post("/v1/captions?force_words=a,b,c,d", data=photo, content_type="image/jpeg"), 422)
    form = {"image": (io.BytesIO(photo), "p.jpg", "image/jpeg"), "force_words": "bike", "tags": "false"}
    response = client.post("/v1/captions", data=form, content_type="multipart/form-data")
    assert response.status_code == 200 and "bike" in response.get_json()["images"][0]["sequences"][0]["words"]
