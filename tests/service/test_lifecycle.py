"""A real gunicorn under a bounded load of concurrent clients: SIGTERM drains (503 from /readyz at
once, answers for the drain period, then the socket closes), a rolling restart (SIGHUP to the
master) and a model reload fail no request; after an upgrade in place (USR2) the new master
serves on once the old one stopped. Each test prints what its clients got."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import requests

from captioner.checkpoint import file_sha256
from tests.conftest import make_photo
from tests.service.gunicorn_server import Load, gunicorn, needs_socket_filters, post, wait_until, workers

pytestmark = pytest.mark.integration  # a real gunicorn under load

CLIENTS = 6
DRAIN_S = 2.0


def state(load: Load, log: Path) -> str:
    """What the clients got and the end of the server's log, for a failure message."""
    return f"{dict(load.outcomes)}\n{log.read_text()[-3000:]}"


@needs_socket_filters  # else a reset is possible: the drain then has no last step
def test_sigterm_drains_then_closes_without_resetting_a_request(tiny_checkpoint, tmp_path):
    photo = make_photo(seed=21)
    log = tmp_path / "server.log"
    with gunicorn(log, CHECKPOINT=tiny_checkpoint, WORKERS="2", THREADS="16", DRAIN_S=str(DRAIN_S)) as (url, master):
        with Load(url, photo, CLIENTS, until_refused=True) as load:
            wait_until(lambda: load.total >= 2 * CLIENTS, 60, lambda: state(load, log))  # every client going
            before = load.total
            signalled = time.monotonic()
            master.send_signal(signal.SIGTERM)
            while True:  # when the first /readyz that says 503 was asked
                asked = time.monotonic()
                ready = requests.get(f"{url}/readyz", timeout=5)
                if ready.status_code != 200:
                    break
                assert asked - signalled < 5, "/readyz still says ready 5 s after SIGTERM"
                time.sleep(0.01)
            readyz_s = asked - signalled
            served_while_draining, drain_headers = post(url, photo)
            assert master.wait(60) == 0, log.read_text()
            stopped_s = time.monotonic() - signalled
            load.stop()
        print(f"\nSIGTERM under {CLIENTS} clients: {dict(load.outcomes)} ({before} before the signal); "
              f"/readyz 503 after {readyz_s * 1000:.0f} ms; stopped {stopped_s:.1f} s after SIGTERM")
        assert ready.status_code == 503 and ready.headers.get("Retry-After")
        assert readyz_s < 0.5  # at once, long before the drain ends
        assert served_while_draining == "200" and drain_headers.get("Connection") == "close"
        assert load.failures == 0, (dict(load.outcomes), load.refusals, log.read_text()[-3000:])
        assert load.outcomes["refused"] == CLIENTS  # every client ended on a closed socket, none on a reset
        assert "new connections are refused" in log.read_text()  # the last close could reset none
        assert DRAIN_S <= stopped_s < DRAIN_S + 20
        assert post(url, photo)[0] == "refused"


