"""The training loop for both runtimes, read top to bottom:

    batch → learner step → publish → log → evaluate → checkpoint

``prepare`` builds its parts (learner, evaluator, run directory; the batch source comes from the
runtime); building never trains."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from rtb_ray.batches import BatchSource
from rtb_ray.config import ConfigError, ObjectiveConfig, RunConfig
from rtb_ray.evaluation import Evaluator, format_eval
from rtb_ray.learner import Learner
from rtb_ray.log_z import make_log_z
from rtb_ray.metrics import importance_metrics, sir_indices
from rtb_ray.networks import LoRALinear, own_state
from rtb_ray.objectives import scaled_log_reward
from rtb_ray.replay import ReplayDiskError
from rtb_ray.run_dir import RunDir, write_json
from rtb_ray.tasks import Task, conditional, make_task


@dataclass
class Run:
    """A run's parts, built by ``prepare``; ``train`` drives them."""

    cfg: RunConfig
    task: Task
    learner: Learner
    evaluator: Evaluator
    run_dir: RunDir
    resumed_from: dict | None  # the checkpoint, on --resume


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no GPU")
    return torch.device(name)


def check_config_for_task(cfg: RunConfig, task: Task) -> None:
    """What the config's own validation cannot see: settings that depend on the task. Called
    before anything is written or started (ConfigError naming the key)."""
    check_conditions(cfg, task)
    if cfg.train.sources.get("dataset", 0) > 0 and not callable(
            getattr(task, "known_terminals", None)):
        raise ConfigError(f"train.sources.dataset: task {task.name!r} has no known_terminals(n, "
                          f"generator), the data that source noises back")
    mc = cfg.train.mass_covering
    if mc.enabled:
        if conditional(task):
            raise ConfigError("train.mass_covering: needs an unconditional task (its target "
                              "samples are drawn once, not per condition)")
        if mc.first_steps is not None and mc.first_steps > task.family.num_steps:
            raise ConfigError(f"train.mass_covering.first_steps: {mc.first_steps} is more than "
                              f"the task's {task.family.num_steps} steps")


def check_conditions(cfg: RunConfig, task: Task) -> None:
    """A conditional task's conditions fit its evaluation set and ``train.log_z``; its VarGrad
    and KL-RL batches have groups to centre within."""
    train = cfg.train
    if not conditional(task):
        make_log_z(train.log_z, None)  # ConfigError unless scalar
        return
    drawn, fixed = task.conditions(2, torch.Generator().manual_seed(0)), task.eval_conditions()
    if drawn.dtype != fixed.dtype or drawn.shape[1:] != fixed.shape[1:]:
        raise ConfigError(f"task {task.name!r}: conditions() gives {drawn.dtype} rows of shape "
                          f"{tuple(drawn.shape[1:])}, eval_conditions() {fixed.dtype} rows of "
                          f"shape {tuple(fixed.shape[1:])}")
    make_log_z(train.log_z, fixed)  # a table: every evaluation id within num_conditions
    if train.objective.kind != "rtb" and train.group_size == 1:
        raise ConfigError(f"train.group_size: {train.objective.kind} on a conditional task "
                          f"centres within groups of one condition; 1 leaves nothing to centre "
                          f"(e.g. 16)")


def set_torch_threads(cfg: RunConfig, threads: int | None = None) -> None:
    """torch's threads in this process: ``threads`` (a Ray actor's CPUs), else ``torch_threads``,
    else the CPUs it may run on. Every command sets them before it builds a prior, which may
    pretrain it."""
    torch.set_num_threads(threads or cfg.torch_threads or len(os.sched_getaffinity(0)))


