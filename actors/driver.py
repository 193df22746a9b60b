"""The driver of ``rtb-ray train`` on Ray: starts (or joins) Ray and the run's actors (the
diagram is in docs/ARCHITECTURE.md), shows progress, and shuts everything down in order. The
store, weight store and coordinator (and the learner, unless it asks for a GPU) are pinned to the
driver's node, so losing another node loses only rollout workers, which the coordinator
replaces. ``<run>/runtime.json`` names the address and actors for ``rtb-ray status/scale``."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm.auto import tqdm

from actors.coordinator import Coordinator
from actors.learner import LearnerActor
from actors.replay import start_store
from actors.session import NAMESPACE, RUNTIME_FILE, init_ray, read_runtime
from actors.weights import WeightStore
from rtb_ray.config import RunConfig
from rtb_ray.evaluation import format_eval
from rtb_ray.learner import make_posterior
from rtb_ray.loop import check_config_for_task
from rtb_ray.roles import ROLE_NAMES
from rtb_ray.run_dir import check_run_dir, load_run_checkpoint, write_json
from rtb_ray.tasks import Task, make_task, task_runtime_env


def run_id(output: Path) -> str:
    """Names the run's actors: readable, and unique per run directory on a shared cluster."""
    digest = hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:8]
    return f"{output.name}-{digest}"


def _check_and_prior_file(cfg: RunConfig, resume_from: Path | None) -> tuple[Task, bytes | None]:
    """The task, and its prior checkpoint (pretrained here if missing) to ship to nodes that
    lack it; a run checkpoint to resume, and the config, are checked against the task and
    network first (a clear error here, before any actor starts)."""
    task = make_task(cfg.task)
    check_config_for_task(cfg, task)
    prior = task.prior()
    if resume_from is not None:
        load_run_checkpoint(resume_from, task.name, make_posterior(prior, cfg.train.adapter))
    path = task.prior_path()
    return task, path.read_bytes() if path is not None and path.exists() else None


def _progress_postfix(status: dict[str, Any], metrics: dict[str, float]) -> dict[str, str]:
    train, ev = status["train"], status["eval"]
    out = {}
    if "loss" in train:
        out.update(loss=f"{train['loss']:.3g}", log_z=f"{train['log_z']:.3f}")
    if "elbo" in ev:
        out["elbo"] = f"{ev['elbo']:.3f}"
    out["traj/s"] = f"{metrics.get('trajectories_per_s', 0):.0f}"
    out["workers"] = "/".join(str(int(metrics.get(f"workers_{r}", 0))) for r in ROLE_NAMES)
    if "staleness_p50" in train:
        out["stale p50/p90"] = f"{train['staleness_p50']:.0f}/{train['staleness_p90']:.0f}"
    return out


