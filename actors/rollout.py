"""Rollout workers: host a ``rtb_ray.rollout.Sampler`` in one role and feed the replay store.

Roles: ``posterior`` (pulls the newest weights, samples with the exploration it is told),
``prior`` (the frozen prior) and ``backward`` (high-reward x_T from the store, noised back to
x_0). Each ``step`` makes one batch, scores it (Σ log p_prior, log r) and inserts it, waiting
on the store's rate limiter. The driver keeps a bounded number of ``step`` calls in flight per
worker; a restarted worker re-runs this constructor and so re-pulls the weights by itself.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import ray
import torch

from rtb_ray.config import validate_config
from rtb_ray.replay import Prioritised
from rtb_ray.rollout import Sampler
from rtb_ray.tasks import make_task
from rtb_ray.trajectory import Source

ROLES = ("posterior", "prior", "backward")


@ray.remote(num_cpus=1)
class RolloutWorker:
    def __init__(self, config: dict[str, Any], role: str, name: str, store: Any, weights: Any,
                 seed: int) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (roles: {ROLES})")
        # one CPU per worker: more threads only fight the other workers for the cores
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources()
                                         .get("CPU", 1))))
        cfg = validate_config(config)
        self.task = make_task(cfg.task)
        prior = self.task.prior()
        self.sampler = Sampler(self.task, prior, copy.deepcopy(prior))
        self.role, self.name, self.store, self.weights = role, name, store, weights
        self.version = -1
        self.generator = torch.Generator().manual_seed(seed)
        self.pull_weights()

    def pull_weights(self) -> int:
        """Apply the newest published weights, if newer than those held; returns the version."""
        version, refs = ray.get(self.weights.latest.remote())
        if version > self.version and refs:
            self.sampler.posterior.load_state_dict(ray.get(refs[0]))
            self.version = version
        return self.version

    def step(self, n: int, explore: float = 0.0, timeout: float | None = 60.0) -> dict[str, Any]:
        if self.role == "posterior":
            self.pull_weights()
            batch = self.sampler.rollout(Source.POSTERIOR, n, explore=explore,
                                         policy_version=self.version, generator=self.generator)
        elif self.role == "prior":
            batch = self.sampler.rollout(Source.PRIOR, n, generator=self.generator)
        else:
            known = ray.get(self.store.sample.remote(n, Prioritised(), timeout))
            batch = self.sampler.rollout(Source.BACKWARD, n, terminal=known.terminal,
                                         cond=known.cond, generator=self.generator)
        result = ray.get(self.store.insert.remote(batch, self.name, timeout))
        return {"worker": self.name, "role": self.role, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(), "version": self.version,
                "status": result.status.value, "inserted": result.inserted,
                "quarantined": result.quarantined, "reason": result.reason}
