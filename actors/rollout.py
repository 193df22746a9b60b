"""Rollout workers: host a ``rtb_ray.rollout.Sampler`` in one role and feed the replay store.

Roles: ``posterior`` (pulls the newest weights, samples with the exploration of the learner's
progress), ``prior`` (the frozen prior) and ``backward`` (recent stored terminal states,
resampled by their importance weights toward the target, noised back to x_0). Each ``step``
makes one batch, scores it (Σ log p_prior, log r) and inserts it, waiting on the store's rate
limiter. The coordinator keeps a bounded number of ``step`` calls in flight per worker and
replaces workers that die; a new worker pulls the weights in its constructor.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import ray
import torch

from rtb_ray.config import ROLES, validate_config
from rtb_ray.learner import make_posterior
from rtb_ray.metrics import sir_indices, target_log_weights
from rtb_ray.replay import Mixture, Recency
from rtb_ray.rollout import Sampler
from rtb_ray.tasks import make_task
from rtb_ray.trajectory import Source, TrajectoryBatch


def install_prior(config: dict[str, Any], prior_file: bytes | None) -> None:
    """Write the driver's prior checkpoint where this node's task looks for it, if it is not
    there (on a cluster, nodes do not share the driver's cache folder)."""
    from rtb_ray.pretrain import atomic_write_bytes

    cfg = validate_config({**config, "task": {**config["task"], "pretrain_if_missing": True}})
    path = cfg.task.prior_path() if hasattr(cfg.task, "prior_path") else None
    if prior_file is not None and path is not None and not path.exists():
        atomic_write_bytes(path, prior_file)


@ray.remote(num_cpus=1, max_concurrency=4)
class RolloutWorker:
    """Calls run in threads (``max_concurrency``) but sample one at a time (``_sampling``): while
    one call waits for the store to take its batch, the next one samples. Without that overlap
    one worker reached 0.77x the in-process sampler (benchmarks/runtime.py)."""

    def __init__(self, config: dict[str, Any], role: str, name: str, store: Any, weights: Any,
                 seed: int, prior_file: list[ray.ObjectRef] | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (roles: {ROLES})")
        # a CPU share per worker: more threads only fight the other workers for the cores
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources()
                                         .get("CPU", 1))))
        if prior_file:
            install_prior(config, ray.get(prior_file[0]))
        self.cfg = validate_config(config)
        self.task = make_task(self.cfg.task)
        prior = self.task.prior()
        self.sampler = Sampler(self.task, prior, make_posterior(prior, self.cfg.train.adapter))
        self.role, self.name, self.store, self.weights = role, name, store, weights
        self.version = -1
        self.learner_step = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.node = ray.get_runtime_context().get_node_id()
        self._sampling = threading.Lock()  # the sampler, its weights and generator
        # backward starts: recent forward terminals (half-life of train.backward_pool rows)
        self.recent_forward = Mixture({"posterior|explore|prior": 1.0},
                                      inner=Recency(self.cfg.train.backward_pool))
        self.pull_weights()

    def pull_weights(self) -> int:
        """Apply the newest published weights, if newer than those held; returns the version."""
        with self._sampling:
            return self._pull_weights()

    def _pull_weights(self) -> int:
        version, refs, self.learner_step = ray.get(self.weights.latest.remote())
        if version > self.version and refs:
            try:
                self.sampler.posterior.load_state_dict(ray.get(refs[0]))
                self.version = version
            except ray.exceptions.RayError:  # its owner (the learner) is gone: keep ours
                pass
        return self.version

    def _wait_fresh(self, timeout: float | None) -> bool:
        """Honour ``runtime.max_staleness``: wait for weights at most that many steps old."""
        bound = self.cfg.runtime.max_staleness
        deadline = None if timeout is None else time.monotonic() + timeout
        while bound is not None and self.learner_step - max(self.version, 0) > bound:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
            self._pull_weights()
        return True

    def step(self, n: int, timeout: float | None = 60.0) -> dict[str, Any]:
        """Sample ``n`` trajectories of this worker's role and insert them into the store;
        returns once the store has taken (or refused) them."""
        with self._sampling:
            t0 = time.perf_counter()
            batch, version = self._sample(n, timeout)
            sample_s = time.perf_counter() - t0
        if batch is None:
            return self._result("stale", version, 0, 0, f"no weights within "
                                f"{self.cfg.runtime.max_staleness} steps of the learner after "
                                f"{timeout}s", sample_s, 0.0)
        t0 = time.perf_counter()
        result = ray.get(self.store.insert.remote(batch, self.name, timeout))
        return self._result(result.status.value, version, result.inserted, result.quarantined,
                            result.reason, sample_s, time.perf_counter() - t0)

    def _sample(self, n: int, timeout: float | None) -> tuple[TrajectoryBatch | None, int]:
        if self.role == "posterior":
            self._pull_weights()
            if not self._wait_fresh(timeout):
                return None, self.version
            progress = max(self.version, 0) / self.cfg.train.steps
            batch = self.sampler.rollout(Source.POSTERIOR, n,
                                         explore=self.cfg.train.explore.at(progress),
                                         policy_version=self.version, generator=self.generator)
        elif self.role == "prior":
            batch = self.sampler.rollout(Source.PRIOR, n, generator=self.generator)
        else:
            k = self.cfg.runtime.backward_candidates
            known = ray.get(self.store.sample.remote(n * k, self.recent_forward, timeout,
                                                     rate_limited=False))
            pick = sir_indices(target_log_weights(known, self.cfg.train.objective.beta), n,
                               self.generator)
            batch = self.sampler.rollout(Source.BACKWARD, n, terminal=known.terminal[pick],
                                         cond=None if known.cond is None else known.cond[pick],
                                         generator=self.generator)
        return batch, self.version

    def _result(self, status: str, version: int, inserted: int, quarantined: int, reason: str,
                sample_s: float, insert_s: float) -> dict[str, Any]:
        return {"worker": self.name, "role": self.role, "pid": os.getpid(),
                "node": self.node, "version": version, "sample_s": sample_s,
                "insert_s": insert_s,
                "status": status, "inserted": inserted, "quarantined": quarantined,
                "reason": reason}
