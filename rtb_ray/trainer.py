"""The in-process trainer: the loop the distributed runtime runs, in one process.

    sample (posterior with exploration / prior / backward) → RTB step → evaluate → checkpoint

Run directory layout (also read by ``rtb-ray sample``):
    config.yaml        the resolved config
    metrics.jsonl      one JSON row per log interval ("train") and per evaluation ("eval")
    eval/step_N.json   evaluation metrics;  eval/step_N.png  a picture of posterior samples
    final_eval.json    the last evaluation, on eval.final_num_samples samples
    checkpoint.pt      learner state, RNG, counters (atomic; loads with weights_only=True)
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from rtb_ray.config import RunConfig, config_to_dict
from rtb_ray.learner import Learner
from rtb_ray.metrics import posterior_metrics, sir_indices
from rtb_ray.pretrain import atomic_torch_save
from rtb_ray.rollout import Sampler
from rtb_ray.tasks import Task, make_task
from rtb_ray.trajectory import Source, TrajectoryBatch

CHECKPOINT_FORMAT = "rtb-ray-run/1"
LOG_EVERY = 50


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but torch sees no GPU")
    return torch.device(name)


def source_counts(shares: dict[str, float], batch_size: int) -> dict[Source, int]:
    """Split a batch between sources by their shares (largest remainder, sums to batch_size)."""
    total = sum(shares.values())
    exact = {Source.parse(k): v / total * batch_size for k, v in shares.items() if v > 0}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True):
        if sum(counts.values()) >= batch_size:
            break
        counts[k] += 1
    return {k: v for k, v in counts.items() if v > 0}


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


@dataclass
class TerminalPool:
    """Recent terminal states of forward rollouts (posterior and prior) with their rewards:
    what backward trajectories start from. Drawn ∝ r^β, so prior-sourced states are resampled
    towards the target and reach every mode the prior covers."""

    capacity: int
    beta: float = 1.0
    x: torch.Tensor | None = None
    log_reward: torch.Tensor | None = None

    def add(self, batch: TrajectoryBatch) -> None:
        keep = torch.isfinite(batch.log_reward)  # kept on the CPU: small, and checkpointed
        x, lr = batch.terminal[keep].cpu(), batch.log_reward[keep].cpu()
        if self.x is None or self.log_reward is None:
            self.x, self.log_reward = x, lr
        else:
            self.x = torch.cat([self.x, x])[-self.capacity :]
            self.log_reward = torch.cat([self.log_reward, lr])[-self.capacity :]

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor | None:
        if self.x is None or self.log_reward is None or self.x.shape[0] == 0:
            return None
        return self.x[sir_indices(self.beta * self.log_reward, n, gen)]


@dataclass
class Clock:
    """Wall time of the fine-tuning, and how much of it went to evaluation."""

    start: float = field(default_factory=time.perf_counter)
    offset: float = 0.0  # time already spent before a resume
    eval_s: float = 0.0

    @property
    def wall_s(self) -> float:
        return self.offset + time.perf_counter() - self.start


class InProcessTrainer:
    def __init__(self, cfg: RunConfig, output: Path, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.output = Path(output)
        self.progress = progress
        torch.set_num_threads(cfg.torch_threads or len(os.sched_getaffinity(0)))
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.task: Task = make_task(cfg.task)
        prior = self.task.prior()
        self.learner = Learner(self.task.family, prior, cfg.train, self.device, cfg.seed)
        self.sampler = Sampler(self.task, self.learner.prior, self.learner.posterior)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.pool = TerminalPool(cfg.train.backward_pool, cfg.train.objective.beta)
        self.clock = Clock()
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "eval").mkdir(exist_ok=True)
        ckpt = self.output / "checkpoint.pt"
        if resume:
            if not ckpt.exists():
                raise FileNotFoundError(f"nothing to resume: {ckpt} does not exist")
            self._load_checkpoint(ckpt)
        elif ckpt.exists():
            raise FileExistsError(f"{self.output} already holds a run; pass --resume to continue it")
        (self.output / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        # Target trajectories for the EUBO: prior trajectories, resampled ∝ r^β at evaluation.
        self.target_pool = self.sampler.rollout(
            Source.PRIOR, min(cfg.eval.num_samples, 20_000), generator=torch.Generator().manual_seed(7)
        )

    # -- one training step ---------------------------------------------------------------------
    def make_batch(self) -> TrajectoryBatch:
        progress = self.learner.step_count / self.cfg.train.steps
        explore = self.cfg.train.explore.at(progress)
        parts = []
        for source, n in source_counts(self.cfg.train.sources, self.cfg.train.batch_size).items():
            terminal = None
            if source == Source.BACKWARD:
                terminal = self.pool.sample(n, self.gen)
                if terminal is None:  # nothing seen yet: sample on-policy instead
                    source = Source.POSTERIOR
            batch = self.sampler.rollout(source, n, explore=explore, terminal=terminal,
                                         policy_version=self.learner.version, generator=self.gen)
            if source != Source.BACKWARD:
                self.pool.add(batch)
            parts.append(batch)
        return TrajectoryBatch.cat(parts)

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, n: int, name: str) -> dict[str, float]:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(10_000 + self.learner.step_count)
        samples = self.sampler.rollout(Source.POSTERIOR, n, generator=gen)
        beta = self.cfg.train.objective.beta
        ref = self.task.reference_log_z()
        metrics = posterior_metrics(self.task.family, self.learner.posterior, self.learner.prior,
                                    samples, self.target_pool, beta, ref, generator=gen)
        metrics.update(self.task.evaluate(samples.terminal.cpu()))
        metrics["log_z"] = self.learner.log_z.item()
        if ref is not None:
            metrics["log_z_error"] = metrics["log_z"] - ref
        self.task.plot(samples.terminal.cpu(), self.output / "eval" / f"{name}.png",
                       title=f"step {self.learner.step_count}")
        self.clock.eval_s += time.perf_counter() - t0
        metrics.update(step=self.learner.step_count, wall_s=self.clock.wall_s,
                       train_s=self.clock.wall_s - self.clock.eval_s, num_samples=n)
        write_json(self.output / "eval" / f"{name}.json", metrics)
        self._log({"kind": "eval", **metrics})
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "task": self.task.name,
                "config_digest": self.cfg.digest(),
                "learner": self.learner.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "rollout": self.gen.get_state()},
                "pool": {"x": self.pool.x, "log_reward": self.pool.log_reward},
                "clock": {"wall_s": self.clock.wall_s, "eval_s": self.clock.eval_s},
            },
            self.output / "checkpoint.pt",
        )

    def _load_checkpoint(self, path: Path) -> None:
        ckpt = load_run_checkpoint(path, self.task.name)
        self.learner.load_state_dict(ckpt["learner"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.gen.set_state(ckpt["rng"]["rollout"])
        self.pool.x, self.pool.log_reward = ckpt["pool"]["x"], ckpt["pool"]["log_reward"]
        self.clock = Clock(offset=ckpt["clock"]["wall_s"], eval_s=ckpt["clock"]["eval_s"])

    def _log(self, row: dict) -> None:
        with open(self.output / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        cfg = self.cfg
        if self.learner.step_count == 0:
            self.evaluate(cfg.eval.num_samples, "step_0")
        window: dict[str, list[float]] = defaultdict(list)
        bar = tqdm(total=cfg.train.steps, initial=self.learner.step_count, desc="train",
                   disable=not self.progress, mininterval=1.0)
        try:
            while self.learner.step_count < cfg.train.steps:
                batch = self.make_batch()
                stats = self.learner.step(batch)
                for k, v in stats.items():
                    window[k].append(v)
                step = self.learner.step_count
                bar.update(1)
                if step % LOG_EVERY == 0:
                    row = {k: sum(v) / len(v) for k, v in window.items()}
                    window.clear()
                    self._log({"kind": "train", "step": step, "wall_s": self.clock.wall_s, **row})
                    bar.set_postfix(loss=f"{row['loss']:.3g}", log_z=f"{row['log_z']:.3f}")
                if step % cfg.eval.every_steps == 0 and step < cfg.train.steps:
                    m = self.evaluate(cfg.eval.num_samples, f"step_{step}")
                    bar.write(format_eval(m))
                if step % cfg.checkpoint_every_steps == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            self.save_checkpoint()
            print(f"interrupted at step {self.learner.step_count}: checkpoint saved; "
                  f"continue with --resume --output {self.output}")
            raise
        bar.close()
        self.save_checkpoint()
        final = self.evaluate(cfg.eval.final_num_samples, f"step_{self.learner.step_count}")
        write_json(self.output / "final_eval.json", final)
        return final


def format_eval(m: dict[str, float]) -> str:
    keys = ["step", "tv_target", "tv_analytic", "modes_hit", "forbidden_mass", "elbo_gap",
            "eubo_gap", "log_z_error", "mean_log_reward", "train_s"]
    return "eval " + " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


def load_run_checkpoint(path: Path, task: str) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an rtb-ray run checkpoint")
    if ckpt["task"] != task:
        raise ValueError(f"{path} is a checkpoint of task {ckpt['task']!r}, not {task!r}")
    return ckpt
