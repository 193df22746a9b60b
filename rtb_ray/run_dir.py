"""A run directory (its files: the README, "What a run writes"), its checkpoint and its
MLflow run, for both runtimes. MLflow gets the same rows as ``metrics.jsonl`` (``train/<key>``
and ``eval/<key>`` at the learner step), the eval pictures, JSON (and a task's samples as text,
``.txt``, where it writes them) under ``eval/``, the config,
and at the end ``final_eval.json``, ``metrics.jsonl`` and the posterior (PyTorch flavour,
carrying ``rtb_ray/config.yaml`` and ``rtb_ray/posterior.pt``: what ``rtb-ray sample models:/...``
rebuilds it from), registered in the model registry with ``tracking.register_as``."""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from rtb_ray.config import RunConfig, config_to_dict
from rtb_ray.log_z import check_log_z_kind
from rtb_ray.networks import own_state_to_load
from rtb_ray.pretrain import atomic_torch_save, read_checkpoint
from rtb_ray.summary import write_summary
from rtb_ray.tracking import MlflowTracker, TrackingRequest, open_run_tracker

CHECKPOINT_FORMAT = "rtb-ray-run/1"
# the posterior's own weights alone, in the logged model: a checkpoint without what resuming needs
POSTERIOR_FORMAT = "rtb-ray-posterior/1"
MODEL_FILES = "rtb_ray"  # the folder of the logged model that holds them, with config.yaml
MAX_VERSION_TAGS = 40  # final metrics on a registered version: the first ones, past the detail


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def load_run_checkpoint(path: Path, task: str,
                        networks: tuple[torch.nn.Module, torch.nn.Module] | None = None,
                        log_z_kind: str | None = None) -> dict:
    """A run checkpoint (``weights_only``), refused with a ValueError if it is not one, is of
    another task, or (given the config's ``networks``, posterior and prior) holds a posterior of
    another shape, or (given ``log_z_kind``) another kind of log Z."""
    ckpt = read_checkpoint(path, "an rtb-ray run checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an rtb-ray run checkpoint")
    if ckpt["task"] != task:
        raise ValueError(f"{path} is a checkpoint of task {ckpt['task']!r}, not {task!r}")
    if networks is not None:
        try:
            own_state_to_load(ckpt["learner"]["posterior"], *networks)
        except ValueError as err:
            raise ValueError(f"{path} holds a posterior of another shape than this config's "
                             f"network ({err}); resume with the settings it was made with"
                             ) from None
    if log_z_kind is not None:
        check_log_z_kind(ckpt["learner"], log_z_kind)
    return ckpt


def load_posterior_file(path: Path, task: str,
                        networks: tuple[torch.nn.Module, torch.nn.Module]) -> dict:
    """A posterior file (``POSTERIOR_FORMAT``: ``task``, ``step``, ``posterior``, its own
    weights) of a logged model, refused with a ValueError as ``load_run_checkpoint`` refuses."""
    ckpt = read_checkpoint(path, "an rtb-ray posterior")
    if not isinstance(ckpt, dict) or ckpt.get("format") != POSTERIOR_FORMAT:
        raise ValueError(f"{path} is not an rtb-ray posterior")
    if ckpt["task"] != task:
        raise ValueError(f"{path} is a posterior of task {ckpt['task']!r}, not {task!r}")
    try:
        own_state_to_load(ckpt["posterior"], *networks)
    except ValueError as err:
        raise ValueError(f"{path} holds a posterior of another shape than its config's "
                         f"network ({err})") from None
    return ckpt


def load_posterior(task: Any, cfg: RunConfig, weights: Path
                   ) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """(prior, posterior, step): the task's prior and the posterior network of ``cfg`` with the
    trained weights of ``weights``, a run's ``checkpoint.pt`` or a logged model's posterior file
    (refused with a ValueError as ``load_run_checkpoint`` / ``load_posterior_file`` refuse)."""
    from rtb_ray.learner import make_posterior
    from rtb_ray.networks import load_own_state

    prior = task.prior()
    posterior = make_posterior(prior, cfg.train.adapter, task)
    if Path(weights).name == "checkpoint.pt":
        learner = load_run_checkpoint(weights, task.name, (posterior, prior))["learner"]
        state, step = learner["posterior"], learner["step"]
    else:
        saved = load_posterior_file(weights, task.name, (posterior, prior))
        state, step = saved["posterior"], saved["step"]
    load_own_state(posterior, prior, state)
    return prior, posterior.eval(), int(step)


