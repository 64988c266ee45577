"""Token buckets per client, shared by every gunicorn worker of one server.

    buckets = TokenBuckets(rate=5.0, burst=10, path=None)   # path: a file all workers map
    allowed, retry_after_s = buckets.take("key:alice")

Each client (an API key, or the client address when no keys are set) owns one bucket of `burst`
tokens that refills at `rate` tokens per second; a request takes one token or is refused with the
time until the next token. Under gunicorn the buckets live in one memory-mapped file (made by
gunicorn.conf.py) locked with `flock`, so W workers enforce one limit, not W of them; without a
file (tests, the development server) they live in anonymous memory.

The table has a fixed number of slots (bounded memory whatever the number of clients): a client
hashes to a run of `PROBE` slots; when all of them are taken by other clients, the slot touched
least recently is given to the newcomer (its owner had been idle longest, so its bucket was the
fullest anyway). `time.monotonic()` is CLOCK_MONOTONIC, the same clock in every process.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import threading
import time

SLOT = struct.Struct("<Qdd")  # key fingerprint (0: empty), tokens, time of the last update
PROBE = 8


class TokenBuckets:
    def __init__(self, rate: float, burst: float, *, path: str | None = None, slots: int = 4096,
                 clock=time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError("the rate limit needs requests/second > 0 and a burst of at least 1")
        self.rate, self.burst, self.slots, self.clock = float(rate), float(burst), slots, clock
        size = slots * SLOT.size
        self._lock = threading.Lock()  # flock does not exclude the threads of one process
        if path is None:
            self._fd = None
            self._map = mmap.mmap(-1, size)
        else:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size)

    def take(self, client: str) -> tuple[bool, float]:
        """Take one token from `client`'s bucket -> (allowed, seconds until a token is there)."""
        fingerprint = int.from_bytes(hashlib.blake2b(client.encode(), digest_size=8).digest(), "little") or 1
        start = fingerprint % self.slots
        with self._lock:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                now = self.clock()
                slot, tokens = self._find(fingerprint, start, now)
                if tokens >= 1.0:
                    self._write(slot, fingerprint, tokens - 1.0, now)
                    return True, 0.0
                self._write(slot, fingerprint, tokens, now)
                return False, (1.0 - tokens) / self.rate
            finally:
                if self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _find(self, fingerprint: int, start: int, now: float) -> tuple[int, float]:
        """-> (the client's slot, its tokens refilled up to `now`); a new client starts full."""
        oldest, oldest_stamp = start, float("inf")
        for offset in range(PROBE):
            slot = (start + offset) % self.slots
            owner, tokens, stamp = SLOT.unpack_from(self._map, slot * SLOT.size)
            if owner == fingerprint:
                if stamp > now:  # a file from before a reboot: the clock started again
                    return slot, self.burst
                return slot, min(self.burst, tokens + (now - stamp) * self.rate)
            if owner == 0:
                return slot, self.burst
            if stamp < oldest_stamp:
                oldest, oldest_stamp = slot, stamp
        return oldest, self.burst

    def _write(self, slot: int, fingerprint: int, tokens: float, now: float) -> None:
        SLOT.pack_into(self._map, slot * SLOT.size, fingerprint, tokens, now)

    def close(self) -> None:
        self._map.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def parse_rate_limit(text: str) -> tuple[float, float] | None:
    """'5' or '5,10' (requests/second[,burst]) -> (rate, burst); '' -> None (no limit). The burst
    defaults to one second's worth of requests, at least 1."""
    text = text.strip()
    if not text:
        return None
    rate_text, _, burst_text = text.partition(",")
    try:
        rate = float(rate_text)
        burst = float(burst_text) if burst_text.strip() else max(1.0, rate)
    except ValueError:
        raise ValueError(f"rate limit {text!r}: expected 'requests/second[,burst]', e.g. '5,10'") from None
    if not (rate > 0 and burst >= 1) or rate != rate or burst == float("inf") or rate == float("inf"):
        raise ValueError(f"rate limit {text!r}: requests/second must be > 0 and burst at least 1")
    return rate, burst
