"""The gunicorn worker: gthread, plus a drain on SIGTERM and a model reload on SIGHUP.

gunicorn's own gthread worker stops accepting the moment SIGTERM arrives, but its listening
socket stays open until its last request is done: the kernel goes on queueing connections that
nobody accepts, and resets them when the socket finally closes. A client whose POST was reset
cannot tell whether it was processed. This worker instead

1. marks the app as draining at once: /readyz answers 503 (the load balancer stops sending) and
   every answer closes its connection (`Connection: close`: no kept-alive connection outlives
   the drain);
2. keeps accepting and answering for `CAPTIONER_DRAIN_S` seconds;
3. then accepts every connection already queued, closes its listening socket, and finishes
   those requests like any other (gunicorn's graceful timeout bounds the wait).

A connection that arrives after the socket closed is refused, which a client can safely retry.
One that completes between the last accept and the close would be queued and then reset, so
where the socket closes with this worker and its siblings (`closes_with_workers_of`: the master
has closed its copy, the whole service is stopping, and no other process holds it), the worker
first makes the socket drop new connection requests
(Linux: a socket filter that drops SYNs without ACK) and goes on accepting
for `HANDSHAKE_GRACE_S`, so handshakes already under way complete and are served; a client whose
SYN was dropped retries it (Linux: a second later) and is then refused. A handshake slower than
the grace can still be reset. The socket is shared: the first worker's filter refuses new
connections for siblings still in their drain (they end within about a second of each other).
Under a rolling restart (SIGHUP to the master) the old workers drain while the new ones load.

SIGHUP sent to a worker reloads every model whose checkpoint file changed, in a thread (the
signal handler only starts it); `POST /v1/models/NAME/reload` reloads in the worker that answers
and sends SIGHUP to the other workers of the same master.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import struct
import sys
import threading
import time

from gunicorn.workers.gthread import ThreadWorker


class DrainingWorker(ThreadWorker):
    drain_until: float | None = None
    listeners_closed = False

    def init_signals(self) -> None:
        super().init_signals()
        signal.signal(signal.SIGHUP, self.handle_hup)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        state = self._state()
        if state is not None:
            state.reload_siblings = self.reload_siblings

    def _state(self):
        app = getattr(self, "wsgi", None)
        return getattr(app, "extensions", {}).get("captioner") if app is not None else None

    # -- SIGTERM: drain, then close ----------------------------------------------------------------

    def handle_exit(self, sig, frame) -> None:
        state = self._state()
        if state is None or self.drain_until is not None:  # not loaded yet, or a second SIGTERM
            super().handle_exit(sig, frame)
            return
        state.begin_drain()
        self.max_keepalived = 0  # gthread now closes each connection after its answer
        self.drain_until = time.monotonic() + state.config.drain_s
        self.log.info("worker %s draining for %.1f s", self.pid, state.config.drain_s)

    def notify(self) -> None:  # called by the event loop at least once a second
        super().notify()
        if self.alive and self.drain_until is not None and time.monotonic() >= self.drain_until:
            self._close_listeners()
            self.alive = False  # gunicorn's loop now finishes the open connections and exits

    def set_accept_enabled(self, enabled: bool) -> None:
        if not self.listeners_closed:  # the loop would accept again on a closed socket
            super().set_accept_enabled(enabled)

    def _close_listeners(self) -> None:
        self.set_accept_enabled(False)
        self.listeners_closed = True
        for listener in self.sockets:
            grace = HANDSHAKE_GRACE_S if self._refuse_new_connections_if_last(listener) else 0.0
            until = time.monotonic() + grace
            while True:  # take every connection the kernel queued, so none is reset
                before = self.nr_conns
                self.accept(listener)
                if self.nr_conns == before:
                    if time.monotonic() >= until:
                        break
                    time.sleep(0.01)
            listener.close()
        self.log.info("worker %s closed its socket; finishing %d connection(s)", self.pid, self.nr_conns)

    def _refuse_new_connections_if_last(self, listener) -> bool:
        """Where the socket closes with this master's workers, stop new connections from queueing
        (module docstring) -> whether it did; where that cannot be known or done, drain as without."""
        if any(str(address).startswith("fd://") for address in self.cfg.bind):
            return False  # handed over by whoever started gunicorn, who may keep it
        try:
            if not closes_with_workers_of(self.ppid, listener):
                return False
            refuse_new_connections(listener)
        except OSError as error:  # no /proc, or a kernel or sandbox without socket filters
            self.log.warning("worker %s left its socket unfiltered: %s", self.pid, error)
            return False
        self.log.info("worker %s: the socket closes with the workers; new connections are refused", self.pid)
        return True

    # -- SIGHUP: reload models ---------------------------------------------------------------------

    def handle_hup(self, sig, frame) -> None:
        state = self._state()
        if state is not None:
            threading.Thread(target=self._reload_all, args=(state,), name="captioner-reload", daemon=True).start()

    def _reload_all(self, state) -> None:
        for report in state.models.reload_all():
            if report.get("error"):
                state.metrics.reloads.labels(report["name"], "failed").inc()
                self.log.error("worker %s kept model %s: %s", self.pid, report["name"], report["error"])
            elif report["changed"]:
                state.metrics.reloads.labels(report["name"], "changed").inc()
                self.log.info("worker %s reloaded model %s: %s in %.1f s", self.pid, report["name"],
                              report["checkpoint_sha256"], report["reload_s"])

    def reload_siblings(self) -> None:
        """SIGHUP to the other workers of this worker's master (found in /proc)."""
        for pid in _children(self.ppid):
            if pid != self.pid:
                try:
                    os.kill(pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass


SO_ATTACH_FILTER = 26  # Linux, <asm-generic/socket.h>
# A listening TCP socket's filter reads each segment from its TCP header: byte 13 holds the flags.
# struct sock_filter: u16 code, u8 jt, u8 jf, u32 k (classic BPF).
_DROP_CONNECTION_REQUESTS = b"".join(struct.pack("HBBI", *instruction) for instruction in (
    (0x30, 0, 0, 13),  # BPF_LD | BPF_B | BPF_ABS: A = the flags
    (0x54, 0, 0, 0x12),  # BPF_ALU | BPF_AND | BPF_K: A &= SYN | ACK
    (0x15, 1, 0, 0x02),  # BPF_JMP | BPF_JEQ | BPF_K: SYN without ACK? skip to the drop
    (0x06, 0, 0, 0xFFFFFFFF),  # BPF_RET | BPF_K: keep the segment
    (0x06, 0, 0, 0),  # BPF_RET | BPF_K: drop it
))
HANDSHAKE_GRACE_S = 0.25  # accepting on after the filter: handshakes under way complete (an RTT)


def refuse_new_connections(listener: socket.socket) -> None:
    """Make a listening TCP socket (Linux) drop connection requests, SYNs without ACK, and keep
    every other segment: a handshake under way still completes. Connections whose handshake
    completes later inherit the filter, which passes all their segments (RSTs too)."""
    program = ctypes.create_string_buffer(_DROP_CONNECTION_REQUESTS, len(_DROP_CONNECTION_REQUESTS))
    fprog = struct.pack("HP", len(_DROP_CONNECTION_REQUESTS) // 8, ctypes.addressof(program))  # struct sock_fprog
    listener.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def closes_with_workers_of(master: int, listener: socket.socket) -> bool:
    """Whether every process that holds the socket open is a worker of `master`: a child with
    this process's environment (Linux, read in /proc), so that it closes, resetting what it
    queued, when they exit. False where another process holds it: the master itself (a single
    worker's restart), a new master after gunicorn's USR2 upgrade (a child too, whose environment
    names the sockets it inherited) or its workers; False too where this cannot be known: off
    Linux; for sockets the master was handed (systemd's LISTEN_FDS, a USR2 upgrade's
    GUNICORN_FD), whose giver may keep them; for a socket another user made (a root master whose
    workers run as another user); and where the master or a process under it hides its
    descriptors (not dumpable: file capabilities, an LSM)."""
    if sys.platform != "linux" or os.fstat(listener.fileno()).st_uid != os.getuid():
        return False
    own = _environment(os.getpid())
    if own is None or _HANDED_SOCKETS.search(own):
        return False
    parents = _parents()
    holders = _holders(listener, lambda pid: _under(pid, master, parents))
    if holders is None or os.getpid() not in holders:
        return False
    return all(parents.get(pid) == master and _environment(pid) == own for pid in holders)


_HANDED_SOCKETS = re.compile(rb"(?:^|\0)(?:LISTEN_FDS|GUNICORN_FD)=")


def _environment(pid: int) -> bytes | None:
    """The environment a process started with (/proc/PID/environ): a fork keeps its parent's."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _holders(listener: socket.socket, must_read) -> set[int] | None:
    """The processes that have `listener` open, or None where a process for which
    `must_read(pid)` holds hides its descriptors; other hidden ones are passed over."""
    link = f"socket:[{os.fstat(listener.fileno()).st_ino}]"
    pids = set()
    for pid in _pids():
        try:
            if link in _descriptors(pid):
                pids.add(pid)
        except PermissionError:  # not dumpable
            if must_read(pid):
                return None
    return pids


def _descriptors(pid: int) -> set[str]:
    """What the process's open descriptors point to (/proc/PID/fd); PermissionError where it
    hides them."""
    targets = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):  # it exited
        return targets
    for fd in fds:
        try:
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except (FileNotFoundError, ProcessLookupError):  # closed meanwhile
            continue
    return targets


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _under(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    """Whether `pid` is `ancestor` or descends from it."""
    seen = set()
    while pid not in seen:
        if pid == ancestor:
            return True
        seen.add(pid)
        pid = parents.get(pid, 0)
    return False


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc/PID/stat (readable whatever a process's dumpability)."""
    parents = {}
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1:
            parents[pid] = int(fields[1])
    return parents


def _children(parent: int) -> list[int]:
    return [pid for pid, ppid in _parents().items() if ppid == parent]