def version_tags(final: dict[str, Any]) -> dict[str, float]:
    """A registered version's tags: the final evaluation's finite numbers as ``eval/<key>`` (the
    run's metric names), the first ``MAX_VERSION_TAGS`` in the evaluation's order (its summary
    comes first, per-condition and per-mode detail after)."""
    numbers = {f"eval/{k}": float(v) for k, v in final.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return dict(list(numbers.items())[:MAX_VERSION_TAGS])


LOCK_FILE = ".lock"


def _lock(output: Path) -> IO[str] | None:
    """``<run>/.lock``, held by this process (None: another live process holds it). The kernel
    releases it when the holder dies, even by SIGKILL, so a crashed run can be resumed."""
    f = open(Path(output) / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def check_run_dir(output: Path, resume: bool) -> Path:
    """The checkpoint path; refuses to start over a run, to resume a missing one, or to touch a
    directory that a live run holds (``RunDir.start`` takes its lock)."""
    path = Path(output) / "checkpoint.pt"
    if (Path(output) / LOCK_FILE).exists():
        if (held := _lock(output)) is None:
            owner = (Path(output) / LOCK_FILE).read_text().strip() or "another process"
            raise FileExistsError(f"{output} is in use by a live run ({owner}); stop it first")
        held.close()
    if resume and not path.exists():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    if not resume and path.exists():
        raise FileExistsError(f"{output} already holds a run; pass --resume {output} to "
                              f"continue it")
    return path


@dataclass
class Clock:
    """Wall time of the fine-tuning, and how much of it went to evaluation and to tracking."""

    start: float = field(default_factory=time.perf_counter)
    offset: float = 0.0  # time already spent before a resume
    eval_s: float = 0.0
    tracking_s: float = 0.0  # in tracker calls

    @property
    def wall_s(self) -> float:
        return self.offset + time.perf_counter() - self.start

    def state_dict(self) -> dict[str, float]:
        return {"wall_s": self.wall_s, "eval_s": self.eval_s, "tracking_s": self.tracking_s}


class RunDir:
    """Files, checkpoint and tracker of one run. ``open`` refuses to start over a run (or to
    resume a missing one) before anything is written."""

    def __init__(self, output: Path, cfg: RunConfig, task_name: str, resume: bool,
                 headline: str | None = None) -> None:
        self.output, self.cfg, self.task_name = Path(output), cfg, task_name
        self.headline = headline  # the task's first progress metric, for summary.png
        self.checkpoint_path = check_run_dir(self.output, resume)
        self.resume = resume
        self.resumed_at: int | None = None
        self.clock = Clock()
        self.tracker: MlflowTracker | None = None
        self._lock: IO[str] | None = None
        self.last: dict[str, dict[str, Any]] = {"train": {}, "eval": {}}  # newest row per kind

    def load_checkpoint(self, networks: tuple[torch.nn.Module, torch.nn.Module]) -> dict | None:
        """The checkpoint to resume from (checked against the task and the networks, posterior
        and prior), or None."""
        if not self.resume:
            return None
        ckpt = load_run_checkpoint(self.checkpoint_path, self.task_name, networks,
                                   self.cfg.train.log_z.kind)
        self.resumed_at = int(ckpt["learner"]["step"])
        clock = ckpt["clock"]
        self.clock = Clock(offset=clock["wall_s"], eval_s=clock["eval_s"],
                           tracking_s=clock.get("tracking_s", 0.0))
        return ckpt

    def start(self, tracking: TrackingRequest | None = None, ray_address: str | None = None
              ) -> None:
        """Write config.yaml and open the MLflow run (last, so that a run that fails to start
        leaves no MLflow run behind) where ``tracking`` (taken where the command line was read;
        default: this process's) says."""
        (self.output / "eval").mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.output)  # one live writer per run directory, held until close
        if self._lock is None:
            raise FileExistsError(f"{self.output} is in use by a live run; stop it first")
        self._lock.truncate(0)
        self._lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._lock.flush()
        (self.output / "config.yaml").write_text(
            yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
        if self.cfg.tracking.enabled:
            self.tracker = open_run_tracker(self.output, self.cfg, self.task_name,
                                            resume=self.resume, request=tracking,
                                            ray_address=ray_address)
            if self.resumed_at is not None:
                self.tracker.set_tags({"resumed_at_step": self.resumed_at})
            if (every := self.cfg.tracking.system_metrics_every_s) > 0:
                self.tracker.start_system_metrics(every)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "task": self.task_name,
                           "config_digest": self.cfg.digest(),
                           "rng": {"torch": torch.get_rng_state()},
                           "clock": self.clock.state_dict(), **state}, self.checkpoint_path)
        if self.cfg.tracking.log_checkpoints:
            self.artifact(self.checkpoint_path, "checkpoint")

    def log(self, row: dict[str, Any]) -> None:
        """One row to metrics.jsonl and, as ``<kind>/<key>`` metrics at its step, to MLflow."""
        self.last[row["kind"]] = row
        with open(self.output / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            t0 = time.perf_counter()
            self.tracker.log_metrics({f"{row['kind']}/{k}": v for k, v in row.items()
                                      if k not in ("kind", "step") and isinstance(v, (int, float))},
                                     step=row["step"])
            self.clock.tracking_s += time.perf_counter() - t0

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.tracker is not None:
            t0 = time.perf_counter()
            self.tracker.log_artifact(path, artifact_path)
            self.clock.tracking_s += time.perf_counter() - t0

    def log_eval(self, metrics: dict[str, float], name: str) -> dict[str, float]:
        """An evaluation's row, its JSON and its picture (``eval/<name>.png``, made by the
        evaluator), with the clock's figures."""
        metrics.update(wall_s=self.clock.wall_s, train_s=self.clock.wall_s - self.clock.eval_s,
                       tracking_s=self.clock.tracking_s)
        write_json(self.output / "eval" / f"{name}.json", metrics)
        self.log({"kind": "eval", **metrics})
        self.artifact(self.output / "eval" / f"{name}.png", "eval")
        self.artifact(self.output / "eval" / f"{name}.json", "eval")
        text = self.output / "eval" / f"{name}.txt"
        if text.exists():  # a task's samples as text (language), beside its picture
            self.artifact(text, "eval")
        return metrics

    def finish(self, final: dict[str, float], posterior: torch.nn.Module,
               input_example: dict[str, torch.Tensor], own_weights: dict[str, torch.Tensor]
               ) -> None:
        """``final_eval.json`` and the end-of-run artifacts: after the loop, never on its path.
        The logged model carries ``own_weights`` (``own_state``) and the config, so that
        ``rtb-ray sample models:/...`` rebuilds the posterior as from the run directory."""
        write_json(self.output / "final_eval.json", final)
        if self.tracker is None:
            return
        self.tracker.log_artifact(self.output / "final_eval.json")
        self.tracker.log_artifact(self.output / "metrics.jsonl")
        if not self.cfg.tracking.log_model:
            return
        try:
            with tempfile.TemporaryDirectory() as tmp:
                weights = Path(tmp) / "posterior.pt"
                torch.save({"format": POSTERIOR_FORMAT, "task": self.task_name,
                            "step": int(final["step"]),
                            "posterior": {k: v.detach().cpu() for k, v in own_weights.items()}},
                           weights)
                uri = self.tracker.log_pytorch_model(
                    posterior, input_example, name="posterior", step=int(final["step"]),
                    extra_files={f"{MODEL_FILES}/config.yaml": self.output / "config.yaml",
                                 f"{MODEL_FILES}/posterior.pt": weights})
            print(f"MLflow: posterior logged as {uri}")
        except Exception as err:  # the run's results are already on disk: warn, do not fail
            print(f"rtb-ray: warning: could not log the posterior to MLflow: {err}")
            return
        if (name := self.cfg.tracking.register_as) is not None:
            try:
                print(f"MLflow: posterior registered as "
                      f"{self.tracker.register_model(name, uri, version_tags(final))}")
            except Exception as err:  # as above; `rtb-ray sample` of the run directory works
                print(f"rtb-ray: warning: could not register the posterior as {name!r} in "
                      f"MLflow: {err}")

    def close(self, status: str) -> None:
        """Draw ``summary.png`` (and log it), end the MLflow run (FINISHED, KILLED on Ctrl-C, or
        FAILED); release the directory."""
        try:
            summary = write_summary(self.output, self.headline,
                                    f"{self.task_name} · {self.output.name} · {status.lower()}")
        except Exception as err:  # a picture must not hide how the run ended
            print(f"rtb-ray: warning: could not draw {self.output / 'summary.png'}: {err}")
            summary = None
        if self.tracker is not None:
            if summary is not None:
                self.tracker.log_artifact(summary)
            counters = self.tracker.close(status)
            if counters.failed or counters.artifacts_failed:
                print(f"rtb-ray: warning: MLflow failed to write {counters.failed} metric "
                      f"points, {counters.artifacts_failed} artifacts (last error: "
                      f"{self.tracker.last_error})")
        if self._lock is not None:
            self._lock.close()
