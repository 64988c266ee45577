"""A real gunicorn process (service/gunicorn.conf.py: two workers forked from a master that
imports only the libraries, whose metrics /metrics sums) on a free loopback port."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_photo
from tests.service.gunicorn_server import gunicorn

pytestmark = pytest.mark.integration  # a real gunicorn

CLIENTS = 32


@pytest.fixture(scope="module")
def server(tiny_checkpoint: str, tmp_path_factory):
    """-> (url, process, log, temp): `temp` is the server's TMPDIR, where the configuration makes
    the folders its workers share."""
    log = tmp_path_factory.mktemp("gunicorn") / "server.log"
    temp = tmp_path_factory.mktemp("server-tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(temp))
        with gunicorn(log, CHECKPOINT=tiny_checkpoint, WORKERS="2", THREADS=str(CLIENTS), MAX_WAIT_MS="20",
                      MAX_BATCH_SIZE="16") as (url, process):
            yield url, process, log, temp


def batch_histogram(url: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("captioner_batch_size"):
                samples[s.name + s.labels.get("le", "")] = s.value
    return samples


def test_32_concurrent_clients_are_answered_correctly_in_shared_batches(server, tiny_captioner):
    url, *_ = server
    before = batch_histogram(url)
    photos = [make_photo(seed=100 + i) for i in range(CLIENTS)]
    expected = [r.text for r in tiny_captioner.caption(photos, num_beams=1, max_new_tokens=8)]
    barrier = threading.Barrier(CLIENTS)

    def client(i: int) -> tuple[int, str]:
        with requests.Session() as session:
            barrier.wait(30)
            response = session.post(f"{url}/v1/captions", params={"num_beams": 1, "max_new_tokens": 8},
                                    data=photos[i], headers={"Content-Type": "image/jpeg"}, timeout=120)
        return response.status_code, response.json()["images"][0]["caption"]

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(client, range(CLIENTS)))
    assert [status for status, _ in answers] == [200] * CLIENTS
    assert [caption for _, caption in answers] == expected  # each client got its own image's caption
    after = batch_histogram(url)
    images = after["captioner_batch_size_sum"] - before.get("captioner_batch_size_sum", 0)
    batches = after["captioner_batch_size_count"] - before.get("captioner_batch_size_count", 0)
    singles = after["captioner_batch_size_bucket1.0"] - before.get("captioner_batch_size_bucket1.0", 0)
    assert images == CLIENTS
    assert batches < CLIENTS and singles < batches, (batches, singles)  # batches larger than one
    assert after["captioner_batch_size_bucket16.0"] == after["captioner_batch_size_count"]  # none over 16


def test_bad_input_is_answered_and_the_worker_keeps_serving(server):
    url, process, *_ = server
    bad = requests.post(f"{url}/v1/captions", data=b"GIF89a broken", headers={"Content-Type": "image/gif"}, timeout=30)
    assert bad.status_code in (400, 415) and bad.headers["Content-Type"] == "application/problem+json"
    options = requests.post(f"{url}/v1/captions?num_beams=99", data=make_photo(),
                            headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert options.status_code == 422
    huge = requests.post(f"{url}/v1/captions", data=b"\0" * (10 * 1024 * 1024 + 10),
                         headers={"Content-Type": "image/png"}, timeout=30)
    assert huge.status_code == 413
    missing = requests.get(f"{url}/nowhere", timeout=10)
    assert missing.status_code == 404 and missing.json()["status"] == 404
    good = requests.post(f"{url}/v1/captions", data=make_photo(), headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert good.status_code == 200
    assert process.poll() is None


def test_sigterm_stops_the_server_and_removes_its_shared_folders(server):
    url, process, log, temp = server
    assert sorted(p.name.rsplit("-", 1)[0] for p in temp.iterdir()) == ["captioner-metrics", "captioner-runtime"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, log.read_text()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=2)
    assert list(temp.iterdir()) == []  # made for this run: none is left in /tmp
