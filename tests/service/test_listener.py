"""The drain's last step on Linux: a listening socket that closes with the service's workers first
drops new connection requests, so none is queued after the last accept and reset by the close;
a socket another process still holds (the master, a new master) is left as it is."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from service.worker import closes_with_workers_of, refuse_new_connections

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="socket filters and /proc are Linux's")


def listening() -> tuple[socket.socket, tuple[str, int]]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    return listener, listener.getsockname()


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


def test_a_socket_closes_with_the_workers_only_when_no_other_process_holds_it():
    listener, _ = listening()
    with listener:
        # Held by this process alone, a child of its parent: it closes with this "worker".
        assert closes_with_workers_of(os.getppid(), listener)
        assert not closes_with_workers_of(os.getpid(), listener)  # not a child of itself
        holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                  stdin=subprocess.PIPE, pass_fds=[listener.fileno()])
        try:  # a process of another parent (as a master, or a new one after USR2) holds it too
            assert not closes_with_workers_of(os.getppid(), listener)
        finally:
            holder.communicate(b"")
        assert closes_with_workers_of(os.getppid(), listener)
