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
Under a rolling restart (SIGHUP to the master) the old workers drain while the new ones load.

SIGHUP sent to a worker reloads every model whose checkpoint file changed, in a thread (the
signal handler only starts it); `POST /v1/models/NAME/reload` reloads in the worker that answers
and sends SIGHUP to the other workers of the same master.
"""

from __future__ import annotations

import os
import signal
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
            while True:  # take every connection the kernel already queued, so none is reset
                before = self.nr_conns
                self.accept(listener)
                if self.nr_conns == before:
                    break
            listener.close()
        self.log.info("worker %s closed its socket; finishing %d connection(s)", self.pid, self.nr_conns)

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


def _children(parent: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1 and int(fields[1]) == parent:
            pids.append(int(entry))
    return pids
