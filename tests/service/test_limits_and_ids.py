"""Rate limits per API key or client address (shared by a server's workers), request ids, and the
one JSON access-log line per request."""

from __future__ import annotations

import json
import logging
import multiprocessing

import pytest

from service.ratelimit import TokenBuckets, parse_rate_limit
from tests.conftest import make_photo
from tests.service.conftest import assert_problem
from tests.service.test_api import metric_samples


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_the_burst_then_the_rate():
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("alice")[0] for _ in range(4)] == [True, True, True, False]
    allowed, wait = buckets.take("alice")
    assert not allowed and wait == pytest.approx(0.5)
    assert buckets.take("bob")[0]  # every client has its own bucket
    clock.now += 0.5
    assert buckets.take("alice")[0] and not buckets.take("alice")[0]
    clock.now += 100  # refills up to the burst, no further
    assert [buckets.take("alice")[0] for _ in range(4)] == [True, True, True, False]


def test_many_clients_fit_in_a_fixed_table():
    clock = Clock()
    buckets = TokenBuckets(rate=1.0, burst=1, slots=16, clock=clock)
    for index in range(200):  # more clients than slots: the idlest slot is reused
        clock.now += 1
        assert buckets.take(f"client-{index}")[0]
    assert not buckets.take("client-199")[0]  # the latest client kept its (empty) bucket


def _drain_tokens(path: str, tries: int, results) -> None:
    buckets = TokenBuckets(rate=0.001, burst=10, path=path)
    results.put(sum(buckets.take("shared-key")[0] for _ in range(tries)))


def test_workers_share_one_limit_through_the_file(tmp_path):
    path = str(tmp_path / "rate-limits.bin")
    results = multiprocessing.get_context("fork").Queue()
    processes = [multiprocessing.get_context("fork").Process(target=_drain_tokens, args=(path, 10, results))
                 for _ in range(3)]
    for process in processes:
        process.start()
    allowed = sum(results.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(30)
    assert allowed == 10  # one bucket of 10 for all three processes, not 30


def test_rate_limit_settings_are_parsed():
    assert parse_rate_limit("") is None
    assert parse_rate_limit("5") == (5.0, 5.0)
    assert parse_rate_limit("0.5") == (0.5, 1.0)
    assert parse_rate_limit("2, 10") == (2.0, 10.0)
    for bad in ("fast", "0", "-1,3", "1,0", "nan", "inf"):
        with pytest.raises(ValueError):
            parse_rate_limit(bad)


def test_the_service_answers_429_with_retry_after_per_key(make_app):
    app = make_app(api_keys=["k1", "k2"], rate_limit="0.01,2", warmup=False)
    client = app.test_client()
    photo = make_photo(seed=9)

    def post(key: str):
        return client.post("/v1/captions?max_new_tokens=3", data=photo, content_type="image/jpeg",
                           headers={"Authorization": f"Bearer {key}"})

    assert [post("k1").status_code for _ in range(2)] == [200, 200]
    limited = post("k1")
    body = assert_problem(limited, 429)
    assert int(limited.headers["Retry-After"]) >= 1 and body["request_id"] == limited.headers["X-Request-ID"]
    assert post("k2").status_code == 200  # another key, another bucket
    assert_problem(client.post("/v1/captions", data=photo, content_type="image/jpeg"), 401)  # not counted
    assert metric_samples(client)[("captioner_rejected_total", (("reason", "rate_limit"),))] == 1
    assert client.get("/healthz").status_code == 200  # probes are never limited


def test_without_keys_the_limit_is_per_client_address(make_app):
    app = make_app(rate_limit="0.01,1", warmup=False)
    client = app.test_client()
    assert client.get("/v1/models").status_code == 200
    assert_problem(client.get("/v1/models"), 429)
    other = client.get("/v1/models", environ_base={"REMOTE_ADDR": "10.0.0.2"})
    assert other.status_code == 200


def test_request_ids_are_echoed_sanitised_or_made(client):
    given = client.get("/v1/models", headers={"X-Request-ID": "abc-123.x"})
    assert given.headers["X-Request-ID"] == "abc-123.x"
    made = client.get("/v1/models")
    assert len(made.headers["X-Request-ID"]) == 32
    dirty = client.get("/v1/models", headers={"X-Request-ID": "a b\"<script>" + "x" * 500})
    cleaned = dirty.headers["X-Request-ID"]
    assert cleaned.startswith("abscript") and len(cleaned) == 128
    problem = client.post("/v1/captions", data=b"", content_type="image/jpeg", headers={"X-Request-ID": "bad-1"})
    assert assert_problem(problem, 415)["request_id"] == "bad-1" == problem.headers["X-Request-ID"]


def test_one_json_access_line_per_request(client, caplog):
    photo = make_photo(seed=10)
    with caplog.at_level(logging.INFO, logger="captioner.access"):
        client.post("/v1/captions?max_new_tokens=3", data=photo, content_type="image/jpeg",
                    headers={"X-Request-ID": "trace-7"})
        client.get("/nowhere", headers={"X-Request-ID": "trace-8"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "captioner.access"]
    assert [line["request_id"] for line in lines] == ["trace-7", "trace-8"]
    ok, missing = lines
    assert ok["method"] == "POST" and ok["route"] == "/v1/captions" and ok["status"] == 200
    assert ok["model"] == "default" and ok["images"] == 1 and ok["batch_size"] >= 1 and ok["latency_ms"] > 0
    assert missing["status"] == 404 and missing["route"] == "(unmatched)" and "images" not in missing