def train_on_ray(cfg: RunConfig, output: Path, *, address: str | None = None,
                 resume: bool = False, tracking_uri: str | None = None,
                 progress: bool = True) -> int:
    """Run training on Ray; returns the exit status (0 done, 130 interrupted, 1 failed)."""
    output = Path(output)
    checkpoint = check_run_dir(output, resume)
    task, prior_file = _check_and_prior_file(cfg, checkpoint if resume else None)
    output.mkdir(parents=True, exist_ok=True)

    init_ray(address, runtime_env=task_runtime_env(cfg.task.name))  # ships a user task
    # SIGTERM (e.g. `ray job stop`, a batch system) stops the run like Ctrl-C does; after
    # ray.init, whose failure-signal handler would otherwise kill the driver without a checkpoint
    signal.signal(signal.SIGTERM, _interrupt)
    run = run_id(output)
    names = {role: f"{run}/{role}" for role in ("store", "weights", "coordinator", "learner")}
    write_json(output / RUNTIME_FILE, {
        "run": run, "address": ray.get_runtime_context().gcs_address, "namespace": NAMESPACE,
        **names, "driver_pid": os.getpid(), "started": time.time()})
    try:
        try:
            learner, coordinator, store = _start_actors(cfg, output, run, names, resume,
                                                        tracking_uri, prior_file)
            tracking = ray.get(learner.tracking.remote())
        except ray.exceptions.RayActorError as err:
            print(f"rtb-ray: error: the learner failed to start: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # before training started: nothing to checkpoint
            print("interrupted while starting: no checkpoint written by this session")
            return 130
        print(f"run directory: {output}  (Ray: {ray.get_runtime_context().gcs_address}, "
              f"run {run})")
        print(f"  watch and scale it: rtb-ray status {output}; rtb-ray scale {output} --workers N")
        if tracking is not None:
            print(tracking)
        code = _watch(learner, coordinator, cfg, output, progress, task.progress_metrics)
        final_status = ray.get(coordinator.stop.remote())
        ray.get(store.close.remote())  # seals the rows not yet on disk
        final_status["replay"] = ray.get(store.stats.remote())
        write_json(output / "runtime_status.json", final_status)
        return code
    finally:
        ray.shutdown()
        info = read_runtime(output)
        write_json(output / RUNTIME_FILE, {**info, "ended": time.strftime("%Y-%m-%d %H:%M:%S")})


def _start_actors(cfg: RunConfig, output: Path, run: str, names: dict[str, str], resume: bool,
                  tracking_uri: str | None, prior_file: bytes | None) -> tuple[Any, Any, Any]:
    """The store, weight store and coordinator on this (the driver's) node; the learner too
    unless it wants a GPU. Returns (learner, coordinator, store)."""
    rt = cfg.runtime
    head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    store = start_store(cfg, str(output / "replay") if cfg.replay.persist else None, run,
                        name=names["store"], scheduling_strategy=head)
    weights = WeightStore.options(name=names["weights"], scheduling_strategy=head).remote()
    coordinator = Coordinator.options(name=names["coordinator"], scheduling_strategy=head).remote(
        cfg, run, NAMESPACE, store, weights, [ray.put(prior_file)])
    learner = LearnerActor.options(
        name=names["learner"], num_cpus=rt.learner_num_cpus, num_gpus=rt.learner_num_gpus,
        scheduling_strategy=head if rt.learner_num_gpus == 0 else "DEFAULT",
    ).remote(cfg, str(output.resolve()), store, weights, coordinator, resume, tracking_uri)
    return learner, coordinator, store


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _watch(learner: Any, coordinator: Any, cfg: RunConfig, output: Path, progress: bool,
           eval_keys: tuple[str, ...]) -> int:
    """Wait for the learner, showing progress; Ctrl-C (or SIGTERM, e.g. from a job manager)
    asks it to checkpoint and stop."""
    done = learner.train.remote()
    bar = tqdm(total=cfg.train.steps, desc="train", disable=not progress, mininterval=1.0)
    last_eval_step = -1
    try:
        while True:
            ready, _ = ray.wait([done], timeout=1.0)
            status, metrics = ray.get([learner.status.remote(), coordinator.metrics.remote()])
            bar.n = status["step"]
            bar.set_postfix(_progress_postfix(status, metrics), refresh=True)
            ev = status["eval"]
            if ev and ev.get("step") != last_eval_step:
                last_eval_step = ev.get("step")
                bar.write(format_eval(ev, eval_keys))
            if ready:
                break
    except KeyboardInterrupt:
        bar.close()
        print("stopping: the learner checkpoints ...")
        learner.stop.remote()
        result = ray.get(done)
        print(f"interrupted at step {result.get('step')}: checkpoint saved; continue with "
              f"rtb-ray train CONFIG --resume {output}")
        return 130
    bar.close()
    try:
        result = ray.get(done)
    except ray.exceptions.RayError as err:
        print(f"rtb-ray: error: the learner failed: {err}", file=sys.stderr)
        return 1
    print(format_eval(result, eval_keys))
    print(f"final metrics: {output / 'final_eval.json'}")
    return 0
