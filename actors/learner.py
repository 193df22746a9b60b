"""The learner actor: hosts ``rtb_ray.trainer.ReplayTrainer`` and connects it to the replay
store (batches, prefetched one ahead), the weight store (published versions) and the
coordinator (runtime stats for the train rows). ``train`` runs the whole loop; ``status`` and
``stop`` are served meanwhile (``max_concurrency=2``). Uses CUDA when the actor was given GPUs
(``runtime.learner_num_gpus``) and one is present, the CPU otherwise."""

from __future__ import annotations

import time
from typing import Any

import ray
import torch

from rtb_ray.config import validate_config
from rtb_ray.replay import Mixture, Recency, SampleTimeout, Uniform
from rtb_ray.trainer import ReplayTrainer
from rtb_ray.trajectory import TrajectoryBatch


def store_mixture(sources: dict[str, float], recency_half_life: int | None) -> Mixture:
    """The training batch's source quotas (train.sources) as a replay sampler; posterior rows
    sampled with exploration count as posterior rows."""
    pools = {"posterior": "posterior|explore", "prior": "prior", "backward": "backward"}
    inner = Uniform() if recency_half_life is None else Recency(recency_half_life)
    return Mixture({pools[name]: share for name, share in sources.items() if share > 0}, inner)


@ray.remote(num_cpus=1, max_concurrency=2)
class LearnerActor:
    def __init__(self, config: dict[str, Any], output: str, store: Any, weights: Any,
                 coordinator: Any, resume: bool, tracking_uri: str | None,
                 sample_timeout: float = 600.0) -> None:
        cfg = validate_config(config)
        gpus = ray.get_runtime_context().get_assigned_resources().get("GPU", 0)
        cfg = cfg.model_copy(update={"device": "cuda" if gpus and torch.cuda.is_available()
                                     else "cpu"})
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        self.store, self.weights, self.coordinator = store, weights, coordinator
        self.mixture = store_mixture(cfg.train.sources, cfg.runtime.replay.recency_half_life)
        self.batch_size, self.sample_timeout = cfg.train.batch_size, sample_timeout
        self.next_batch: ray.ObjectRef | None = None
        self.runtime: dict[str, float] = {}
        self.runtime_ref: ray.ObjectRef | None = None
        self.sample_wait_s = 0.0
        self.trainer = ReplayTrainer(cfg, output, sample_batch=self._sample_batch,
                                     publish=self._publish, runtime_stats=self._runtime_stats,
                                     flush_store=lambda: ray.get(store.flush.remote(600)),
                                     resume=resume, tracking_uri=tracking_uri,
                                     ray_address=ray.get_runtime_context().gcs_address,
                                     torch_threads=cfg.torch_threads or max(1, int(cpus)))

    # -- the trainer's connections ---------------------------------------------------------------
    def _sample_batch(self) -> TrajectoryBatch:
        """The next batch; the one after is requested before returning (overlaps the step)."""
        def request() -> ray.ObjectRef:
            return self.store.sample.remote(self.batch_size, self.mixture, self.sample_timeout)

        ref = self.next_batch or request()
        t0 = time.perf_counter()
        try:
            batch = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, SampleTimeout):
                raise RuntimeError(f"learner starved: {err.cause}") from None
            raise
        self.sample_wait_s += time.perf_counter() - t0
        self.next_batch = request()
        return batch

    def _publish(self, version: int, state_dict: dict[str, torch.Tensor] | None) -> None:
        if state_dict is None:  # just the step: what max_staleness is measured against
            self.weights.set_learner_step.remote(version)
        else:
            self.weights.publish.remote(version, [ray.put(state_dict)])

    def _runtime_stats(self) -> dict[str, float]:
        """The coordinator's latest numbers, without waiting: the request made at the previous
        train row is read if it has come back."""
        if self.runtime_ref is not None:
            ready, _ = ray.wait([self.runtime_ref], timeout=0)
            if ready:
                self.runtime = ray.get(self.runtime_ref)
                self.runtime_ref = None
        if self.runtime_ref is None:
            self.runtime_ref = self.coordinator.metrics.remote()
        return {**self.runtime, "learner_sample_wait_s": self.sample_wait_s}

    # -- calls from the driver ---------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run to train.steps (or until ``stop``); the final evaluation, or {"stopped": step}."""
        try:
            final = self.trainer.train()
        except KeyboardInterrupt:
            return {"stopped": True, "step": self.trainer.learner.step_count}
        return {"stopped": False, **final}

    def stop(self) -> None:
        self.trainer.stop_requested.set()

    def status(self) -> dict[str, Any]:
        t = self.trainer
        return {"step": t.learner.step_count, "steps": t.cfg.train.steps,
                "device": str(t.device), "wall_s": t.clock.wall_s,
                "train": dict(t.last_train), "eval": dict(t.last_eval)}

    def tracking(self) -> dict[str, str] | None:
        tr = self.trainer.tracker
        if tr is None:
            return None
        return {"run_id": tr.run_id, "experiment": tr.experiment_name, "ui_hint": tr.ui_hint(),
                "resumed": str(tr.resumed)}
