"""The replay store (rtb_ray/replay) hosted as an actor: inserts from the rollout workers,
samples for the learner and for backward rollouts."""

from __future__ import annotations

from typing import Any

import ray

from rtb_ray.batches import store_settings
from rtb_ray.config import RunConfig
from rtb_ray.replay import ReplayStore


def start_store(cfg: RunConfig, directory: str | None, run: str, **options: Any) -> Any:
    """The run's ``ReplayStore`` in an actor (``options``: Ray's, e.g. name, scheduling).
    ``max_concurrency``: an insert waiting on the rate limiter must not block the learner's
    samples; the store is thread-safe."""
    return ray.remote(ReplayStore).options(num_cpus=0, max_concurrency=16, **options).remote(
        directory, run=run, **store_settings(cfg))
