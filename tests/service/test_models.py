"""Several models in one service, chosen per request, and replaced while requests are in flight."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from captioner.checkpoint import file_sha256
from tests.conftest import make_photo
from tests.service.conftest import assert_problem


@pytest.fixture
def two_models(make_app, tiny_checkpoint, other_checkpoint, tmp_path):
    """An app serving `a` (the tiny model, from a copy we may replace) and `b` (the other one)."""
    served = tmp_path / "a.pt"
    shutil.copy(tiny_checkpoint, served)
    app = make_app(checkpoint=None, models=[f"a={served}", f"b={other_checkpoint}"], max_wait_ms=1.0)
    return app, served


def caption(client, photo: bytes, **fields):
    query = "&".join(f"{k}={v}" for k, v in {"max_new_tokens": 6, **fields}.items())
    return client.post(f"/v1/captions?{query}", data=photo, content_type="image/jpeg")


def test_models_are_listed_with_their_checkpoints(two_models, tiny_checkpoint, other_checkpoint):
    app, _ = two_models
    body = app.test_client().get("/v1/models").get_json()
    assert body["default"] == "a"
    listed = {m["name"]: m for m in body["models"]}
    assert list(listed) == ["a", "b"]
    assert listed["a"]["checkpoint_sha256"] == file_sha256(tiny_checkpoint)
    assert listed["b"]["checkpoint_sha256"] == file_sha256(other_checkpoint)
    assert listed["b"]["backbone"] == "efficientnet_lite0"
    assert listed["a"]["reloads"] == 0 and listed["a"]["last_reload_error"] is None
    card = app.test_client().get("/v1/model?model=b").get_json()
    assert card["name"] == "b" and card["provenance"]["note"] == "other test model"


def test_each_request_says_which_model_answered(two_models, other_checkpoint, tiny_captioner):
    app, _ = two_models
    client = app.test_client()
    photo = make_photo(seed=5)
    default = caption(client, photo)
    chosen = caption(client, photo, model="b")
    assert default.status_code == chosen.status_code == 200
    assert default.get_json()["model_name"] == default.headers["X-Captioner-Model"] == "a"
    assert chosen.get_json()["model_name"] == chosen.headers["X-Captioner-Model"] == "b"
    assert chosen.headers["X-Captioner-Checkpoint"] == chosen.get_json()["checkpoint_sha256"] \
        == file_sha256(other_checkpoint)
    assert default.get_json()["images"][0]["caption"] == tiny_captioner.caption(photo, max_new_tokens=6).text
    assert chosen.get_json()["images"][0]["caption"] != default.get_json()["images"][0]["caption"]
    body = assert_problem(caption(client, photo, model="nope"), 422)
    assert "nope" in body["detail"] and "a, b" in body["detail"]


def test_reload_serves_the_new_file_without_failing_requests_in_flight(two_models, other_checkpoint):
    app, served = two_models
    client = app.test_client()
    photo = make_photo(seed=6)
    before = caption(client, photo).get_json()
    unchanged = client.post("/v1/models/a/reload").get_json()
    assert unchanged["changed"] is False

    stop, statuses, models = threading.Event(), [], set()

    def load() -> None:
        own = app.test_client()
        while not stop.is_set():
            response = caption(own, photo)
            statuses.append(response.status_code)
            models.add(response.headers.get("X-Captioner-Checkpoint"))

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load) for _ in range(4)]
        shutil.copy(other_checkpoint, str(served) + ".tmp")  # replaced the way deployments do: rename
        (served.parent / (served.name + ".tmp")).rename(served)
        report = client.post("/v1/models/a/reload")
        for _ in range(20):  # a few answers from the new version too
            caption(client, photo)
        stop.set()
        for future in futures:
            future.result()
    assert report.status_code == 200, report.data
    report = report.get_json()
    assert report["changed"] is True and report["checkpoint_sha256"] == file_sha256(other_checkpoint)
    assert report["previous_sha256"] == before["checkpoint_sha256"] and report["reload_s"] > 0
    assert statuses and set(statuses) == {200}
    assert models == {before["checkpoint_sha256"], report["checkpoint_sha256"]} or \
        models == {report["checkpoint_sha256"]}
    after = caption(client, photo).get_json()
    assert after["checkpoint_sha256"] == file_sha256(other_checkpoint)
    listed = {m["name"]: m for m in client.get("/v1/models").get_json()["models"]}
    assert listed["a"]["reloads"] == 1


def test_a_checkpoint_that_does_not_load_keeps_the_old_one(two_models):
    app, served = two_models
    client = app.test_client()
    photo = make_photo(seed=7)
    before = caption(client, photo).get_json()
    served.write_bytes(b"not a checkpoint")
    body = assert_problem(client.post("/v1/models/a/reload"), 422)
    assert str(served) in body["detail"] and before["checkpoint_sha256"] in body["detail"]
    after = caption(client, photo)
    assert after.status_code == 200
    assert after.get_json()["checkpoint_sha256"] == before["checkpoint_sha256"]
    assert after.get_json()["images"][0]["caption"] == before["images"][0]["caption"]
    listed = {m["name"]: m for m in client.get("/v1/models").get_json()["models"]}
    assert "did not load" in listed["a"]["last_reload_error"]
    assert_problem(client.post("/v1/models/nope/reload"), 404)


def test_reload_needs_the_api_key(make_app, tiny_checkpoint):
    app = make_app(api_keys=["secret"], warmup=False)
    client = app.test_client()
    assert_problem(client.post("/v1/models/default/reload"), 401)
    ok = client.post("/v1/models/default/reload", headers={"Authorization": "Bearer secret"})
    assert ok.status_code == 200 and ok.get_json()["changed"] is False


def test_bad_model_settings_are_refused(make_app, tiny_checkpoint):
    for models in (["a"], [f"a b={tiny_checkpoint}"], [f"a={tiny_checkpoint}", f"a={tiny_checkpoint}"]):
        with pytest.raises(ValueError):
            make_app(checkpoint=None, models=models, warmup=False)
    with pytest.raises(ValueError, match="not both"):
        make_app(models=[f"a={tiny_checkpoint}"], warmup=False)
