"""The evaluator: the generic metrics (ELBO, EUBO against a fixed pool of prior trajectories
resampled ∝ r^β, ESS, log Z against the task's reference; RTB.md, "Metrics"), the task's own
metrics, and its picture of the samples."""

from __future__ import annotations

from pathlib import Path

import torch

from rtb_ray.config import RunConfig
from rtb_ray.learner import Learner
from rtb_ray.metrics import posterior_metrics
from rtb_ray.rollout import Sampler
from rtb_ray.tasks import Task
from rtb_ray.trajectory import Source

TARGET_POOL_MAX = 20_000  # prior trajectories kept for the EUBO (memory: T+1 states each)


class Evaluator:
    def __init__(self, cfg: RunConfig, task: Task, learner: Learner, eval_dir: Path) -> None:
        self.cfg, self.task, self.learner, self.eval_dir = cfg, task, learner, Path(eval_dir)
        self.sampler = Sampler(task, learner.prior, learner.posterior)
        self.target_pool = self.sampler.rollout(
            Source.PRIOR, min(cfg.eval.num_samples, TARGET_POOL_MAX),
            generator=torch.Generator().manual_seed(cfg.seeds.eval_targets))

    def __call__(self, n: int, name: str) -> dict[str, float]:
        """Metrics of ``n`` posterior samples at the learner's step; draws ``eval/<name>.png``."""
        step = self.learner.step_count
        gen = torch.Generator().manual_seed(self.cfg.seeds.evaluation(step))
        samples = self.sampler.rollout(Source.POSTERIOR, n, generator=gen)
        beta = self.cfg.train.objective.beta
        ref = self.task.reference_log_z(beta)
        metrics = posterior_metrics(self.task.family, self.learner.posterior, self.learner.prior,
                                    samples, self.target_pool, beta, ref, generator=gen)
        metrics.update(self.task.evaluate(samples.terminal.cpu()))
        metrics["log_z"] = self.learner.log_z.item()
        if ref is not None:
            metrics["log_z_error"] = metrics["log_z"] - ref
        self.task.plot(samples.terminal.cpu(), self.eval_dir / f"{name}.png", title=f"step {step}")
        return {**metrics, "step": step, "num_samples": n}

    def input_example(self, rows: int = 8) -> dict[str, torch.Tensor]:
        """Example forward arguments of the posterior network, ``net(x_t, t_index[, cond])``:
        states of a few target-pool trajectories at different steps (for MLflow's signature)."""
        states = self.target_pool.states
        n = min(rows, states.shape[0])
        t_index = torch.arange(n, device=states.device) % (states.shape[1] - 1)
        example = {"x": states[torch.arange(n, device=states.device), t_index],
                   "t_index": t_index}
        if self.target_pool.cond is not None:
            example["cond"] = self.target_pool.cond[:n]
        return example


def format_eval(m: dict[str, float], keys: tuple[str, ...] = ()) -> str:
    """One line of an evaluation: the step, the task's ``keys``, the generic gaps."""
    keys = ("step", *keys, "elbo_gap", "eubo_gap", "log_z_error", "mean_log_reward", "train_s")
    return "eval " + " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)
