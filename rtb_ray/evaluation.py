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
from rtb_ray.tasks import EvalContext, Task, conditional
from rtb_ray.trajectory import Source, TrajectoryBatch

TARGET_POOL_MAX = 20_000  # prior trajectories kept for the EUBO (memory: T+1 states each)


class Evaluator:
    """A conditional task is evaluated per condition of ``eval_conditions()``: every metric
    (and the EUBO's resampling, and log Z_φ(y) against the task's log Z(y)) within one
    condition, then reported as the mean over conditions and the worst one."""

    def __init__(self, cfg: RunConfig, task: Task, learner: Learner, eval_dir: Path) -> None:
        self.cfg, self.task, self.learner, self.eval_dir = cfg, task, learner, Path(eval_dir)
        self.sampler = Sampler(task, learner.prior, learner.posterior)
        self.conditions = task.eval_conditions() if conditional(task) else None
        pool = min(cfg.eval.num_samples, TARGET_POOL_MAX)
        gen = torch.Generator().manual_seed(cfg.seeds.eval_targets)
        self.target_pool = self.sampler.rollout(
            Source.PRIOR, self._per_condition(pool) * self._num_conditions,
            cond=self._repeated(pool), generator=gen)

    @property
    def _num_conditions(self) -> int:
        return 1 if self.conditions is None else self.conditions.shape[0]

    def _per_condition(self, n: int) -> int:
        return max(n // self._num_conditions, 2)

    def _repeated(self, n: int) -> torch.Tensor | None:
        """The evaluation conditions, each repeated for its share of ``n`` rows."""
        if self.conditions is None:
            return None
        return self.conditions.repeat_interleave(self._per_condition(n), dim=0).to(
            self.learner.device)

    def __call__(self, n: int, name: str) -> dict[str, float]:
        """Metrics of ``n`` posterior samples at the learner's step; draws ``eval/<name>.png``."""
        step = self.learner.step_count
        gen = torch.Generator().manual_seed(self.cfg.seeds.evaluation(step))
        cond = self._repeated(n)
        samples = self.sampler.rollout(Source.POSTERIOR, self._per_condition(n) *
                                       self._num_conditions, cond=cond, generator=gen)
        metrics = self._generic_metrics(samples, gen)
        x = samples.terminal.cpu()
        if self.conditions is None:
            metrics.update(self.task.evaluate(x))
            self.task.plot(x, self.eval_dir / f"{name}.png", title=f"step {step}")
        else:
            ctx = EvalContext(self.learner.prior, self.learner.posterior, generator=gen,
                              sample=lambda c: self.sampler.rollout(
                                  Source.POSTERIOR, c.shape[0], cond=c, generator=gen).terminal)
            metrics.update(self.task.evaluate(x, samples.cond.cpu(), ctx))
            self.task.plot(x, self.eval_dir / f"{name}.png", title=f"step {step}",
                           cond=samples.cond.cpu())
        return {**metrics, "step": step, "num_samples": samples.states.shape[0]}

    def _generic_metrics(self, samples: TrajectoryBatch, gen: torch.Generator
                         ) -> dict[str, float]:
        """ELBO, EUBO, IW log Z, ESS and log Z_φ against the reference: of the whole sample,
        or per condition (mean, and the worst condition as ``*_max`` / ``*_min``)."""
        beta, family = self.cfg.train.objective.beta, self.task.family
        learner = self.learner
        if self.conditions is None:
            ref = self.task.reference_log_z(beta)
            metrics = posterior_metrics(family, learner.posterior, learner.prior, samples,
                                        self.target_pool, beta, ref, generator=gen)
            metrics["log_z"] = learner.mean_log_z().item()
            if ref is not None:
                metrics["log_z_error"] = metrics["log_z"] - ref
            return metrics
        m = self._num_conditions
        refs = self.task.reference_log_z(beta, self.conditions)
        log_z = learner.log_z_of(self.conditions, m).cpu()
        rows, pool_rows = samples.states.shape[0] // m, self.target_pool.states.shape[0] // m
        per: list[dict[str, float]] = []
        for i in range(m):
            ref = None if refs is None else float(refs[i])
            one = posterior_metrics(
                family, learner.posterior, learner.prior,
                samples.index(torch.arange(i * rows, (i + 1) * rows)),
                self.target_pool.index(torch.arange(i * pool_rows, (i + 1) * pool_rows)),
                beta, ref, eubo_samples=max(pool_rows, 2), generator=gen)
            one["log_z"] = float(log_z[i])
            if ref is not None:
                one["log_z_error"] = one["log_z"] - ref
            per.append(one)
        return aggregate_over_conditions(per)

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


WORST = {"elbo_gap": max, "eubo_gap": max, "ess_fraction": min}


def aggregate_over_conditions(per: list[dict[str, float]]) -> dict[str, float]:
    """Per-condition metrics as their mean (the key itself) and their worst case: the largest
    gaps (``*_max``), the smallest ESS (``ess_fraction_min``), the mean and the largest
    |log Z error| (``log_z_abs_error``, ``log_z_error_max``: the signed mean can cancel)."""
    out = {k: sum(p[k] for p in per) / len(per) for k in per[0]}
    for key, worst in WORST.items():
        if key in out:
            out[f"{key}_{worst.__name__}"] = worst(p[key] for p in per)
    if "log_z_error" in out:
        errors = [abs(p["log_z_error"]) for p in per]
        out["log_z_abs_error"] = sum(errors) / len(errors)
        out["log_z_error_max"] = max(errors)
    return out


def format_eval(m: dict[str, float], keys: tuple[str, ...] = ()) -> str:
    """One line of an evaluation: the step, the task's ``keys``, the generic gaps."""
    keys = ("step", *keys, "elbo_gap", "eubo_gap", "log_z_error", "mean_log_reward", "train_s")
    return "eval " + " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)
