"""Rollout workers: each hosts one role (rtb_ray/roles.py) and inserts its batches into the
replay store. A role that follows the learner pulls the newest weights first
(``runtime.max_staleness``)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import ray
import torch

from rtb_ray.config import RunConfig
from rtb_ray.learner import make_posterior
from rtb_ray.networks import load_own_state
from rtb_ray.roles import ROLES, RolloutContext
from rtb_ray.rollout import Sampler
from rtb_ray.pretrain import atomic_write_bytes
from rtb_ray.tasks import Task, make_task
from rtb_ray.trajectory import TrajectoryBatch


def install_prior(task: Task, prior_file: bytes) -> None:
    """Write the driver's prior checkpoint where this node's task looks for it, if it is not
    there (on a cluster, nodes do not share the driver's cache folder)."""
    path = task.prior_path()
    if path is not None and not path.exists():
        atomic_write_bytes(path, prior_file)


@ray.remote(num_cpus=1, max_concurrency=4)
class RolloutWorker:
    """Calls run in threads (``max_concurrency``) but sample one at a time (``_sampling``): while
    one call waits for the store to take its batch, the next one samples. Without that overlap
    one worker reached 0.77x the in-process sampler (benchmarks/runtime.py)."""

    def __init__(self, cfg: RunConfig, role: str, name: str, store: Any, weights: Any,
                 seed: int, prior_file: list[ray.ObjectRef] | None = None) -> None:
        self.role = ROLES[role]
        # a CPU share per worker: more threads only fight the other workers for the cores
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources()
                                         .get("CPU", 1))))
        task = make_task(cfg.task)
        if prior_file:
            install_prior(task, ray.get(prior_file[0]))
        prior = task.prior()
        self.cfg, self.name, self.store, self.weights = cfg, name, store, weights
        self.context = RolloutContext(
            Sampler(task, prior, make_posterior(prior, cfg.train.adapter, task)), cfg,
            torch.Generator().manual_seed(seed), read_store=self._read_store, policy_version=-1)
        self.learner_step = 0
        self.node = ray.get_runtime_context().get_node_id()
        self._sampling = threading.Lock()  # the sampler, its weights and generator
        self.pull_weights()

    def _read_store(self, n: int, rows: Any) -> TrajectoryBatch:
        return ray.get(self.store.sample.remote(n, sampler=rows, rate_limited=False,
                                                timeout=self.cfg.runtime.call_timeout_s))

    def pull_weights(self) -> int:
        """Apply the newest published weights, if newer than those held; returns the version."""
        with self._sampling:
            return self._pull_weights()

    def _pull_weights(self) -> int:
        version, refs, self.learner_step = ray.get(self.weights.latest.remote())
        # any other version: after a learner restart the newest one may be older than ours
        if version != self.context.policy_version and refs:
            try:
                sampler = self.context.sampler
                load_own_state(sampler.posterior, sampler.prior, ray.get(refs[0]))
                self.context.policy_version = version
            except ray.exceptions.RayError:  # its owner (the learner) is gone: keep ours
                pass
        return self.context.policy_version

    def _wait_fresh(self, timeout: float) -> bool:
        """Honour ``runtime.max_staleness``: wait for weights at most that many steps old."""
        bound = self.cfg.runtime.max_staleness
        deadline = time.monotonic() + timeout
        while bound is not None and self.learner_step - max(self.context.policy_version, 0) > bound:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
            self._pull_weights()
        return True

    def step(self, n: int) -> dict[str, Any]:
        """Sample ``n`` trajectories of this worker's role and insert them into the store;
        returns once the store has taken (or refused) them."""
        timeout = self.cfg.runtime.call_timeout_s
        with self._sampling:
            t0 = time.perf_counter()
            if self.role.follows_learner:
                self._pull_weights()
                if not self._wait_fresh(timeout):
                    return self._result("stale", 0, 0, f"no weights within "
                                        f"{self.cfg.runtime.max_staleness} steps of the learner "
                                        f"after {timeout}s", time.perf_counter() - t0, 0.0)
            batch = self.role.rollout(self.context, n)
            sample_s, version = time.perf_counter() - t0, self.context.policy_version
        t0 = time.perf_counter()
        result = ray.get(self.store.insert.remote(batch, worker=self.name, timeout=timeout))
        return self._result(result.status.value, result.inserted, result.quarantined,
                            result.reason, sample_s, time.perf_counter() - t0, version)

    def _result(self, status: str, inserted: int, quarantined: int, reason: str,
                sample_s: float, insert_s: float, version: int | None = None) -> dict[str, Any]:
        return {"worker": self.name, "role": self.role.name, "pid": os.getpid(), "node": self.node,
                "version": self.context.policy_version if version is None else version,
                "sample_s": sample_s,
                "insert_s": insert_s, "status": status, "inserted": inserted,
                "quarantined": quarantined, "reason": reason}
