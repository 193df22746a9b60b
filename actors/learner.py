"""The learner actor: ``rtb_ray.loop.train`` with ``StoreBatches``, which samples the replay
store actor (the next batch requested before the step runs), publishes weight versions, and adds
the coordinator's figures to the train rows. Uses CUDA when given a GPU and one is present."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch

from rtb_ray.config import RunConfig
from rtb_ray.learner import Learner
from rtb_ray.loop import Run, prepare, train
from rtb_ray.metrics import staleness, staleness_quantiles
from rtb_ray.networks import own_state
from rtb_ray.replay import ReplayDiskError, SampleTimeout
from rtb_ray.roles import training_mixture
from rtb_ray.tracking import TrackingRequest
from rtb_ray.trajectory import TrajectoryBatch


def _get(ref: ray.ObjectRef) -> Any:
    """``ray.get`` of a store call; the store's own errors come as their one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, SampleTimeout):
            raise RuntimeError(f"learner starved: {err.cause}") from None
        if isinstance(err.cause, ReplayDiskError):
            raise err.cause from None  # not its remote traceback
        raise


class StoreBatches:
    """The Ray runtime's ``BatchSource`` (rtb_ray/batches.py)."""

    def __init__(self, cfg: RunConfig, store: Any, weights: Any, coordinator: Any) -> None:
        self.cfg, self.store, self.weights, self.coordinator = cfg, store, weights, coordinator
        self.mixture = training_mixture(cfg)
        self.next_ref: ray.ObjectRef | None = None
        self.staleness: list[torch.Tensor] = []
        self.runtime: dict[str, float] = {}
        self.runtime_ref: ray.ObjectRef | None = None
        self.sample_wait_s = 0.0

    def _request(self) -> ray.ObjectRef:
        return self.store.sample.remote(self.cfg.train.batch_size, sampler=self.mixture,
                                        timeout=self.cfg.runtime.sample_timeout_s)

    def next_batch(self, learner: Learner) -> TrajectoryBatch:
        """The next batch; the one after is requested before returning (overlaps the step)."""
        t0 = time.perf_counter()
        batch = _get(self.next_ref or self._request())
        self.sample_wait_s += time.perf_counter() - t0
        self.next_ref = self._request()
        self.staleness.append(staleness(batch, learner.version))
        return batch

    def publish(self, learner: Learner) -> None:
        # the posterior's own tensors only: a LoRA or residual posterior's frozen base is the
        # prior every worker already holds
        state = {k: v.detach().cpu()
                 for k, v in own_state(learner.posterior, learner.prior).items()}
        self.weights.publish.remote(learner.version, [ray.put(state)])

    def after_step(self, learner: Learner) -> None:
        if learner.version % self.cfg.runtime.publish_every_steps == 0:
            self.publish(learner)
        else:  # the learner's progress: what max_staleness is measured against
            self.weights.set_learner_step.remote(learner.version)

    def row_extras(self) -> dict[str, float]:
        """Staleness of the rows trained on since the last row, and the coordinator's latest
        figures without waiting (the request made at the previous row, if it is back)."""
        row = staleness_quantiles(torch.cat(self.staleness)) if self.staleness else {}
        self.staleness.clear()
        if self.runtime_ref is not None and ray.wait([self.runtime_ref], timeout=0)[0]:
            self.runtime, self.runtime_ref = ray.get(self.runtime_ref), None
        if self.runtime_ref is None:
            self.runtime_ref = self.coordinator.metrics.remote()
        return {**row, **self.runtime, "learner_sample_wait_s": self.sample_wait_s}

    def state_dict(self) -> dict[str, Any]:
        _get(self.store.flush.remote(self.cfg.runtime.sample_timeout_s))  # rows on disk first
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # the store reopens its sealed segments itself


@ray.remote(num_cpus=1, max_concurrency=2)
class LearnerActor:
    def __init__(self, cfg: RunConfig, output: str, store: Any, weights: Any, coordinator: Any,
                 resume: bool, tracking: TrackingRequest | None) -> None:
        context = ray.get_runtime_context()
        resources = context.get_assigned_resources()
        device = "cuda" if resources.get("GPU", 0) and torch.cuda.is_available() else "cpu"
        self.run: Run = prepare(cfg, Path(output), resume=resume, device=device,
                                torch_threads=max(1, int(resources.get("CPU", 1))))
        self.batches = StoreBatches(cfg, store, weights, coordinator)
        self.batches.publish(self.run.learner)  # version 0, or the checkpoint's on resume
        self.run.run_dir.start(tracking, ray_address=context.gcs_address)
        self.stop_requested = threading.Event()

    def train(self) -> dict[str, Any]:
        """Run to train.steps (or until ``stop``); the final evaluation, or {"stopped": step}."""
        try:
            final = train(self.run, self.batches, progress=False, stop=self.stop_requested)
        except KeyboardInterrupt:
            return {"stopped": True, "step": self.run.learner.step_count}
        return {"stopped": False, **final}

    def stop(self) -> None:
        self.stop_requested.set()

    def status(self) -> dict[str, Any]:
        run = self.run
        return {"step": run.learner.step_count, "steps": run.cfg.train.steps,
                "device": str(run.learner.device), "wall_s": run.run_dir.clock.wall_s,
                "train": dict(run.run_dir.last["train"]), "eval": dict(run.run_dir.last["eval"])}

    def tracking(self) -> str | None:
        tracker = self.run.run_dir.tracker
        return None if tracker is None else tracker.describe()
