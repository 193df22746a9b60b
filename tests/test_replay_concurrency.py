"""The rate limiter, and the store under several writer threads and one sampler thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from rtb_ray.replay import InsertStatus, RateLimiter, ReplayStore, SampleTimeout
from rtb_ray.trajectory import Source, TrajectoryBatch


def batch(b: int, payload: np.ndarray | None = None) -> TrajectoryBatch:
    """``payload`` goes to log_prior, so a row can be recognised after the store gave it an id."""
    prior = torch.zeros(b) if payload is None else torch.from_numpy(payload.astype(np.float32))
    return TrajectoryBatch.make(torch.randn(b, 5, 2), torch.randn(b), prior, torch.zeros(b),
                                Source.POSTERIOR)


def test_sample_waits_for_min_size_and_times_out_clearly() -> None:
    store = ReplayStore(capacity_trajectories=1000, min_size_to_sample=100)
    store.insert(batch(60))
    t0 = time.perf_counter()
    with pytest.raises(SampleTimeout, match="holds 60 rows, fewer than min_size_to_sample=100"):
        store.sample(8, timeout=0.2)
    assert time.perf_counter() - t0 >= 0.19
    assert store.stats()["sample_timeouts"] == 1 and store.stats()["sampled"] == 0

    # a waiting sampler is woken by the insert that makes the store big enough
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(store.sample(8, timeout=10)))
    waiter.start()
    time.sleep(0.1)
    assert not got  # still waiting
    store.insert(batch(40))
    waiter.join(timeout=10)
    assert len(got) == 1 and len(got[0]) == 8


def test_inserts_are_throttled_when_the_learner_lags() -> None:
    store = ReplayStore(capacity_trajectories=10_000, samples_per_insert=1.0, error_buffer=100,
                        min_size_to_sample=100)
    for _ in range(3):  # e = 1·(inserted − 100) − sampled: 0, 100, 200 after these inserts
        assert store.insert(batch(100), timeout=0).ok
    before = store.stats()
    result = store.insert(batch(100), timeout=0.2)
    assert result.status == InsertStatus.THROTTLED and "learner lags" in result.reason
    with pytest.raises(TimeoutError, match="insert throttled"):
        result.raise_for_status()
    after = store.stats()
    assert after["throttled_inserts"] == 1
    assert (after["size"], after["next_id"]) == (before["size"], before["next_id"]) == (300, 300)

    # a waiting writer is released by the learner catching up
    results: list = []
    writer = threading.Thread(target=lambda: results.append(store.insert(batch(100), timeout=10)))
    writer.start()
    time.sleep(0.1)
    assert not results
    store.sample(150)  # e = 200 − 150 = 50 <= error_buffer
    writer.join(timeout=10)
    assert results[0].ok and store.size == 400


def test_sampling_waits_when_the_writers_lag() -> None:
    store = ReplayStore(capacity_trajectories=10_000, samples_per_insert=2.0, error_buffer=50,
                        min_size_to_sample=10)
    store.insert(batch(30))  # e = 2·(30 − 10) = 40
    store.sample(60)  # e = −20, still >= −50
    store.sample(40)  # e = −60: the next sample must wait for inserts
    with pytest.raises(SampleTimeout, match="the writers lag"):
        store.sample(10, timeout=0.1)
    store.insert(batch(10))  # e = −40
    assert len(store.sample(10, timeout=0)) == 10


def test_rate_limiter_allows_one_side_whenever_the_other_is_blocked() -> None:
    limiter = RateLimiter(samples_per_insert=4.0, error_buffer=8, min_size_to_sample=5)
    rng = np.random.default_rng(0)
    size = 0
    for _ in range(2000):
        assert limiter.can_insert(size) or limiter.can_sample(size)
        if limiter.can_insert(size) and (rng.random() < 0.5 or not limiter.can_sample(size)):
            n = int(rng.integers(1, 20))
            limiter.inserted += n
            size += n
        else:
            limiter.sampled += int(rng.integers(1, 40))
    with pytest.raises(ValueError, match="error_buffer"):
        RateLimiter(samples_per_insert=1.0)


def test_concurrent_writers_and_sampler_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """3 writers and a slower sampler (so writers get throttled and retry), through a store
    smaller than what is written (so rows are evicted, after they are sealed to disk)."""
    writers, batches, rows, capacity = 3, 40, 50, 2048
    store = ReplayStore(tmp_path, capacity_trajectories=capacity, segment_rows=256,
                        samples_per_insert=0.5, error_buffer=100, min_size_to_sample=100, seed=0)
    results: dict[int, list] = {w: [] for w in range(writers)}
    sampled: list[TrajectoryBatch] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def write(w: int) -> None:
        try:
            for i in range(batches):
                payload = w * 1_000_000 + i * rows + np.arange(rows)
                while True:  # a throttled insert changed nothing: retry the same batch
                    result = store.insert(batch(rows, payload), worker=f"w{w}", timeout=0.01)
                    results[w].append(result)
                    if result.ok:
                        break
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def sample() -> None:
        try:
            while not done.is_set():
                try:
                    sampled.append(store.sample(32, timeout=0.01))
                except SampleTimeout:
                    pass
                # a learner step; now and then a long one, so that writers must be throttled
                time.sleep(0.02 if len(sampled) % 20 == 0 else 0.001)
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    sampler = threading.Thread(target=sample)
    for t in [sampler, *threads]:
        t.start()
    for t in threads:
        t.join(timeout=60)
    done.set()
    sampler.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in [sampler, *threads])

    total = writers * batches * rows
    ok = [r for rs in results.values() for r in rs if r.ok]
    throttled = [r for rs in results.values() for r in rs if r.status == InsertStatus.THROTTLED]
    assert len(ok) == writers * batches
    assert len(ok) + len(throttled) == sum(map(len, results.values()))
    assert throttled  # the limiter did hold writers back
    # every inserted row got exactly one id, and the ids are exactly 0 .. total - 1
    assert sorted(r.first_id for r in ok) == list(range(0, total, rows))
    assert store.to_table().column("id").to_pylist() == list(range(total - capacity, total))

    stats = store.stats()
    assert stats["inserted"] == total and stats["evicted"] == total - capacity
    assert stats["sampled"] == 32 * len(sampled)
    assert stats["throttled_inserts"] == len(throttled) and stats["rejected_batches"] == 0
    # the learner kept to the ratio: e = 0.5·(total − 100) − sampled, ± one batch of overshoot
    assert abs(0.5 * (total - 100) - stats["sampled"]) <= 100 + 0.5 * rows + 32

    store.close()  # the sealer thread wrote every row, exactly once
    table = ds.dataset(tmp_path, format="ipc").to_table()
    ids = table.column("id").to_numpy()
    payload = table.column("log_prior").to_numpy().astype(np.int64)
    assert sorted(ids) == list(range(total))
    assert sorted(payload) == sorted(w * 1_000_000 + j for w in range(writers)
                                     for j in range(batches * rows))  # none lost, none twice
    workers = table.column("worker").to_pylist()
    assert all(p // 1_000_000 == int(name[1:]) for p, name in zip(payload, workers))
    # every sampled row is the whole row that was stored under its id (no torn reads)
    payload_of = dict(zip(ids.tolist(), payload.tolist()))
    for b in sampled:
        for i, prior in zip(b.extras["id"].tolist(), b.log_prior.tolist()):
            assert payload_of[i] == int(prior)
