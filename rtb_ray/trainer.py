"""The in-process trainer: the loop the distributed runtime runs, in one process.

    sample (posterior with exploration / prior / backward) → RTB step → evaluate → checkpoint

Run directory layout (also read by ``rtb-ray sample``):
    config.yaml        the resolved config
    metrics.jsonl      one JSON row per log interval ("train") and per evaluation ("eval")
    eval/step_N.json   evaluation metrics;  eval/step_N.png  a picture of posterior samples
    final_eval.json    the last evaluation, on eval.final_num_samples samples
    checkpoint.pt      learner state, RNG, counters (atomic; loads with weights_only=True)
    mlflow_run.json    the MLflow run of this training run (unless tracking.enabled is false)
    mlflow.db, mlartifacts/   the default MLflow store (unless --tracking-uri names another)

MLflow (rtb_ray/tracking.py) receives the same rows: train rows as ``train/<key>`` and eval rows
as ``eval/<key>`` metrics at the learner step, the eval PNG/JSON files as artifacts under
``eval/``, the config as params and ``config.yaml``, and at the end ``final_eval.json``,
``metrics.jsonl`` and the posterior (PyTorch flavour). ``tracking_s`` is the time the loop spent
in tracker calls, which only enqueue.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch import Tensor
from tqdm.auto import tqdm

from rtb_ray.config import ConfigError, ObjectiveConfig, RunConfig, config_to_dict
from rtb_ray.learner import Learner
from rtb_ray.metrics import importance_metrics, posterior_metrics, sir_indices, target_log_weights
from rtb_ray.objectives import scaled_log_reward
from rtb_ray.pretrain import atomic_torch_save
from rtb_ray.rollout import Sampler
from rtb_ray.tasks import Task, make_task
from rtb_ray.tracking import MlflowTracker, open_run_tracker
from rtb_ray.trajectory import Source, TrajectoryBatch

CHECKPOINT_FORMAT = "rtb-ray-run/1"


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


def check_config_for_task(cfg: RunConfig, task: Task) -> None:
    """What the config's own validation cannot see: settings that depend on the task. Called
    before anything is written or started (ConfigError naming the key)."""
    mc = cfg.train.mass_covering
    if mc.enabled:
        if task.conditions(1) is not None:
            raise ConfigError("train.mass_covering: needs an unconditional task (its target "
                              "samples are drawn once, not per condition)")
        if mc.first_steps is not None and mc.first_steps > task.family.num_steps:
            raise ConfigError(f"train.mass_covering.first_steps: {mc.first_steps} is more than "
                              f"the task's {task.family.num_steps} steps")


@torch.no_grad()
def resampled_prior_terminals(task: Task, prior: torch.nn.Module, n: int,
                              objective: ObjectiveConfig, generator: torch.Generator,
                              chunk: int = 4096) -> tuple[Tensor, dict]:
    """n samples of the target p_prior·r^β, up to resampling error: n prior samples resampled
    (with replacement) ∝ r^β, with the objective's floor on log r. Also returns how many distinct
    prior samples survived and the importance weights' ESS fraction."""
    xs, log_weights = [], []
    for start in range(0, n, chunk):
        states, _ = task.family.sample(prior, min(chunk, n - start), generator=generator)
        x = states[:, -1].cpu()
        lw = scaled_log_reward(task.log_reward(x, None), objective)
        keep = torch.isfinite(lw)  # a sample the reward cannot score is not a target sample
        xs.append(x[keep])
        log_weights.append(lw[keep])
    x, lw = torch.cat(xs), torch.cat(log_weights)
    rows = sir_indices(lw, n, generator)
    info = {"num_samples": n, "distinct": rows.unique().numel(),
            "ess_fraction": importance_metrics(lw)["ess_fraction"]}
    return x[rows], info


