"""The drain's last step on Linux: a listening socket that closes with the service's workers first
drops new connection requests, so none is queued after the last accept and reset by the close;
a socket another process still holds (the master, a new master) is left as it is."""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import service.worker
from service.worker import DrainingWorker, refuse_new_connections
from tests.service.gunicorn_server import needs_socket_filters

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="socket filters and /proc are Linux's")


def listening(host: str = "127.0.0.1") -> tuple[socket.socket, tuple]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, 0), family=family, backlog=16)
    listener.settimeout(5)
    return listener, listener.getsockname()[:2]


@needs_socket_filters
def test_a_refusing_socket_keeps_what_it_queued_and_then_refuses_rather_than_resets():
    listener, address = listening()
    with listener, socket.create_connection(address, timeout=5) as queued:
        refuse_new_connections(listener)
        late = socket.socket()
        late.settimeout(0.5)
        with late, pytest.raises(TimeoutError):  # its SYN was dropped: nothing to reset
            late.connect(address)
        accepted, _ = listener.accept()  # a connection queued before stays, and works
        with accepted:
            queued.sendall(b"ping")
            assert accepted.recv(4) == b"ping"
    with pytest.raises(ConnectionRefusedError):  # after the close a client is refused
        socket.create_connection(address, timeout=5)


@needs_socket_filters
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_handshake_under_way_when_the_filter_comes_completes_and_is_served(host):
    """With TCP_DEFER_ACCEPT the server completes a handshake only when the client's first data
    comes: here after the filter, as a final ACK in flight would."""
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    listener, address = listening(host)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
    with listener, socket.create_connection(address, timeout=5) as client:
        refuse_new_connections(listener)
        client.sendall(b"GET")
        accepted, _ = listener.accept()
        with accepted:
            accepted.settimeout(5)
            assert accepted.recv(3) == b"GET"
            accepted.sendall(b"200")  # the accepted connection inherits the filter: its segments pass
            assert client.recv(3) == b"200"


@needs_socket_filters
def test_a_connection_accepted_after_the_filter_still_hears_its_client_reset_it():
    """A client that closed answers the server's next segment with a RST without ACK; the
    connection inherits the listener's filter, which must let that through (else the server
    keeps sending into nothing)."""
    listener, address = listening()
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
    with listener:
        client = socket.create_connection(address, timeout=5)
        refuse_new_connections(listener)
        client.sendall(b"GET")
        accepted, _ = listener.accept()
        with accepted:
            client.close()
            accepted.sendall(b"200")  # to a closed socket: the client's stack resets
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                for _ in range(50):
                    time.sleep(0.02)
                    accepted.sendall(b"more")


# A process holding the socket (passed as fd argv[1]); told to on stdin, it says whether the socket
# closes with the workers of argv[2], its parent.
HOLDER = """
import socket, sys
from service.worker import closes_with_workers_of
listener = socket.socket(fileno=int(sys.argv[1]))
sys.stdin.readline()
print(closes_with_workers_of(int(sys.argv[2]), listener), flush=True)
sys.stdin.read()
"""


def ask_first(environments: list[dict[str, str]], master_keeps_it: bool) -> bool:
    """This process as the master: children holding its listening socket, started with these
    environments; the first answers once the master has (or has not) closed its copy."""
    listener, _ = listening()
    holders = [subprocess.Popen([sys.executable, "-c", HOLDER, str(listener.fileno()), str(os.getpid())],
                                cwd=ROOT, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                pass_fds=[listener.fileno()], text=True)
               for environment in environments]
    try:
        if not master_keeps_it:
            listener.close()
        holders[0].stdin.write("\n")
        holders[0].stdin.flush()
        return {"True": True, "False": False}[holders[0].stdout.readline().strip()]
    finally:
        listener.close()
        for holder in holders:
            holder.communicate("")


