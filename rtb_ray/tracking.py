"""MLflow tracking: one MLflow run per training run, written without stalling the training loop.

``MlflowTracker`` owns one MLflow run: it creates it, or continues it by id when a training run
resumes. Params and tags are written when the run opens and the final model when it ends (both
synchronous, off the hot path). Metrics and artifact uploads go through a queue that one
background thread drains with ``client.log_batch`` (up to 1000 points a request), so
``log_metrics`` and ``log_artifact`` only append and return. The metric queue is bounded: when
MLflow cannot keep up, the oldest points are dropped and counted rather than memory growing.

Everything goes through an explicit ``MlflowClient`` (no global fluent state), so several
trackers coexist in one process; a Ray ``Tracker`` actor can host one as it is. Ray is never
imported here, and MLflow only when a tracker is made.

By default the store is a SQLite file in the run directory (``<run>/mlflow.db``, artifacts in
``<run>/mlartifacts``); ``<run>/mlflow_run.json`` records the run id so that ``--resume``
continues the same MLflow run.
"""

from __future__ import annotations

import collections
import copy
import getpass
import importlib.metadata
import json
import logging
import math
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit, urlunsplit

from rtb_ray.config import ConfigError, RunConfig, config_to_dict

if TYPE_CHECKING:
    import torch

RUN_FILE = "mlflow_run.json"
# MLflow's own limits (mlflow.utils.validation): values past them are rejected, not cut.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
METRICS_PER_BATCH = 1000
PARAMS_TAGS_PER_BATCH = 100
VERSIONED_PACKAGES = ("rtb-ray", "torch", "ray", "mlflow", "pyarrow", "numpy")
SOURCE_ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger(__name__)


class TrackingError(ValueError):
    """MLflow could not open or continue the run. One line, naming the store."""


@dataclass
class TrackerCounters:
    metrics_logged: int = 0  # points written to MLflow
    dropped: int = 0  # oldest points dropped because the queue was full
    skipped_non_finite: int = 0  # NaN / ±inf values, never sent
    failed: int = 0  # points lost to MLflow errors
    artifacts_logged: int = 0
    artifacts_failed: int = 0


# -- helpers -----------------------------------------------------------------------------------
def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = f"...[truncated, {len(text)} chars]"
    return text[: limit - len(marker)] + marker


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.001}}`` → ``{"train.lr": "0.001"}``. Leaves are written as JSON (so
    ``null``, ``true``, lists) except strings; values are cut to MLflow's 6000 characters."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = truncate(text, MAX_PARAM_VALUE)
    return out


def default_tracking_uri(output: Path) -> str:
    """A SQLite file in the run directory, by absolute path (``sqlite:////abs/run/mlflow.db``)."""
    return "sqlite:///" + str(Path(output).resolve() / "mlflow.db")