@dataclass
class TerminalPool:
    """Recent terminal states of forward rollouts (posterior and prior) with their importance
    weights toward the target (``target_log_weights``): what backward trajectories start from.
    Resampled by those weights, prior-sourced states reach every mode the prior covers, and
    posterior-sourced ones are corrected for the posterior's own biases rather than amplified."""

    capacity: int
    beta: float = 1.0
    x: torch.Tensor | None = None
    log_weight: torch.Tensor | None = None

    def add(self, batch: TrajectoryBatch) -> None:
        lw = target_log_weights(batch, self.beta)
        keep = torch.isfinite(lw)  # kept on the CPU: small, and checkpointed
        x, lw = batch.terminal[keep].cpu(), lw[keep].cpu()
        if self.x is None or self.log_weight is None:
            self.x, self.log_weight = x, lw
        else:
            self.x = torch.cat([self.x, x])[-self.capacity :]
            self.log_weight = torch.cat([self.log_weight, lw])[-self.capacity :]

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor | None:
        if self.x is None or self.log_weight is None or self.x.shape[0] == 0:
            return None
        return self.x[sir_indices(self.log_weight, n, gen)]


@dataclass
class Clock:
    """Wall time of the fine-tuning, and how much of it went to evaluation and to tracking."""

    start: float = field(default_factory=time.perf_counter)
    offset: float = 0.0  # time already spent before a resume
    eval_s: float = 0.0
    tracking_s: float = 0.0  # in tracker calls made by the loop (enqueueing metrics, artifacts)

    @property
    def wall_s(self) -> float:
        return self.offset + time.perf_counter() - self.start