def environment_at_start() -> dict[str, str]:
    """This process's environment as it started (/proc/self/environ), which its forks show too."""
    items = Path("/proc/self/environ").read_bytes().split(b"\0")
    return dict(os.fsdecode(item).split("=", 1) for item in items if b"=" in item)


def test_a_socket_closes_with_the_workers_only_when_no_other_process_holds_it():
    worker = environment_at_start()  # as a gunicorn worker's, the same as its master's
    assert ask_first([worker, worker], master_keeps_it=False)  # SIGTERM: every worker drains
    assert not ask_first([worker, worker], master_keeps_it=True)  # a rolling restart or one worker's
    # gunicorn's USR2 upgrade: a new master, a child of this one, holds the sockets it names
    assert not ask_first([worker, {**worker, "GUNICORN_FD": "3"}], master_keeps_it=False)
    handed = {**worker, "LISTEN_FDS": "1"}  # systemd's socket activation: systemd keeps the socket
    assert not ask_first([handed, handed], master_keeps_it=False)


def fake_worker(bind: list[str]) -> SimpleNamespace:
    """What `DrainingWorker._refuse_new_connections_if_last` reads of its worker, for this process."""
    return SimpleNamespace(ppid=os.getppid(), pid=os.getpid(), log=logging.getLogger("test.worker"),
                           cfg=SimpleNamespace(bind=bind))


def as_a_worker(scenario: str) -> None:
    """Run `scenario`, a function of this module, in a child of this process, which plays its
    master: whoever started pytest (PID 1 in a container, or nothing after nohup) may hide its
    descriptors or have none to read."""
    done = subprocess.run([sys.executable, "-c", f"from tests.service.test_listener import {scenario}; {scenario}()"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@needs_socket_filters
def test_a_socket_gunicorn_was_handed_stays_unfiltered():
    as_a_worker("handed_socket_stays_unfiltered")


def handed_socket_stays_unfiltered():
    listener, address = listening()
    with listener:
        assert not DrainingWorker._refuse_new_connections_if_last(fake_worker(["fd://3"]), listener)
        with socket.create_connection(address, timeout=5):  # queued: no filter drops its SYN
            listener.accept()[0].close()
        assert DrainingWorker._refuse_new_connections_if_last(fake_worker(["127.0.0.1:0"]), listener)


def test_a_drain_that_cannot_filter_its_socket_drains_as_before():
    as_a_worker("unfiltered_drain")


def unfiltered_drain():
    def unsupported(listener):
        raise OSError(92, "Protocol not available")

    service.worker.refuse_new_connections = unsupported  # a child of its own: nothing to restore
    worker = fake_worker(["127.0.0.1:0"])
    said = logging.handlers.BufferingHandler(capacity=100)
    worker.log.addHandler(said)
    worker.log.setLevel(logging.INFO)
    listener, address = listening()
    with listener:
        DrainingWorker._refuse_new_connections_if_last(worker, listener)
        with socket.create_connection(address, timeout=5):  # still queued, to be accepted
            listener.accept()[0].close()
    lines = [record.getMessage() for record in said.buffer]
    assert any("left its socket unfiltered: [Errno 92] Protocol not available" in line for line in lines), lines


def test_a_master_whose_descriptors_cannot_be_read_may_hold_the_socket():
    """A master that is not dumpable (file capabilities, an LSM) hides its descriptors: it may
    still hold the socket, which must then stay unfiltered."""
    as_a_worker("hidden_master")


def hidden_master():
    listener, _ = listening()
    with listener:
        assert service.worker.closes_with_workers_of(os.getppid(), listener)  # held by this process alone
        hidden, listdir = f"/proc/{os.getppid()}/fd", os.listdir

        def hiding(path):
            if path == hidden:
                raise PermissionError(13, "Permission denied", path)
            return listdir(path)

        service.worker.os.listdir = hiding
        assert not service.worker.closes_with_workers_of(os.getppid(), listener)
