"""The driver of ``rtb-ray train`` on Ray: starts (or joins) Ray and the run's actors (the
diagram is in docs/ARCHITECTURE.md), shows progress, and shuts everything down in order. The
store, weight store and coordinator (and the learner, unless it asks for a GPU) are pinned to the
driver's node, so losing another node loses only rollout workers, which the coordinator
replaces. ``<run>/runtime.json`` names the address and actors for ``rtb-ray status/scale``."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm.auto import tqdm

from actors.coordinator import Coordinator
from actors.learner import LearnerActor
from actors.replay import start_store
from actors.session import NAMESPACE, RUNTIME_FILE, init_ray, read_runtime
from actors.weights import WeightStore
from rtb_ray.config import ConfigError, RunConfig, first_line
from rtb_ray.evaluation import format_eval
from rtb_ray.learner import make_posterior
from rtb_ray.loop import check_config_for_task, stop_on_signals
from rtb_ray.roles import ROLE_NAMES
from rtb_ray.run_dir import check_run_dir, load_run_checkpoint, write_json
from rtb_ray.tasks import Task, make_task, task_runtime_env
from rtb_ray.tracking import TrackingRequest, end_recorded_run, tracking_request


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
        posterior = make_posterior(prior, cfg.train.adapter, task)
        load_run_checkpoint(resume_from, task.name, (posterior, prior), cfg.train.log_z.kind)
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
                 resume: bool = False, tracking: TrackingRequest | None = None,
                 progress: bool = True) -> int:
    """Run training on Ray; returns the exit status (0 done, 130 interrupted, 1 failed).
    ``tracking`` (default: this process's command line environment) travels to the learner,
    which has neither the driver's environment nor its working directory."""
    output = Path(output)
    if tracking is None and cfg.tracking.enabled:
        tracking = tracking_request()
    if cfg.device == "cuda" and cfg.runtime.learner_num_gpus == 0:
        # the learner uses the GPU Ray gives it: without one it would train on the CPU silently
        raise ConfigError("device: cuda on Ray needs runtime.learner_num_gpus >= 1 (or use "
                          "--in-process)")
    checkpoint = check_run_dir(output, resume)
    task, prior_file = _check_and_prior_file(cfg, checkpoint if resume else None)
    output.mkdir(parents=True, exist_ok=True)

    init_ray(address, runtime_env=task_runtime_env(cfg.task.name))  # ships a user task
    run = run_id(output)
    names = {role: f"{run}/{role}" for role in ("store", "weights", "coordinator", "learner")}
    stop = threading.Event()
    try:
        # Ctrl-C and SIGTERM (`ray job stop`, a batch system) ask the learner to checkpoint and
        # stop; set after ray.init, whose failure-signal handler would end the driver without one
        with stop_on_signals(stop):
            return _train(cfg, output, run, names, resume, tracking, prior_file, progress,
                          task.progress_metrics, stop)
    finally:
        ray.shutdown()
        if (output / RUNTIME_FILE).exists():  # written once its actors were up
            info = read_runtime(output)
            write_json(output / RUNTIME_FILE,
                       {**info, "ended": time.strftime("%Y-%m-%d %H:%M:%S")})


def _train(cfg: RunConfig, output: Path, run: str, names: dict[str, str], resume: bool,
           tracking: TrackingRequest | None, prior_file: bytes | None, progress: bool,
           eval_keys: tuple[str, ...], stop: threading.Event) -> int:
    """Start the run's actors, watch the learner to the end, then stop the workers and seal
    the store."""
    _wait_until_gone(names.values())
    start_learner, weights, coordinator, store = _start_actors(
        cfg, output, run, names, tracking, prior_file)
    # only now: `rtb-ray status/scale` read it to find the coordinator, which exists from here
    write_json(output / RUNTIME_FILE, {
        "run": run, "address": ray.get_runtime_context().gcs_address, "namespace": NAMESPACE,
        **names, "driver_pid": os.getpid(), "started": time.time()})
    try:
        learner = start_learner(resume)
        described = ray.get(learner.tracking.remote())
    except ray.exceptions.RayActorError as err:
        print(f"rtb-ray: error: the learner failed to start: {first_line(err)}", file=sys.stderr)
        return 1
    print(f"run directory: {output}  (Ray: {ray.get_runtime_context().gcs_address}, run {run})")
    print(f"  watch and scale it: rtb-ray status {output}; rtb-ray scale {output} --workers N")
    if described is not None:
        print(described)
    code = _watch(learner, start_learner, weights, coordinator, cfg, output, progress,
                  eval_keys, stop)
    final_status = ray.get(coordinator.stop.remote())
    try:
        ray.get(store.close.remote())  # seals the rows not yet on disk
    except ray.exceptions.RayTaskError as err:  # e.g. a full disk: say what was not sealed
        print(f"rtb-ray: error: replay store: {err.cause}", file=sys.stderr)
        code = 1
    final_status["replay"] = ray.get(store.stats.remote())
    write_json(output / "runtime_status.json", final_status)
    return code


def _wait_until_gone(names: Any, timeout_s: float = 60.0) -> None:
    """A dead actor's name is freed a moment after its death: a killed driver's actors (on a
    cluster that outlives the driver, a --resume may come first; the run's lock already says no
    live driver holds it), a dead learner about to be restarted. Past the timeout, starting
    the actor names the one in the way."""
    deadline = time.monotonic() + timeout_s
    for name in names:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.5)


