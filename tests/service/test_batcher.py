"""The micro-batcher alone, with a fake model: batching, routing, grouping, limits, deadlines."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from captioner.decoding import DecodeConfig
from service.batcher import DeadlineExceeded, MicroBatcher, QueueFull


class FakeModel:
    """Returns each image's id (its first pixel) with the config's num_beams; records batches."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[list[int]] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, pixels: torch.Tensor, config: DecodeConfig) -> list[tuple[int, int]]:
        self.gate.wait(10)
        time.sleep(self.delay)
        ids = pixels[:, 0, 0, 0].tolist()
        self.batches.append(ids)
        return [(i, config.num_beams) for i in ids]


def image(i: int) -> torch.Tensor:
    return torch.full((3, 4, 4), i, dtype=torch.uint8)


def later(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


@pytest.fixture
def batcher_factory():
    made: list[MicroBatcher] = []

    def make(model, **kwargs) -> MicroBatcher:
        made.append(MicroBatcher(model, **kwargs))
        return made[-1]

    yield make
    for batcher in made:
        batcher.close()


def test_concurrent_requests_share_a_batch_and_get_their_own_results(batcher_factory):
    model = FakeModel()
    batcher = batcher_factory(model, max_batch_size=8, max_wait_ms=5000)
    config = DecodeConfig(num_beams=2)
    results: dict[int, tuple] = {}
    all_decoding = threading.Barrier(8)

    def request(i: int) -> None:
        with batcher.incoming():  # decoded together
            all_decoding.wait(10)
            [job] = batcher.submit([image(i)], config, deadline=later())
        results[i] = job.wait()

    threads = [threading.Thread(target=request, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {i: (i, 2) for i in range(8)}
    assert [len(b) for b in model.batches] == [8]


def test_a_lone_request_is_computed_at_once_and_one_on_its_way_is_waited_for(batcher_factory):
    """A batch waits (up to max_wait_ms) only for requests announced as incoming: at low load a
    request does not pay the wait for company that is not coming."""
    model = FakeModel()
    batcher = batcher_factory(model, max_batch_size=8, max_wait_ms=5000)
    started = time.monotonic()
    with batcher.incoming():
        [alone] = batcher.submit([image(1)], DecodeConfig(), deadline=later())
    assert alone.wait() == (1, 3) and time.monotonic() - started < 2.5
    with batcher.incoming():  # a second request is being decoded while the first arrives
        [first] = batcher.submit([image(2)], DecodeConfig(), deadline=later())
        assert not first.done.wait(0.2)
        [second] = batcher.submit([image(3)], DecodeConfig(), deadline=later())
    assert (first.wait(), second.wait()) == ((2, 3), (3, 3))
    assert model.batches == [[1], [2, 3]]


def test_a_request_on_its_way_holds_a_batch_at_most_max_wait_and_a_failed_one_releases_it(batcher_factory):
    model = FakeModel()
    batcher = batcher_factory(model, max_batch_size=8, max_wait_ms=50)
    with batcher.incoming():  # still decoding: the batch goes after 50 ms all the same
        [job] = batcher.submit([image(1)], DecodeConfig(), deadline=later())
        assert job.done.wait(5)
    slow = batcher_factory(FakeModel(), max_batch_size=8, max_wait_ms=5000)
    started = time.monotonic()
    with pytest.raises(ValueError):
        with slow.incoming():  # request B is decoding
            [queued] = slow.submit([image(2)], DecodeConfig(), deadline=later())  # A's image waits for B's
            raise ValueError("B's image is broken")
    assert queued.wait() == (2, 3) and time.monotonic() - started < 2.5


def test_batches_never_exceed_the_maximum_and_keep_order(batcher_factory):
    model = FakeModel()
    model.gate.clear()
    batcher = batcher_factory(model, max_batch_size=4, max_wait_ms=50, max_queue=32)
    jobs = batcher.submit([image(i) for i in range(10)], DecodeConfig(), deadline=later())
    model.gate.set()
    assert [job.wait()[0] for job in jobs] == list(range(10))
    assert all(len(b) <= 4 for b in model.batches)
    assert [i for b in model.batches for i in b] == list(range(10))


def test_different_decode_configs_never_share_a_batch(batcher_factory):
    model = FakeModel()
    model.gate.clear()
    batcher = batcher_factory(model, max_batch_size=16, max_wait_ms=2000)
    with batcher.incoming():  # the three requests arrive together
        a = batcher.submit([image(1), image(2)], DecodeConfig(num_beams=1), deadline=later())
        b = batcher.submit([image(3)], DecodeConfig(num_beams=3), deadline=later())
        c = batcher.submit([image(4)], DecodeConfig(num_beams=1), deadline=later())
    model.gate.set()
    assert [j.wait() for j in a + b + c] == [(1, 1), (2, 1), (3, 3), (4, 1)]
    assert sorted(model.batches) == [[1, 2, 4], [3]]


def test_seeded_sampling_is_batched_only_within_its_request(batcher_factory):
    model = FakeModel()
    model.gate.clear()
    batcher = batcher_factory(model, max_batch_size=16, max_wait_ms=2000)
    config = DecodeConfig(num_beams=1, do_sample=True, seed=3)
    with batcher.incoming():
        first = batcher.submit([image(1), image(2)], config, deadline=later(), request_key="r1")
        second = batcher.submit([image(3)], config, deadline=later(), request_key="r2")
    model.gate.set()
    for job in first + second:
        job.wait()
    assert sorted(model.batches) == [[1, 2], [3]]


def test_batch_size_one_turns_batching_off(batcher_factory):
    model = FakeModel()
    model.gate.clear()
    batcher = batcher_factory(model, max_batch_size=1, max_wait_ms=50)
    jobs = batcher.submit([image(i) for i in range(3)], DecodeConfig(), deadline=later())
    model.gate.set()
    for job in jobs:
        job.wait()
    assert model.batches == [[0], [1], [2]]


def test_a_full_queue_refuses_the_whole_request_at_once(batcher_factory):
    model = FakeModel()
    model.gate.clear()
    batcher = batcher_factory(model, max_batch_size=1, max_wait_ms=0, max_queue=3)
    first = batcher.submit([image(0)], DecodeConfig(), deadline=later())
    deadline = time.monotonic() + 5
    while batcher.depth and time.monotonic() < deadline:  # the batcher takes it and blocks
        time.sleep(0.005)
    batcher.submit([image(1), image(2)], DecodeConfig(), deadline=later())
    started = time.monotonic()
    with pytest.raises(QueueFull):
        batcher.submit([image(3), image(4)], DecodeConfig(), deadline=later())
    assert time.monotonic() - started < 0.1
    assert batcher.depth == 2  # nothing of the refused request was queued
    model.gate.set()
    assert first[0].wait() == (0, 3)


def test_expired_jobs_are_dropped_without_computing_them(batcher_factory):
    model = FakeModel()
    model.gate.clear()
    batcher = batcher_factory(model, max_batch_size=1, max_wait_ms=0)
    blocker = batcher.submit([image(0)], DecodeConfig(), deadline=later())
    [expiring] = batcher.submit([image(1)], DecodeConfig(), deadline=time.monotonic() + 0.05)
    with pytest.raises(DeadlineExceeded):
        expiring.wait()
    model.gate.set()
    blocker[0].wait()
    batcher.submit([image(2)], DecodeConfig(), deadline=later())[0].wait()
    assert [1] not in model.batches


def test_a_failing_batch_fails_its_requests_and_the_batcher_lives_on(batcher_factory):
    calls = {"n": 0}

    def flaky(pixels, config):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return list(range(len(pixels)))

    batcher = batcher_factory(flaky, max_batch_size=4, max_wait_ms=0)
    [job] = batcher.submit([image(0)], DecodeConfig(), deadline=later())
    with pytest.raises(RuntimeError, match="boom"):
        job.wait()
    assert batcher.submit([image(1)], DecodeConfig(), deadline=later())[0].wait() == 0


def test_observer_sees_batch_sizes_and_queue_depth(batcher_factory):
    seen: list[tuple[str, float]] = []
    model = FakeModel()
    model.gate.clear()
    batcher = batcher_factory(model, max_batch_size=4, max_wait_ms=20, observe=lambda n, v: seen.append((n, v)))
    jobs = batcher.submit([image(i) for i in range(4)], DecodeConfig(), deadline=later())
    model.gate.set()
    for job in jobs:
        job.wait()
    assert ("queue_depth", 4) in seen
    assert ("batch_size", 4) in seen
    assert any(name == "inference_s" for name, _ in seen)


def test_only_the_batching_thread_computes_with_its_torch_threads():
    """The service's speed rests on this: one OpenMP thread team per process (see batcher.py)."""
    process_wide = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batcher = MicroBatcher(lambda pixels, config: [torch.get_num_threads()] * len(pixels), torch_threads=2)
        pixels = torch.zeros(3, 4, 4, dtype=torch.uint8)
        job, = batcher.submit([pixels], DecodeConfig(), deadline=time.monotonic() + 10)
        assert job.wait() == 2
        other = []
        thread = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert torch.get_num_threads() == 1 and other == [1]
        batcher.close()
    finally:
        torch.set_num_threads(process_wide)