def normalize_tracking_uri(uri: str) -> str:
    """Check that ``uri`` is a URI; make a relative SQLite path absolute, so the recorded URI
    and the printed ``mlflow ui`` command work from any directory."""
    scheme = urlsplit(uri).scheme
    if len(scheme) < 2 or not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*", scheme):
        raise ConfigError(f"--tracking-uri: expected a URI such as sqlite:////abs/path/mlflow.db "
                          f"or http://host:5000 (got {uri!r})")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def redact_uri(uri: str) -> str:
    """The URI without a password, for printing (``postgresql://me:***@db/mlflow``)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:////") else None


def git_state(root: Path = SOURCE_ROOT) -> tuple[str, bool] | None:
    """(commit, dirty) of the source tree this package runs from, or None when it is not a git
    checkout (an installed wheel) or git is missing. Only ``root`` itself is asked: a package
    installed into a virtualenv that lies inside some repository must not report that one."""
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return commit, bool(status.strip())


def run_tags(ray_address: str | None = None) -> dict[str, str]:
    """Where and with what a run ran: git commit, package versions, host, Ray address."""
    tags = {"host": socket.gethostname(), "mlflow.source.name": "rtb-ray",
            "mlflow.source.type": "LOCAL"}
    if (state := git_state()) is not None:
        tags["mlflow.source.git.commit"], dirty = state
        tags["git.dirty"] = str(dirty).lower()
    for package in VERSIONED_PACKAGES:
        try:
            tags[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if ray_address:
        tags["ray.address"] = ray_address
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in containers without a passwd entry
        return "unknown"


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# -- the tracker -------------------------------------------------------------------------------
class MlflowTracker:
    """One MLflow run. ``run_id=None`` creates a run in ``experiment`` (creating the experiment
    if needed); a ``run_id`` continues that run (its experiment is kept)."""

    def __init__(self, tracking_uri: str, experiment: str, *, run_name: str | None = None,
                 run_id: str | None = None, queue_size: int = 100_000,
                 batch_wait_s: float = 0.5) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.batch_wait_s = batch_wait_s
        if (db := sqlite_path(tracking_uri)) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)  # SQLite makes the file, not the folder
        self._client = MlflowClient(tracking_uri)
        try:
            if run_id is None:
                run = self._client.create_run(self._experiment_id(experiment), run_name=run_name,
                                              tags={"mlflow.user": _user()})
            else:
                run = self._client.get_run(run_id)
                self._client.update_run(run_id, status="RUNNING")
        except TrackingError:
            raise
        except Exception as err:  # MlflowException, connection errors: one line, naming the store
            what = f"run {run_id}" if run_id else f"experiment {experiment!r}"
            raise TrackingError(f"MLflow at {redact_uri(tracking_uri)} ({what}): "
                                f"{_one_line(err)}") from None
        self.run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id
        self.experiment_name = (experiment if run_id is None
                                else self._client.get_experiment(self.experiment_id).name)
        self.resumed = run_id is not None

        self._counters = TrackerCounters()
        self._points: collections.deque[tuple[str, float, int, int]] = collections.deque(
            maxlen=queue_size)
        self._artifacts: collections.deque[tuple[Path, str | None]] = collections.deque()
        self._cond = threading.Condition()
        self._io_lock = threading.Lock()  # one MLflow call at a time (SQLite has one writer)
        self._busy = False
        self._flush_waiters = 0
        self._stopping = False
        self._closed = False
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._drain, name="mlflow-tracker", daemon=True)
        self._thread.start()

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            # A SQLite store keeps artifacts next to its file; otherwise MLflow would put them
            # in ./mlruns of whatever directory the run was started from.
            db = sqlite_path(self.tracking_uri)
            location = (db.parent / "mlartifacts").as_uri() if db is not None else None
            try:
                return self._client.create_experiment(name, artifact_location=location)
            except MlflowException:  # created concurrently by another run
                exp = self._client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted in "
                                f"{redact_uri(self.tracking_uri)}; restore it or pick another "
                                f"name with --experiment")
        return exp.experiment_id

    # -- synchronous: when the run opens ------------------------------------------------------
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, truncate(str(v), MAX_TAG_VALUE)) for k, v in tags.items()]
        with self._io_lock:
            for i in range(0, len(items), PARAMS_TAGS_PER_BATCH):
                self._client.log_batch(self.run_id, tags=items[i : i + PARAMS_TAGS_PER_BATCH])

    def log_params(self, params: Mapping[str, Any]) -> list[str]:
        """Log params (nested mappings are flattened to dotted keys). MLflow never changes a
        logged param, so in a continued run a changed value is recorded as the tag
        ``changed_on_resume.<key>`` instead. Returns the changed keys."""
        from mlflow.entities import Param

        flat = flatten_params(params)
        with self._io_lock:
            existing = self._client.get_run(self.run_id).data.params if self.resumed else {}
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        changed = {k: v for k, v in flat.items() if k in existing and existing[k] != v}
        with self._io_lock:
            for i in range(0, len(new), PARAMS_TAGS_PER_BATCH):
                self._client.log_batch(self.run_id, params=new[i : i + PARAMS_TAGS_PER_BATCH])
        if changed:
            self.set_tags({f"changed_on_resume.{k}": v for k, v in changed.items()})
        return sorted(changed)

    # -- asynchronous: the hot path -----------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metric values at ``step`` and return; non-finite values are skipped and
        counted. If the queue is full the oldest queued points are dropped (and counted)."""
        now_ms = int(time.time() * 1000)
        points, skipped = [], 0
        for key, value in metrics.items():
            value = float(value)
            if math.isfinite(value):
                points.append((key, value, now_ms, int(step)))
            else:
                skipped += 1
        with self._cond:
            self._check_open()
            self._counters.skipped_non_finite += skipped
            assert self._points.maxlen is not None
            self._counters.dropped += max(0, len(self._points) + len(points) - self._points.maxlen)
            self._points.extend(points)  # a deque with maxlen drops from the old end
            self._cond.notify_all()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file upload (to ``artifact_path/<name>`` in the run) and return. The file is
        read when it is uploaded: replace it atomically if it changes later."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"artifact {path} does not exist")
        with self._cond:
            self._check_open()
            self._artifacts.append((path, artifact_path))
            self._cond.notify_all()

    def _check_open(self) -> None:
        if self._stopping:
            raise RuntimeError(f"MLflow tracker of run {self.run_id} is closed")

    def _pending(self) -> bool:
        return bool(self._points or self._artifacts)

    def _drain(self) -> None:
        """The background thread: write queued points in batches, then queued artifacts."""
        from mlflow.entities import Metric

        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending() or self._stopping)
                if not self._pending():
                    return  # stopping, and everything is written
                # linger briefly so that points logged close together share one request
                self._cond.wait_for(
                    lambda: self._artifacts or self._stopping or self._flush_waiters > 0
                    or len(self._points) >= METRICS_PER_BATCH,
                    timeout=self.batch_wait_s,
                )
                batch = [self._points.popleft()
                         for _ in range(min(len(self._points), METRICS_PER_BATCH))]
                artifact = self._artifacts.popleft() if not batch else None
                self._busy = True
            try:
                with self._io_lock:
                    if batch:
                        self._client.log_batch(self.run_id, metrics=[
                            Metric(key, value, ts, step) for key, value, ts, step in batch])
                    elif artifact is not None:
                        self._client.log_artifact(self.run_id, str(artifact[0]), artifact[1])
                ok = True
            except Exception as err:  # never let MLflow kill the thread: count and go on
                ok = False
                self.last_error = _one_line(err)
                logger.warning("MLflow %s failed: %s", "log_batch" if batch else "log_artifact",
                               self.last_error)
            with self._cond:
                if batch:
                    if ok:
                        self._counters.metrics_logged += len(batch)
                    else:
                        self._counters.failed += len(batch)
                elif ok:
                    self._counters.artifacts_logged += 1
                else:
                    self._counters.artifacts_failed += 1
                self._busy = False
                self._cond.notify_all()

    @property
    def queued(self) -> int:
        """Metric points and artifacts not yet written."""
        with self._cond:
            return len(self._points) + len(self._artifacts) + int(self._busy)

    def counters(self) -> TrackerCounters:
        with self._cond:
            return replace(self._counters)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written. False if ``timeout`` ran out."""
        with self._cond:
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._pending() and not self._busy,
                                           timeout=timeout)
            finally:
                self._flush_waiters -= 1

    def close(self, status: str = "FINISHED", timeout: float | None = 300.0) -> TrackerCounters:
        """Drain the queue, record the counters as tags and end the run with ``status``
        (FINISHED, FAILED or KILLED). Idempotent."""
        if self._closed:
            return self.counters()
        drained = self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=None if drained else 1.0)
        counters = self.counters()
        if not drained:
            logger.warning("MLflow: %d queued items were not written within %ss", self.queued,
                           timeout)
        try:
            self.set_tags({f"tracking.{k}": v for k, v in vars(counters).items()})
            with self._io_lock:
                self._client.set_terminated(self.run_id, status=status)
        finally:
            self._closed = True
        return counters

    # -- synchronous: when the run ends -------------------------------------------------------
    def log_pytorch_model(self, model: torch.nn.Module, input_example: Mapping[str, torch.Tensor],
                          name: str = "posterior", step: int = 0) -> str:
        """Log ``model`` with MLflow's PyTorch flavour as a LoggedModel of this run and return
        its URI (``models:/<id>``; ``runs:/<run_id>/<name>`` resolves to it as well).

        The model is saved in the ``pt2`` format (``torch.export``) on the CPU: it loads with
        ``mlflow.pytorch.load_model`` without this package or pickle. ``input_example`` maps the
        forward arguments, in order, to a few example rows; the first dimension is the batch.
        """
        import mlflow.pytorch
        import torch
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model, ModelSignature
        from mlflow.types import Schema, TensorSpec

        model = copy.deepcopy(model).cpu().eval()
        example = {k: v.detach().cpu() for k, v in input_example.items()}
        with torch.no_grad():
            output = model(*example.values())

        def spec(t: torch.Tensor, spec_name: str | None = None) -> TensorSpec:
            return TensorSpec(t.numpy().dtype, (-1, *t.shape[1:]), spec_name)

        signature = ModelSignature(inputs=Schema([spec(v, k) for k, v in example.items()]),
                                   outputs=Schema([spec(output)]))
        torch_version = torch.__version__.split("+")[0]
        with self._io_lock:
            logged = self._client.create_logged_model(self.experiment_id, name=name,
                                                      source_run_id=self.run_id)
            try:
                self._client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step)])
                with tempfile.TemporaryDirectory() as tmp:
                    local = os.path.join(tmp, name)
                    mlflow.pytorch.save_model(
                        model, local, serialization_format="pt2", signature=signature,
                        input_example=tuple(v.numpy() for v in example.values()),
                        pip_requirements=[f"torch=={torch_version}"],
                        mlflow_model=Model(artifact_path=logged.artifact_location,
                                           run_id=self.run_id, model_id=logged.model_id,
                                           model_uuid=logged.model_id),
                    )
                    self._client.log_model_artifacts(logged.model_id, local)
            except BaseException:
                self._client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
                raise
            self._client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        return f"models:/{logged.model_id}"

    # -- for people ---------------------------------------------------------------------------
    def ui_hint(self) -> str:
        """How to look at this run."""
        uri = redact_uri(self.tracking_uri)
        if urlsplit(uri).scheme in ("http", "https"):
            return f"{uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return (f"mlflow ui --backend-store-uri {uri}   "
                f"(serves http://127.0.0.1:5000, bound to 127.0.0.1 by default)")


# -- a training run's tracker ------------------------------------------------------------------
def read_run_record(output: Path) -> dict[str, str] | None:
    path = Path(output) / RUN_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        return {"run_id": str(record["run_id"]), "tracking_uri": str(record["tracking_uri"])}
    except (ValueError, KeyError, TypeError):
        raise TrackingError(f"{path}: not an MLflow run record (expected run_id and "
                            f"tracking_uri)") from None


def write_run_record(output: Path, tracker: MlflowTracker) -> None:
    path = Path(output) / RUN_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"run_id": tracker.run_id, "experiment_id": tracker.experiment_id,
                               "tracking_uri": tracker.tracking_uri}, indent=2))
    os.replace(tmp, path)


def open_run_tracker(output: Path, cfg: RunConfig, task_name: str, *, resume: bool,
                     tracking_uri: str | None = None,
                     ray_address: str | None = None) -> MlflowTracker:
    """The tracker of the training run in ``output``: a new MLflow run, or on ``resume`` the
    run recorded in ``output/mlflow_run.json`` (in the store it was recorded with, unless
    ``tracking_uri`` names another), in ``tracking.experiment`` or else the experiment named
    after the task (``task_name``: a task from a file is named by its task, not its path).
    Logs tags, the config as params, and ``config.yaml``."""
    output = Path(output).resolve()
    record = read_run_record(output) if resume else None
    uri = (normalize_tracking_uri(tracking_uri) if tracking_uri
           else record["tracking_uri"] if record else default_tracking_uri(output))
    tracker = MlflowTracker(uri, cfg.tracking.experiment or task_name, run_name=output.name,
                            run_id=record["run_id"] if record else None)
    write_run_record(output, tracker)
    tracker.set_tags({**run_tags(ray_address), "run_dir": str(output)})
    tracker.log_params(config_to_dict(cfg))
    if (output / "config.yaml").exists():
        tracker.log_artifact(output / "config.yaml")
    return tracker