class Trainer:
    """The training loop, read top to bottom in ``_train``: batch → learner step → log →
    evaluate → checkpoint. Where batches come from is the subclass's business
    (``InProcessTrainer``: sampled right here; ``ReplayTrainer``: drawn from the replay store)."""

    def __init__(self, cfg: RunConfig, output: Path, resume: bool = False, progress: bool = True,
                 tracking_uri: str | None = None, torch_threads: int | None = None,
                 ray_address: str | None = None):
        self.cfg = cfg
        self.output = Path(output)
        self.progress = progress
        torch.set_num_threads(torch_threads or cfg.torch_threads or len(os.sched_getaffinity(0)))
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.task: Task = make_task(cfg.task)
        check_config_for_task(cfg, self.task)
        prior = self.task.prior()
        self.learner = Learner(self.task.family, prior, cfg.train, self.device, cfg.seed)
        self.sampler = Sampler(self.task, self.learner.prior, self.learner.posterior)
        self.clock = Clock()
        self.stop_requested = threading.Event()  # set by another thread: checkpoint and return
        self.last_train: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "eval").mkdir(exist_ok=True)
        ckpt = self.output / "checkpoint.pt"
        if resume:
            if not ckpt.exists():
                raise FileNotFoundError(f"nothing to resume: {ckpt} does not exist")
            self.load_checkpoint(load_run_checkpoint(ckpt, self.task.name, self.learner.posterior))
        elif ckpt.exists():
            raise FileExistsError(f"{self.output} already holds a run; pass --resume to continue it")
        if cfg.train.mass_covering.enabled:
            self.prepare_mass_covering(warm_start=not resume)
        (self.output / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        # Target trajectories for the EUBO: prior trajectories, resampled ∝ r^β at evaluation.
        self.target_pool = self.sampler.rollout(
            Source.PRIOR, min(cfg.eval.num_samples, 20_000), generator=torch.Generator().manual_seed(7)
        )
        # Opened last, so that a run that fails to start leaves no MLflow run behind.
        self.tracker: MlflowTracker | None = None
        if cfg.tracking.enabled:
            self.tracker = open_run_tracker(self.output, cfg, resume=resume,
                                            tracking_uri=tracking_uri, ray_address=ray_address)
            if resume:
                self.tracker.set_tags({"resumed_at_step": self.learner.step_count})
            if self.learner.target_terminals is not None:
                self._track_artifact(self.output / "mass_covering.json")

    def prepare_mass_covering(self, warm_start: bool) -> None:
        """The target samples of ``train.mass_covering`` (drawn again, identically, on resume)
        and, on a fresh run, the warm start; both on the run's clock. A summary goes to
        ``mass_covering.json``."""
        mc, t0 = self.cfg.train.mass_covering, time.perf_counter()
        self.learner.target_terminals, info = resampled_prior_terminals(
            self.task, self.learner.prior, mc.num_samples, self.cfg.train.objective,
            torch.Generator().manual_seed(self.cfg.seed + 2))
        info["sample_s"] = time.perf_counter() - t0
        if warm_start and mc.warm_start_steps > 0:
            losses = self.learner.warm_start(mc.warm_start_steps, mc.warm_start_lr, self.progress)
            info.update(warm_start_steps=mc.warm_start_steps, warm_start_losses=losses)
        info["total_s"] = time.perf_counter() - t0
        write_json(self.output / "mass_covering.json", info)

    # -- what subclasses provide ---------------------------------------------------------------
    def make_batch(self) -> TrajectoryBatch:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every learner step (the runtime publishes weights here)."""

    def train_row_extras(self) -> dict[str, float]:
        """More columns of each train row (the runtime's staleness and throughput)."""
        return {}

    def checkpoint_extras(self) -> dict:
        return {}

    def load_checkpoint_extras(self, ckpt: dict) -> None:
        pass

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, n: int, name: str) -> dict[str, float]:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(10_000 + self.learner.step_count)
        samples = self.sampler.rollout(Source.POSTERIOR, n, generator=gen)
        beta = self.cfg.train.objective.beta
        ref = self.task.reference_log_z(beta)
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
                       train_s=self.clock.wall_s - self.clock.eval_s, num_samples=n,
                       tracking_s=self.clock.tracking_s)
        write_json(self.output / "eval" / f"{name}.json", metrics)
        self.last_eval = metrics
        self._log({"kind": "eval", **metrics})
        self._track_artifact(self.output / "eval" / f"{name}.png", "eval")
        self._track_artifact(self.output / "eval" / f"{name}.json", "eval")
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "task": self.task.name,
                "config_digest": self.cfg.digest(),
                "learner": self.learner.state_dict(),
                "rng": {"torch": torch.get_rng_state()},
                "clock": {"wall_s": self.clock.wall_s, "eval_s": self.clock.eval_s,
                          "tracking_s": self.clock.tracking_s},
                **self.checkpoint_extras(),
            },
            self.output / "checkpoint.pt",
        )
        if self.cfg.tracking.log_checkpoints:
            self._track_artifact(self.output / "checkpoint.pt", "checkpoint")

    def load_checkpoint(self, ckpt: dict) -> None:
        self.learner.load_state_dict(ckpt["learner"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.clock = Clock(offset=ckpt["clock"]["wall_s"], eval_s=ckpt["clock"]["eval_s"],
                           tracking_s=ckpt["clock"].get("tracking_s", 0.0))
        self.load_checkpoint_extras(ckpt)

    def _log(self, row: dict) -> None:
        """One row to metrics.jsonl and, as ``<kind>/<key>`` metrics at its step, to MLflow."""
        with open(self.output / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            t0 = time.perf_counter()
            self.tracker.log_metrics({f"{row['kind']}/{k}": v for k, v in row.items()
                                      if k not in ("kind", "step") and isinstance(v, (int, float))},
                                     step=row["step"])
            self.clock.tracking_s += time.perf_counter() - t0

    def _track_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.tracker is not None:
            t0 = time.perf_counter()
            self.tracker.log_artifact(path, artifact_path)
            self.clock.tracking_s += time.perf_counter() - t0

    def model_input_example(self, rows: int = 8) -> dict[str, torch.Tensor]:
        """Example forward arguments of the posterior network, ``net(x_t, t_index[, cond])``:
        states of a few target-pool trajectories at different steps."""
        states = self.target_pool.states
        n = min(rows, states.shape[0])
        t_index = torch.arange(n, device=states.device) % (states.shape[1] - 1)
        example = {"x": states[torch.arange(n, device=states.device), t_index],
                   "t_index": t_index}
        if self.target_pool.cond is not None:
            example["cond"] = self.target_pool.cond[:n]
        return example

    def _finish_tracking(self) -> None:
        """End-of-run artifacts and the final posterior: after the loop, never on its path."""
        if self.tracker is None:
            return
        self.tracker.log_artifact(self.output / "final_eval.json")
        self.tracker.log_artifact(self.output / "metrics.jsonl")
        if self.cfg.tracking.log_model:
            try:
                uri = self.tracker.log_pytorch_model(self.learner.posterior,
                                                     self.model_input_example(),
                                                     name="posterior", step=self.learner.step_count)
                print(f"MLflow: posterior logged as {uri}")
            except Exception as err:  # the run's results are already on disk: warn, do not fail
                print(f"rtb-ray: warning: could not log the posterior to MLflow: {err}")

    def close_tracker(self, status: str) -> None:
        if self.tracker is None:
            return
        counters = self.tracker.close(status)
        if counters.dropped or counters.failed or counters.artifacts_failed:
            print(f"rtb-ray: warning: MLflow dropped {counters.dropped} and failed to write "
                  f"{counters.failed} metric points, {counters.artifacts_failed} artifacts "
                  f"(last error: {self.tracker.last_error})")

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Run to ``train.steps``; the MLflow run ends FINISHED, KILLED (Ctrl-C) or FAILED."""
        status = "FAILED"
        try:
            final = self._train()
            self._finish_tracking()
            status = "FINISHED"
            return final
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.close_tracker(status)

    def _train(self) -> dict[str, float]:
        cfg = self.cfg
        if self.learner.step_count == 0:
            self.evaluate(cfg.eval.num_samples, "step_0")
        window: dict[str, list[float]] = defaultdict(list)
        bar = tqdm(total=cfg.train.steps, initial=self.learner.step_count, desc="train",
                   disable=not self.progress, mininterval=1.0)
        try:
            while self.learner.step_count < cfg.train.steps:
                if self.stop_requested.is_set():
                    raise KeyboardInterrupt
                batch = self.make_batch()
                stats = self.learner.step(batch)
                self.after_step()
                for k, v in stats.items():
                    window[k].append(v)
                step = self.learner.step_count
                bar.update(1)
                if step % cfg.train.log_every_steps == 0:
                    row = {k: sum(v) / len(v) for k, v in window.items()}
                    window.clear()
                    row = {"kind": "train", "step": step, "wall_s": self.clock.wall_s, **row,
                           **self.train_row_extras()}
                    self.last_train = row
                    self._log(row)
                    bar.set_postfix(loss=f"{row['loss']:.3g}", log_z=f"{row['log_z']:.3f}")
                if step % cfg.eval.every_steps == 0 and step < cfg.train.steps:
                    m = self.evaluate(cfg.eval.num_samples, f"step_{step}")
                    if self.progress:
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

class InProcessTrainer(Trainer):
    """Sampler and learner in one process: each batch is freshly sampled from the sources of
    ``train.sources`` (the reference the Ray runtime is measured against)."""

    def __init__(self, cfg: RunConfig, output: Path, resume: bool = False, progress: bool = True,
                 tracking_uri: str | None = None):
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.pool = TerminalPool(cfg.train.backward_pool, cfg.train.objective.beta)
        super().__init__(cfg, output, resume, progress, tracking_uri)

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

    def checkpoint_extras(self) -> dict:
        return {"rollout_rng": self.gen.get_state(),
                "pool": {"x": self.pool.x, "log_weight": self.pool.log_weight}}

    def load_checkpoint_extras(self, ckpt: dict) -> None:
        self.gen.set_state(ckpt["rollout_rng"])
        # (a checkpoint from before log weights were kept: the pool refills from the next batch)
        self.pool.x, self.pool.log_weight = ckpt["pool"]["x"], ckpt["pool"].get("log_weight")


class ReplayTrainer(Trainer):
    """The learner of the Ray runtime: batches are drawn from the replay store by
    ``sample_batch`` (the store's source mixture), weights go out through ``publish(version,
    state_dict)`` every ``runtime.publish_every_steps`` steps (``publish(step, None)`` at the
    other steps: the learner's progress, for max_staleness), and each train row records the
    staleness of the posterior rows trained on (learner version − policy_version) as quantiles.
    No Ray here: the learner actor passes the store and the weight store in as callables."""

    def __init__(self, cfg: RunConfig, output: Path, *,
                 sample_batch: Callable[[], TrajectoryBatch],
                 publish: Callable[[int, dict[str, torch.Tensor] | None], None],
                 runtime_stats: Callable[[], dict[str, float]] | None = None,
                 flush_store: Callable[[], None] | None = None,
                 resume: bool = False, tracking_uri: str | None = None,
                 torch_threads: int | None = None, ray_address: str | None = None):
        super().__init__(cfg, output, resume, progress=False, tracking_uri=tracking_uri,
                         torch_threads=torch_threads, ray_address=ray_address)
        self.sample_batch, self.publish, self.runtime_stats = sample_batch, publish, runtime_stats
        self.flush_store = flush_store
        self.staleness: list[Tensor] = []
        self.publish_weights()  # version 0, or the checkpoint's on resume

    def publish_weights(self) -> None:
        self.publish(self.learner.version, {k: v.detach().cpu() for k, v in
                                            self.learner.posterior.state_dict().items()})

    def save_checkpoint(self) -> None:
        """Seal the store's rows first: a checkpoint never refers to data that is not on disk."""
        if self.flush_store is not None:
            self.flush_store()
        super().save_checkpoint()

    def make_batch(self) -> TrajectoryBatch:
        batch = self.sample_batch()
        on_policy = (batch.source == Source.POSTERIOR) | (batch.source == Source.EXPLORE)
        self.staleness.append(self.learner.version - batch.policy_version[on_policy])
        return batch

    def after_step(self) -> None:
        if self.learner.version % self.cfg.runtime.publish_every_steps == 0:
            self.publish_weights()
        else:
            self.publish(self.learner.version, None)

    def train_row_extras(self) -> dict[str, float]:
        row = staleness_quantiles(torch.cat(self.staleness)) if self.staleness else {}
        self.staleness.clear()
        return {**row, **(self.runtime_stats() if self.runtime_stats else {})}


def staleness_quantiles(staleness: Tensor) -> dict[str, float]:
    """The distribution of staleness (in learner steps) of the rows trained on."""
    if staleness.numel() == 0:
        return {}
    s = staleness.double()
    q = torch.quantile(s, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {"staleness_mean": s.mean().item(), "staleness_p50": q[0].item(),
            "staleness_p90": q[1].item(), "staleness_p99": q[2].item(),
            "staleness_max": s.max().item()}


def format_eval(m: dict[str, float]) -> str:
    keys = ["step", "tv_target", "tv_analytic", "modes_hit", "forbidden_mass", "elbo_gap",
            "eubo_gap", "log_z_error", "mean_log_reward", "train_s"]
    return "eval " + " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


def load_run_checkpoint(path: Path, task: str, network: torch.nn.Module | None = None) -> dict:
    """A run checkpoint (``weights_only``), refused with a ValueError if it is not one, is of
    another task, or (given the task's ``network``) holds a posterior of another shape."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an rtb-ray run checkpoint")
    if ckpt["task"] != task:
        raise ValueError(f"{path} is a checkpoint of task {ckpt['task']!r}, not {task!r}")
    if network is not None:
        mine = {k: tuple(v.shape) for k, v in network.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in ckpt["learner"]["posterior"].items()}
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:2]
            raise ValueError(f"{path} holds a posterior of another shape than this config's "
                             f"network (e.g. {diff}); resume with the settings it was made with")
    return ckpt