def _start_actors(cfg: RunConfig, output: Path, run: str, names: dict[str, str],
                  tracking: TrackingRequest | None, prior_file: bytes | None
                  ) -> tuple[Callable[[bool], Any], Any, Any, Any]:
    """The store, weight store and coordinator on this (the driver's) node, and how to start a
    learner (``start_learner(resume)``; on this node too unless it wants a GPU)."""
    rt = cfg.runtime
    head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # a store that dies is restarted (its constructor reopens the sealed segments) and calls
    # in flight are retried on it: workers and learner go on
    store = start_store(cfg, str(output / "replay") if cfg.replay.persist else None, run,
                        name=names["store"], scheduling_strategy=head,
                        max_restarts=rt.store_max_restarts, max_task_retries=-1)
    weights = WeightStore.options(name=names["weights"], scheduling_strategy=head).remote()
    coordinator = Coordinator.options(name=names["coordinator"], scheduling_strategy=head).remote(
        cfg, run, NAMESPACE, store, weights, [ray.put(prior_file)])

    def start_learner(resume: bool) -> Any:
        _wait_until_gone([names["learner"]])  # a dead learner's name is freed after its death
        return LearnerActor.options(
            name=names["learner"], num_cpus=rt.learner_num_cpus, num_gpus=rt.learner_num_gpus,
            scheduling_strategy=head if rt.learner_num_gpus == 0 else "DEFAULT",
        ).remote(cfg, str(output.resolve()), store, weights, coordinator, resume, tracking)

    return start_learner, weights, coordinator, store


def _follow(learner: Any, done: ray.ObjectRef, coordinator: Any, bar: tqdm,
            eval_keys: tuple[str, ...], stop: threading.Event) -> None:
    """Show the learner's progress until ``done`` is ready (RayActorError if the learner dies,
    KeyboardInterrupt once ``stop`` is set)."""
    last_eval_step = -1
    while not ray.wait([done], timeout=1.0)[0]:
        if stop.is_set():
            raise KeyboardInterrupt
        metrics_ref = coordinator.metrics.remote()
        status = ray.get(learner.status.remote())
        try:
            metrics = ray.get(metrics_ref)
        except ray.exceptions.RayActorError:  # not the learner's death: keep showing progress
            metrics = {}
        bar.n = status["step"]
        bar.set_postfix(_progress_postfix(status, metrics), refresh=True)
        ev = status["eval"]
        if ev and ev.get("step") != last_eval_step:
            last_eval_step = ev.get("step")
            bar.write(format_eval(ev, eval_keys))


def _watch(learner: Any, start_learner: Callable[[bool], Any], weights: Any, coordinator: Any,
           cfg: RunConfig, output: Path, progress: bool, eval_keys: tuple[str, ...],
           stop: threading.Event) -> int:
    """Wait for the learner, showing progress. A learner that dies (killed, node lost, OOM) is
    restarted from the last checkpoint, ``runtime.learner_max_restarts`` times; the workers and
    the store go on meanwhile. Ctrl-C (or SIGTERM) asks the learner to checkpoint and stop."""
    bar = tqdm(total=cfg.train.steps, desc="train", disable=not progress, mininterval=1.0)
    restarts, done = 0, learner.train.remote()
    try:
        while True:
            try:
                _follow(learner, done, coordinator, bar, eval_keys, stop)
                result = ray.get(done)
                break
            except ray.exceptions.RayActorError as err:  # the learner's process is gone
                if restarts >= cfg.runtime.learner_max_restarts or not (
                        output / "checkpoint.pt").exists():
                    bar.close()
                    end_recorded_run(output, "FAILED")  # it could not end its MLflow run
                    return _failed(f"the learner failed: {first_line(err)}", output)
                restarts += 1
                bar.write(f"the learner died ({first_line(err)}); restarting it from the last "
                          f"checkpoint ({restarts}/{cfg.runtime.learner_max_restarts})")
                ray.get(weights.reset.remote())  # the checkpoint may be behind its last version
                learner = start_learner(True)
                done = learner.train.remote()
    except KeyboardInterrupt:
        bar.close()
        learner.stop.remote()
        result = ray.get(done)
        print(f"interrupted at step {result.get('step')}: checkpoint saved; continue with "
              f"rtb-ray train CONFIG --resume {output}")
        return 130
    except ray.exceptions.RayTaskError as err:  # the learner raised: it ended its own MLflow run
        bar.close()
        return _failed(f"the learner failed: {first_line(err.cause or err)}", output)
    bar.close()
    print(format_eval(result, eval_keys))
    print(f"final metrics: {output / 'final_eval.json'}")
    return 0


def _failed(message: str, output: Path) -> int:
    print(f"rtb-ray: error: {message}", file=sys.stderr)
    print(f"the last checkpoint is kept; continue with rtb-ray train CONFIG --resume {output}",
          file=sys.stderr)
    return 1
