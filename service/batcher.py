"""Micro-batching: concurrent requests in one worker share one encoder+decoder batch.

Request threads `submit()` preprocessed images (3, S, S) with their decoding config and wait on
the returned `Job`s. One batching thread takes the oldest waiting image, waits at most
`max_wait_ms` for up to `max_batch_size - 1` more images with the same decoding config, runs
`infer(pixels (B, 3, S, S), config)` once, and hands each result back to its request. It waits
only while some request is on its way (`incoming()`: its images being decoded): a lone request,
the common case at low load, is computed at once instead of waiting for company that is not
coming.

The queue is bounded: `submit()` raises `QueueFull` at once when the images do not fit (the
service answers 503 with Retry-After). Every job carries a deadline: a job still waiting when its
deadline passes is dropped without being computed, and `Job.wait()` raises `DeadlineExceeded`.

Seeded sampling (`do_sample=True, seed=N`) draws from one generator per batch, so such images are
batched only with images of the same request: the same request gives the same captions.

With `torch_threads=N` the batching thread is the only one that computes with N intra-op threads;
every other thread keeps the process-wide count (the service sets 1). PyTorch's OpenMP (libgomp)
keeps one thread team per thread that ever ran a parallel operation, and once it manages more
threads than there are cores it stops spinning between operations and sleeps instead: the encoder
then ran about 2x slower (52 against 26 ms for one photo on 2 cores) whenever the main thread or
the request threads (loading, warm-up, the pixel copy of preprocessing) had their own teams.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch

from captioner.decoding import DecodeConfig


class QueueFull(Exception):
    """More images are waiting than the queue holds."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its images were captioned."""


class BatcherClosed(Exception):
    """The batcher is shutting down."""


@dataclass(eq=False)
class Job:
    pixels: torch.Tensor  # (3, S, S) uint8
    config: DecodeConfig
    key: Hashable
    deadline: float  # time.monotonic()
    enqueued: float = field(default_factory=time.monotonic)
    result: Any = None
    error: BaseException | None = None
    started: float | None = None
    batch_size: int = 0  # images in the batch that computed it
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self) -> Any:
        if not self.done.wait(max(0.0, self.deadline - time.monotonic())):
            raise DeadlineExceeded("the request's deadline passed before its image was captioned")
        if self.error is not None:
            raise self.error
        return self.result


Observer = Callable[[str, float], None]  # ("batch_size" | "inference_s" | "queue_depth", value)


class MicroBatcher:
    def __init__(self, infer: Callable[[torch.Tensor, DecodeConfig], list[Any]], *, max_batch_size: int = 16,
                 max_wait_ms: float = 5.0, max_queue: int = 64, observe: Observer | None = None,
                 torch_threads: int | None = None):
        self.infer = infer
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.observe = observe or (lambda name, value: None)
        self._queue: deque[Job] = deque()
        self._incoming = 0  # requests inside their `incoming()` block (it ends after their submit)
        self._cond = threading.Condition()
        self._closed = False
        process_wide = torch.get_num_threads()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(torch_threads, started), name="captioner-batcher",
                                        daemon=True)
        self._thread.start()
        started.wait()
        # torch.set_num_threads also sets the count that threads adopt on their first parallel
        # operation: put the process-wide count back now that the batching thread has its own.
        torch.set_num_threads(process_wide)

    # -- request side ----------------------------------------------------------------------------

    def submit(self, pixels: Sequence[torch.Tensor], config: DecodeConfig, *, deadline: float,
               request_key: Hashable = None) -> list[Job]:
        """Queue all images of one request, or none of them (`QueueFull`)."""
        key: Hashable = _config_key(config)
        if config.do_sample and config.seed is not None:
            key = (key, request_key if request_key is not None else object())
        jobs = [Job(p, config, key, deadline) for p in pixels]
        with self._cond:
            if self._closed:
                raise BatcherClosed("the service is shutting down")
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} images are waiting (limit {self.max_queue})")
            self._queue.extend(jobs)
            self.observe("queue_depth", len(self._queue))
            self._cond.notify()
        return jobs

    @contextlib.contextmanager
    def incoming(self):
        """Announce a request while its images are decoded, around its `submit()`: a batch waits
        (up to `max_wait_ms`) for the images of announced requests, and for no others."""
        with self._cond:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cond:
                self._incoming -= 1
                self._cond.notify_all()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def close(self, timeout: float = 5.0, *, drain: bool = False) -> None:
        """Refuse new images (`BatcherClosed`); the queued ones fail too, or with `drain=True`
        are still computed (a model being replaced) while this returns at once."""
        with self._cond:
            self._closed = True
            pending = []
            if not drain:
                pending, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for job in pending:
            job.error = BatcherClosed("the service is shutting down")
            job.done.set()
        if not drain:
            self._thread.join(timeout)

    # -- batching thread -------------------------------------------------------------------------

    def _run(self, torch_threads: int | None, started: threading.Event) -> None:
        if torch_threads is not None:
            torch.get_num_threads()  # first adopt the process-wide count, so that the next line sticks
            torch.set_num_threads(torch_threads)
        started.set()
        while True:
            batch = self._gather()
            if batch is None:
                return
            if batch:
                self._execute(batch)

    def _gather(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:  # closed, and nothing left to drain
                return None
            first = self._queue[0]
            # Wait for company only while some is on its way, the batch is not full and the first
            # job can afford it.
            until = min(first.enqueued + self.max_wait, first.deadline)
            while self.max_batch_size > 1 and self._incoming and not self._closed:
                if sum(1 for j in self._queue if j.key == first.key) >= self.max_batch_size:
                    break
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[Job] = []
            keep: deque[Job] = deque()
            now = time.monotonic()
            for job in self._queue:
                if job.deadline <= now:
                    job.error = DeadlineExceeded("the request's deadline passed while its image was queued")
                    job.done.set()
                elif job.key == first.key and len(batch) < self.max_batch_size:
                    batch.append(job)
                else:
                    keep.append(job)
            self._queue = keep
            self.observe("queue_depth", len(self._queue))
            return batch

    def _execute(self, batch: list[Job]) -> None:
        started = time.monotonic()
        for job in batch:
            job.started = started
            job.batch_size = len(batch)
        try:
            results = self.infer(torch.stack([job.pixels for job in batch]), batch[0].config)
            if len(results) != len(batch):
                raise RuntimeError(f"infer returned {len(results)} results for {len(batch)} images")
        except BaseException as error:  # handed to every request of the batch; the thread lives on
            for job in batch:
                job.error = error
                job.done.set()
            return
        finally:
            self.observe("batch_size", len(batch))
            self.observe("inference_s", time.monotonic() - started)
        for job, result in zip(batch, results):
            job.result = result
            job.done.set()


def _config_key(config: DecodeConfig) -> Hashable:
    return tuple(sorted(config.to_dict().items()))
