"""Start a real gunicorn (service/gunicorn.conf.py) on a free loopback port, and drive load at it
with plain HTTP/1.1 connections whose failures are told apart: refused (the socket was closed,
safe to retry) against reset or dropped (the client cannot know whether it was processed). Also
`needs_socket_filters`, for the tests of the drain's last step, which some sandboxes refuse."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests

from service.worker import refuse_new_connections

ROOT = Path(__file__).resolve().parents[2]
# The console script, as the container starts it: a USR2 upgrade re-executes the master's argv,
# and `python -m gunicorn`'s (gunicorn/__main__.py first) would put gunicorn's own `http` package
# before the standard library's.
_SCRIPT = Path(sys.executable).with_name("gunicorn")
GUNICORN = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gunicorn"]


def _socket_filters_allowed() -> bool:
    """Whether this process may attach a filter to its own socket: Linux lets any user, some
    sandboxes only root, some none. Where it may not, the drain skips its last step (tested)."""
    if sys.platform != "linux":
        return False
    with socket.create_server(("127.0.0.1", 0)) as listener:
        try:
            refuse_new_connections(listener)
        except OSError:  # EPERM, or ENOPROTOOPT where filters are not built in
            return False
    return True


needs_socket_filters = pytest.mark.skipif(not _socket_filters_allowed(),
                                          reason="this kernel or sandbox refuses this process socket filters")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gunicorn(log: Path, **settings: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """-> (url, process); settings are CAPTIONER_* variables without the prefix (precision fp32
    unless they say otherwise, as tiny_captioner, whose captions the tests compare)."""
    port = free_port()
    env = {**os.environ, "CAPTIONER_BIND": f"127.0.0.1:{port}", "CAPTIONER_ACCESS_LOG": "false",
           "CAPTIONER_TORCH_THREADS": "1", "CAPTIONER_PRECISION": "fp32",
           **{f"CAPTIONER_{k}": v for k, v in settings.items()}}
    for made_by_the_configuration in ("PROMETHEUS_MULTIPROC_DIR", "CAPTIONER_RUNTIME_DIR", "CAPTIONER_MADE_FOLDERS"):
        env.pop(made_by_the_configuration, None)
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [*GUNICORN, "-c", str(ROOT / "service" / "gunicorn.conf.py"), "service:create_app()"],
            cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or the worker is still loading
            pass
        assert time.monotonic() < deadline, f"gunicorn did not become ready in {timeout} s:\n" + log.read_text()
        time.sleep(0.2)


def wait_until(condition: Callable[[], object], timeout: float, failure: Callable[[], str]) -> None:
    """Poll `condition` until it holds; past `timeout` seconds fail with `failure()`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure()
        time.sleep(0.02)


def workers(master: int) -> set[int]:
    """The master's worker processes (its children, from /proc)."""
    from service.worker import _children

    return set(_children(master))


def post(url: str, body: bytes, path: str = "/v1/captions?num_beams=1&max_new_tokens=5",
         timeout: float = 60) -> tuple[str, dict[str, str]]:
    """One POST on a new connection -> (outcome, response headers). Outcome: the status code as
    text, "refused" (nothing was sent), or "reset" (sent, but no complete answer came back)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        try:
            connection.connect()
        except ConnectionRefusedError:
            return "refused", {}
        connection.request("POST", path, body=body, headers={"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        body = response.read()
        headers = dict(response.headers)
        if response.status != 200:
            headers["body"] = body[:300].decode(errors="replace")
        return str(response.status), headers
    except (ConnectionError, http.client.HTTPException, TimeoutError, OSError) as error:
        return f"reset ({type(error).__name__})", {}
    finally:
        connection.close()


class Load:
    """`clients` threads posting `photo` back to back until stopped (or refused, with
    `until_refused`); `outcomes` counts what they got, `checkpoints` which checkpoint answered."""

    def __init__(self, url: str, photo: bytes, clients: int, *, until_refused: bool = False):
        self.url, self.photo, self.until_refused = url, photo, until_refused
        self.outcomes: Counter[str] = Counter()
        self.answered: list[tuple[float, str]] = []  # (time sent, checkpoint) of each 200
        self.retry_after_missing = 0
        self.refusals: list[str] = []  # the 503 bodies, for the failure message
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 90) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            outcome, headers = post(self.url, self.photo)
            with self._lock:
                self.outcomes[outcome] += 1
                if outcome == "200":
                    self.answered.append((sent, headers.get("X-Captioner-Checkpoint", "")))
                if outcome == "503":
                    self.refusals.append(headers.get("body", ""))
                    self.retry_after_missing += "Retry-After" not in headers
            if outcome == "refused":
                if self.until_refused:
                    return
                time.sleep(0.05)

    @property
    def total(self) -> int:
        """Requests that came back, whatever their outcome."""
        with self._lock:
            return sum(self.outcomes.values())

    def answered_since(self, moment: float) -> list[str]:
        """The checkpoints that answered the requests sent after `moment`."""
        with self._lock:
            return [checkpoint for sent, checkpoint in self.answered if sent > moment]

    @property
    def failures(self) -> int:
        """Answers a client cannot act on: resets, and errors other than 503 with Retry-After."""
        bad = sum(n for outcome, n in self.outcomes.items() if outcome not in ("200", "503", "refused"))
        return bad + self.retry_after_missing
