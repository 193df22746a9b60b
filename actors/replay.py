"""The replay store hosted in an actor: concurrent inserts from workers, samples for the learner.

``max_concurrency`` lets a throttled insert wait inside the store (its rate limiter) without
blocking the learner's samples; the store itself is thread-safe.
"""

from __future__ import annotations

import ray

from rtb_ray.batches import make_store
from rtb_ray.config import RunConfig
from rtb_ray.replay import InsertResult, Sampler
from rtb_ray.trajectory import TrajectoryBatch


@ray.remote(num_cpus=0, max_concurrency=16)
class ReplayStoreActor:
    def __init__(self, cfg: RunConfig, directory: str | None, run: str) -> None:
        self.store = make_store(cfg, directory, run)

    def insert(self, batch: TrajectoryBatch, worker: str, timeout: float | None) -> InsertResult:
        return self.store.insert(batch, worker=worker, timeout=timeout)

    def sample(self, n: int, sampler: Sampler | None = None, timeout: float | None = None,
               rate_limited: bool = True) -> TrajectoryBatch:
        return self.store.sample(n, sampler=sampler, timeout=timeout, rate_limited=rate_limited)

    def flush(self, timeout: float | None = None) -> bool:
        return self.store.flush(timeout)

    def stats(self) -> dict:
        return self.store.stats()

    def close(self) -> None:
        self.store.close()