def test_rolling_restart_and_model_reload_fail_no_request(tiny_checkpoint, other_checkpoint, tmp_path):
    served = tmp_path / "served.pt"
    shutil.copy(tiny_checkpoint, served)
    photo = make_photo(seed=22)
    log = tmp_path / "server.log"
    with gunicorn(log, MODELS=f"main={served}", WORKERS="2", THREADS="16", DRAIN_S=str(DRAIN_S)) as (url, master):
        old_workers = workers(master.pid)
        with Load(url, photo, CLIENTS) as load:
            wait_until(lambda: load.total >= 2 * CLIENTS, 60, lambda: state(load, log))  # every client going
            master.send_signal(signal.SIGHUP)  # rolling restart: new workers, the old ones drain

            def restarted_workers() -> bool:
                new = workers(master.pid)
                return bool(new) and not new & old_workers and len(new) == 2 and all(
                    f"worker {pid} ready" in log.read_text() for pid in new)

            wait_until(restarted_workers, 90, log.read_text)
            restarted = load.total
            # the new workers answer the load too
            wait_until(lambda: load.total >= restarted + 4 * CLIENTS, 60, lambda: state(load, log))
            restart = dict(load.outcomes)

            shutil.copy(other_checkpoint, str(served) + ".new")
            (served.parent / (served.name + ".new")).rename(served)
            new_sha = file_sha256(str(served))
            started = time.monotonic()
            report = requests.post(f"{url}/v1/models/main/reload", timeout=60)
            reload_s = time.monotonic() - started
            # The worker that answered reloaded; the other one reloads on the SIGHUP it was sent.
            siblings = len(workers(master.pid)) - 1
            wait_until(lambda: log.read_text().count(f"reloaded model main: {new_sha}") >= siblings, 60,
                       lambda: f"{report.status_code} {report.text}; {state(load, log)}")
            switched = time.monotonic()
            wait_until(lambda: len(load.answered_since(switched)) >= 4 * CLIENTS, 60, lambda: state(load, log))
            wait_until(lambda: not workers(master.pid) & old_workers, 60, log.read_text)  # the old ones exited
        print(f"\nrolling restart under {CLIENTS} clients: {restart} ({restarted} by the time the new workers ran); "
              f"reload under load: {dict(load.outcomes)} in total, POST /reload took {reload_s:.2f} s")
        assert report.status_code == 200, report.text
        assert report.json()["changed"] and report.json()["checkpoint_sha256"] == new_sha, (report.json(), log.read_text()[-3000:])
        assert set(load.outcomes) == {"200"}, (dict(load.outcomes), load.refusals, log.read_text()[-3000:])
        late = load.answered_since(switched)
        assert late and set(late) == {new_sha}  # every request sent after both reloaded: the new version
        # the old workers closed (or, still loading, dropped) their copies of a socket the master
        # still holds: left accepting
        assert "new connections are refused" not in log.read_text()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_an_upgrade_in_place_serves_on_after_the_old_master_stops(tiny_checkpoint, tmp_path, monkeypatch):
    """gunicorn's USR2: a new master, a child of the old one, starts on the same socket; the old
    master's workers then drain on TERM and must leave that socket accepting for the new one. The
    new master takes over the folders the old one made, and removes them when it stops."""
    photo = make_photo(seed=23)
    log = tmp_path / "server.log"
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    with gunicorn(log, CHECKPOINT=tiny_checkpoint, WORKERS="1", THREADS="4", DRAIN_S="0.5") as (url, old):
        folders = sorted(temp.iterdir())
        assert len(folders) == 2  # metrics and rate limits
        old_workers = workers(old.pid)

        def new_master_ready() -> int | None:
            for pid in workers(old.pid) - old_workers:
                new = workers(pid)
                if new and all(f"worker {w} ready" in log.read_text() for w in new):
                    return pid
            return None

        old.send_signal(signal.SIGUSR2)
        new_master = None
        try:
            wait_until(new_master_ready, 90, log.read_text)
            new_master = new_master_ready()
            old.send_signal(signal.SIGTERM)
            assert old.wait(60) == 0, log.read_text()
            answers = [post(url, photo)[0] for _ in range(10)]
            assert answers == ["200"] * 10, (answers, log.read_text()[-3000:])
            assert "new connections are refused" not in log.read_text()  # the old workers left it alone
            assert sorted(temp.iterdir()) == folders  # the same ones, kept for the new master
        finally:  # the new master is not this test's child: stop it, or it keeps the port
            for pid in [new_master] if new_master else workers(old.pid) - old_workers:
                os.kill(pid, signal.SIGTERM)
                wait_until(lambda: not alive(pid), 60, log.read_text)
    # Its sockets came from the old master (GUNICORN_FD), which might have kept them: unfiltered.
    assert "new connections are refused" not in log.read_text()
    assert post(url, photo)[0] == "refused"
    assert list(temp.iterdir()) == []