def prepare(cfg: RunConfig, output: Path, *, resume: bool, device: str | None = None,
            torch_threads: int | None = None) -> Run:
    """Check the config against the task, build the learner (from the checkpoint on resume)
    and the evaluator. Writes nothing: ``RunDir.start`` does, once all of this has worked."""
    set_torch_threads(cfg, torch_threads)
    torch.manual_seed(cfg.seeds.learner)
    task = make_task(cfg.task)
    check_config_for_task(cfg, task)
    run_dir = RunDir(output, cfg, task.name, resume,
                     headline=next(iter(task.progress_metrics), None))
    learner = Learner(task.family, task.prior(), cfg.train, resolve_device(device or cfg.device),
                      cfg.seeds.learner, task.eval_conditions() if conditional(task) else None,
                      task)
    ckpt = run_dir.load_checkpoint((learner.posterior, learner.prior))
    if ckpt is not None:
        learner.load_state_dict(ckpt["learner"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    evaluator = Evaluator(cfg, task, learner, run_dir.output / "eval")
    return Run(cfg, task, learner, evaluator, run_dir, ckpt)


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


def mass_covering_phase(run: Run, progress: bool) -> None:
    """``train.mass_covering``: its target samples (drawn again, identically, on resume) and, on
    a fresh run, the warm start; both on the run's clock. A summary: ``mass_covering.json``."""
    cfg, learner, mc = run.cfg, run.learner, run.cfg.train.mass_covering
    t0 = time.perf_counter()
    learner.target_terminals, info = resampled_prior_terminals(
        run.task, learner.prior, mc.num_samples, cfg.train.objective,
        torch.Generator().manual_seed(cfg.seeds.mass_covering))
    info["sample_s"] = time.perf_counter() - t0
    if run.resumed_from is None and mc.warm_start_steps > 0:
        losses = learner.warm_start(mc.warm_start_steps, mc.warm_start_lr, progress)
        info.update(warm_start_steps=mc.warm_start_steps, warm_start_losses=losses)
    info["total_s"] = time.perf_counter() - t0
    write_json(run.run_dir.output / "mass_covering.json", info)
    run.run_dir.artifact(run.run_dir.output / "mass_covering.json")


def evaluate(run: Run, n: int, name: str) -> dict[str, float]:
    t0 = time.perf_counter()
    metrics = run.evaluator(n, name)
    run.run_dir.clock.eval_s += time.perf_counter() - t0
    return run.run_dir.log_eval(metrics, name)


def checkpoint(run: Run, batches: BatchSource) -> None:
    run.run_dir.save_checkpoint({"learner": run.learner.state_dict(),
                                 "batches": batches.state_dict()})


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM set ``stop``: the loop checkpoints and ends at its next step.
    Raising KeyboardInterrupt wherever the main thread happens to be loses the signal when that
    is a finaliser (a ``__del__`` or weakref callback, e.g. a closed SQLite connection's):
    CPython prints "Exception ignored" and carries on. A second signal raises at once, for a
    user who will not wait. Main thread only (as ``signal.signal`` is)."""
    def request_stop(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"{signal.Signals(signum).name}: stopping at the next step, with a checkpoint "
              f"(again to stop at once)", flush=True)

    before = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def train(run: Run, batches: BatchSource, *, progress: bool = True,
          stop: threading.Event | None = None) -> dict[str, float]:
    """Run to ``train.steps`` (``stop`` set, or Ctrl-C: checkpoint, then KeyboardInterrupt).
    The MLflow run ends FINISHED, KILLED or FAILED."""
    status = "FAILED"
    if run.run_dir.tracker is not None:  # what is trained, for the MLflow run's tags
        posterior = run.learner.posterior
        run.run_dir.tracker.set_tags({
            "trainable_parameters": sum(p.numel() for p in run.learner.trainable),
            "adapted_layers": sum(isinstance(m, LoRALinear) for m in posterior.modules())})
    try:
        final = _loop(run, batches, progress, stop or threading.Event())
        run.run_dir.finish(final, run.learner.posterior, run.evaluator.input_example(),
                           own_state(run.learner.posterior, run.learner.prior))
        status = "FINISHED"
        return final
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        run.run_dir.close(status)


def _loop(run: Run, batches: BatchSource, progress: bool, stop: threading.Event) -> dict:
    cfg, learner = run.cfg, run.learner
    if run.resumed_from is not None:
        batches.load_state_dict(run.resumed_from.get("batches", run.resumed_from))
    if cfg.train.mass_covering.enabled:
        mass_covering_phase(run, progress)
    if learner.step_count == 0:
        evaluate(run, cfg.eval.num_samples, "step_0")
    if not run.run_dir.checkpoint_path.exists():
        # from the start, a dead learner can be restarted and a killed run resumed
        checkpoint(run, batches)
    keys = run.task.progress_metrics
    window: dict[str, list[float]] = defaultdict(list)
    bar = tqdm(total=cfg.train.steps, initial=learner.step_count, desc="train",
               disable=not progress, mininterval=1.0)
    try:
        while learner.step_count < cfg.train.steps:
            if stop.is_set():
                raise KeyboardInterrupt
            stats = learner.step(batches.next_batch(learner))
            batches.after_step(learner)  # on Ray: publish the weights
            for k, v in stats.items():
                window[k].append(v)
            step = learner.step_count
            bar.update(1)
            if step % cfg.train.log_every_steps == 0:
                row = {k: sum(v) / len(v) for k, v in window.items()}
                window.clear()
                run.run_dir.log({"kind": "train", "step": step,
                                 "wall_s": run.run_dir.clock.wall_s, **row,
                                 **batches.row_extras()})
                bar.set_postfix(loss=f"{row['loss']:.3g}", log_z=f"{row['log_z']:.3f}")
            if step % cfg.eval.every_steps == 0 and step < cfg.train.steps:
                line = format_eval(evaluate(run, cfg.eval.num_samples, f"step_{step}"), keys)
                if progress:
                    bar.write(line)
            if step % cfg.checkpoint_every_steps == 0:
                checkpoint(run, batches)
    except KeyboardInterrupt:
        bar.close()
        checkpoint(run, batches)
        print(f"interrupted at step {learner.step_count}: checkpoint saved; continue with "
              f"--resume {run.run_dir.output}")
        raise
    except ReplayDiskError as err:  # the store refuses inserts: keep the learner's progress
        bar.close()
        try:  # no flush (it would fail again); --resume reloads the segments that are sealed
            run.run_dir.save_checkpoint({"learner": learner.state_dict()})
            saved = f"checkpoint saved at step {learner.step_count}"
        except OSError as e:
            saved = f"no checkpoint could be saved either ({e})"
        raise ReplayDiskError(f"{err}; {saved}") from None
    bar.close()
    checkpoint(run, batches)
    return evaluate(run, cfg.eval.final_num_samples, f"step_{learner.step_count}")
