"""MLflow tracking: one MLflow run per training run, without stalling the training loop.

``MlflowTracker`` creates the run, or continues it by id on ``--resume``
(``<run>/mlflow_run.json``). Params, tags, artifacts and the final model are written
synchronously (a few files per evaluation); metrics go through MLflow's asynchronous
``log_batch``, whose futures ``flush``/``close`` wait on and count. An explicit ``MlflowClient``
(no fluent global state) lets several trackers share a process.

Where runs go is decided by one function, ``tracking_target``, from a ``TrackingRequest`` taken
where the command line was read: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the
SQLite file ``mlflow.db`` of the working directory (MLflow's own default since 3.7), so the runs
of a project share one store; a continued run stays in the store its directory records. A
SQLite store keeps artifacts in ``mlartifacts/`` beside its file."""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import getpass
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit, urlunsplit

from rtb_ray.config import ConfigError, RunConfig, config_to_dict, first_line

if TYPE_CHECKING:
    import torch
    from mlflow.utils.async_logging.run_operations import RunOperations

RUN_FILE = "mlflow_run.json"
# MLflow's default store since 3.7 (``sqlite:///mlflow.db``): what `mlflow ui` opens when
# started in the same directory
DEFAULT_STORE = "mlflow.db"
URI_VARIABLE = "MLFLOW_TRACKING_URI"
EXPERIMENT_VARIABLE = "MLFLOW_EXPERIMENT_NAME"
MAX_EXPERIMENT_NAME = 500  # as tracking.experiment (config.py)
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


def sqlite_uri(path: Path) -> str:
    """The SQLite store at ``path``, by absolute path (``sqlite:////abs/mlflow.db``)."""
    return "sqlite:///" + str(Path(path).resolve())


def normalize_tracking_uri(uri: str, source: str = "--tracking-uri") -> str:
    """Check that ``uri`` is a URI (ConfigError naming ``source``, where it came from); make a
    relative SQLite path absolute, so the recorded URI and the printed ``mlflow ui`` command work
    from any directory, and on a Ray learner that runs elsewhere."""
    scheme = urlsplit(uri).scheme
    if len(scheme) < 2 or not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*", scheme):
        raise ConfigError(f"{source}: expected a URI such as sqlite:////abs/path/mlflow.db "
                          f"or http://host:5000 (got {uri!r})")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = sqlite_uri(Path(uri.removeprefix("sqlite:///")))
    return uri


@dataclass(frozen=True)
class TrackingRequest:
    """What the command line and its environment say about tracking, taken in the process that
    read them (``tracking_request``): a Ray learner has neither the user's environment nor
    working directory. Values are checked; ``tracking_target`` applies the rule."""

    flag_uri: str | None = None  # --tracking-uri
    env_uri: str | None = None  # MLFLOW_TRACKING_URI
    env_experiment: str | None = None  # MLFLOW_EXPERIMENT_NAME
    cwd: Path = field(default_factory=Path.cwd)  # absolute: where ./mlflow.db is


@dataclass(frozen=True)
class TrackingTarget:
    """Where one run is tracked (``tracking_target``)."""

    uri: str
    experiment: str | None  # None: the run continues in its own experiment (or no task given)
    run_id: str | None  # the MLflow run to continue


def tracking_request(flag_uri: str | None = None, environ: Mapping[str, str] | None = None,
                     cwd: Path | None = None) -> TrackingRequest:
    """Read ``--tracking-uri`` (``flag_uri``), the environment (default ``os.environ``) and the
    working directory; a bad value is a ConfigError naming the flag or variable. Call it before
    anything is written."""
    environ = os.environ if environ is None else environ
    env_uri = environ.get(URI_VARIABLE) or None  # set but empty: unset, as MLflow reads it
    experiment = environ.get(EXPERIMENT_VARIABLE) or None
    if experiment is not None and len(experiment) > MAX_EXPERIMENT_NAME:
        raise ConfigError(f"{EXPERIMENT_VARIABLE}: at most {MAX_EXPERIMENT_NAME} characters "
                          f"(got {len(experiment)})")
    return TrackingRequest(
        flag_uri=normalize_tracking_uri(flag_uri) if flag_uri else None,
        env_uri=normalize_tracking_uri(env_uri, URI_VARIABLE) if env_uri else None,
        env_experiment=experiment, cwd=Path(cwd or Path.cwd()).resolve())


def tracking_target(request: TrackingRequest, *, experiment: str | None = None,
                    task_name: str | None = None,
                    record: Mapping[str, str] | None = None) -> TrackingTarget:
    """Where a run is tracked, for every command that opens a tracker or reads the registry.

    Store: ``--tracking-uri``; else, continuing a run (``record``, its ``mlflow_run.json``),
    the store it was started in, from whatever directory it is resumed; else
    ``MLFLOW_TRACKING_URI``; else ``mlflow.db`` in the working directory.
    Experiment: a continued run keeps its own; else ``experiment`` (``tracking.experiment``,
    which ``--experiment`` sets); else ``MLFLOW_EXPERIMENT_NAME``; else ``task_name``."""
    if record is not None:
        return TrackingTarget(request.flag_uri or record["tracking_uri"], None, record["run_id"])
    uri = request.flag_uri or request.env_uri or sqlite_uri(request.cwd / DEFAULT_STORE)
    return TrackingTarget(uri, experiment or request.env_experiment or task_name, None)


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


def _futures(ops: RunOperations) -> list[concurrent.futures.Future[None]]:
    # RunOperations offers only a blocking wait(); its futures also say "done yet?" and "why not"
    # (a private attribute of MLflow 3.x, hence the pin mlflow<4 and the fallback)
    futures = getattr(ops, "_operation_futures", None)
    if futures is None:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        try:
            ops.wait()
            future.set_result(None)
        except Exception as err:
            future.set_exception(err)
        return [future]
    return futures


# -- the tracker -------------------------------------------------------------------------------
class MlflowTracker:
    """One MLflow run. ``run_id=None`` creates a run in ``experiment`` (creating the experiment
    if needed); a ``run_id`` continues that run (its experiment is kept)."""

    def __init__(self, tracking_uri: str, experiment: str, *, run_name: str | None = None,
                 run_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
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
                                f"{first_line(err)}") from None
        self.run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id
        self.experiment_name = (experiment if run_id is None
                                else self._client.get_experiment(self.experiment_id).name)
        self.resumed = run_id is not None

        self._counters = TrackerCounters()
        # MLflow's futures of the metric batches not yet counted, oldest first, with their sizes
        self._pending: collections.deque[tuple[RunOperations, int]] = collections.deque()
        self._lock = threading.Lock()  # log_metrics and counters() may run on different threads
        self._closing = False
        self._closed = False
        self.last_error: str | None = None
        self._system_metrics: Any = None  # MLflow's SystemMetricsMonitor, when started

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
        for i in range(0, len(items), PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i : i + PARAMS_TAGS_PER_BATCH])

    def log_params(self, params: Mapping[str, Any]) -> list[str]:
        """Log params (nested mappings are flattened to dotted keys). MLflow never changes a
        logged param, so in a continued run a changed value is recorded as the tag
        ``changed_on_resume.<key>`` instead. Returns the changed keys."""
        from mlflow.entities import Param

        flat = flatten_params(params)
        existing = self._client.get_run(self.run_id).data.params if self.resumed else {}
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        changed = {k: v for k, v in flat.items() if k in existing and existing[k] != v}
        for i in range(0, len(new), PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[i : i + PARAMS_TAGS_PER_BATCH])
        if changed:
            self.set_tags({f"changed_on_resume.{k}": v for k, v in changed.items()})
        return sorted(changed)

    # -- the hot path -------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Hand metric values at ``step`` to MLflow's asynchronous logging and return; non-finite
        values are skipped and counted. Write errors are counted once the batch completes."""
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        values = {key: float(value) for key, value in metrics.items()}
        points = [Metric(k, v, now_ms, int(step)) for k, v in values.items() if math.isfinite(v)]
        with self._lock:
            self._check_open()
            self._counters.skipped_non_finite += len(values) - len(points)
            self._settle()
            # one request per chunk, so that a failed request stands for a known number of points
            for i in range(0, len(points), METRICS_PER_BATCH):
                chunk = points[i : i + METRICS_PER_BATCH]
                ops = self._client.log_batch(self.run_id, metrics=chunk, synchronous=False)
                self._pending.append((ops, len(chunk)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file to ``artifact_path/<name>`` in the run, now (a local store copies it in
        milliseconds). MLflow errors are counted and logged, never raised into the loop."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"artifact {path} does not exist")
        self._check_open()
        try:
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as err:
            with self._lock:
                self._counters.artifacts_failed += 1
                self.last_error = first_line(err)
            logger.warning("MLflow log_artifact %s failed: %s", path.name, self.last_error)
            return
        with self._lock:
            self._counters.artifacts_logged += 1

    def _check_open(self) -> None:
        if self._closing:
            raise RuntimeError(f"MLflow tracker of run {self.run_id} is closed")

    def _settle(self) -> None:
        """Count the finished requests at the front of the pending ones (with the lock held)."""
        while self._pending and all(f.done() for f in _futures(self._pending[0][0])):
            ops, points = self._pending.popleft()
            errors = [e for f in _futures(ops) if (e := f.exception()) is not None]
            if errors:  # MLflow has logged the error already
                self._counters.failed += points
                self.last_error = first_line(errors[0])
            else:
                self._counters.metrics_logged += points

    def counters(self) -> TrackerCounters:
        with self._lock:
            self._settle()
            return replace(self._counters)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the metrics logged so far are written, and count them (``failed``,
        ``last_error``). False if ``timeout`` ran out."""
        with self._lock:
            futures = [f for ops, _ in self._pending for f in _futures(ops)]
        drained = not concurrent.futures.wait(futures, timeout).not_done
        with self._lock:
            self._settle()
        return drained

    def start_system_metrics(self, every_s: float) -> None:
        """MLflow's system metrics of this process's machine (``system/cpu_utilization_percentage``,
        ``system/system_memory_usage_megabytes``, disk, network, and ``system/gpu_*`` where
        nvidia-ml-py finds GPUs), sampled every ``every_s`` seconds on a thread of MLflow's until
        ``close``; a continued run carries on from its last step."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # its INFO lines ("Started monitoring...", "Skip logging GPU metrics") are noise in a
        # run's output; failures are still warnings
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self._system_metrics = SystemMetricsMonitor(
            self.run_id, sampling_interval=every_s, resume_logging=self.resumed,
            tracking_uri=self.tracking_uri)
        self._system_metrics.start()

    def close(self, status: str = "FINISHED", timeout: float | None = 300.0) -> TrackerCounters:
        """Wait for the pending metrics, record the counters as tags and end the run with
        ``status`` (FINISHED, FAILED or KILLED). Idempotent."""
        if self._closed:
            return self.counters()
        with self._lock:
            self._closing = True
        if self._system_metrics is not None:
            self._system_metrics.finish()  # its last samples, before the run ends
        if not self.flush(timeout):
            logger.warning("MLflow: metrics still not written after %ss", timeout)
        counters = self.counters()
        try:
            self.set_tags({f"tracking.{k}": v for k, v in vars(counters).items()})
            self._client.set_terminated(self.run_id, status=status)
        finally:
            self._closed = True
        return counters

    # -- synchronous: when the run ends -------------------------------------------------------
    def log_pytorch_model(self, model: torch.nn.Module, input_example: Mapping[str, torch.Tensor],
                          name: str = "posterior", step: int = 0,
                          extra_files: Mapping[str, Path] | None = None) -> str:
        """Log ``model`` with MLflow's PyTorch flavour as a LoggedModel of this run and return
        its URI (``models:/<id>``; ``runs:/<run_id>/<name>`` resolves to it as well).

        The model is saved in the ``pt2`` format (``torch.export``) on the CPU: it loads with
        ``mlflow.pytorch.load_model`` without this package or pickle. ``input_example`` maps the
        forward arguments, in order, to a few example rows; the first dimension is the batch.
        ``extra_files`` maps paths inside the model's directory to local files copied there.
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
                for inside, path in (extra_files or {}).items():
                    (Path(local) / inside).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, Path(local) / inside)
                self._client.log_model_artifacts(logged.model_id, local)
        except BaseException:
            self._client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        self._client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        return f"models:/{logged.model_id}"

    def register_model(self, name: str, model_uri: str, tags: Mapping[str, Any]) -> str:
        """Register the LoggedModel ``model_uri`` (``models:/<id>``) of this run as a new version
        of the registered model ``name`` (created if needed) with ``tags``, in this tracker's
        store; returns ``models:/<name>/<version>``. The version's source is the model's
        artifact location: given ``models:/<id>``, MLflow's SQL registry looks the model up in
        the process-wide store (a TODO in MLflow 3), not this one."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

        try:
            self._client.create_registered_model(name)
        except MlflowException as err:  # registered before: add a version
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        model_id = model_uri.removeprefix("models:/")
        version = self._client.create_model_version(
            name, source=self._client.get_logged_model(model_id).artifact_location,
            run_id=self.run_id, model_id=model_id,
            tags={k: truncate(str(v), MAX_TAG_VALUE) for k, v in tags.items()})
        return f"models:/{name}/{version.version}"

    # -- for people ---------------------------------------------------------------------------
    def describe(self) -> str:
        """Which MLflow run this is, and how to look at it."""
        return (f"MLflow: this run {'continues' if self.resumed else 'is'} run {self.run_id} "
                f"(experiment {self.experiment_name!r}); open it with\n  "
                f"{open_hint(self.tracking_uri, self.experiment_id, self.run_id)}")


def open_hint(uri: str, experiment_id: str, run_id: str) -> str:
    """How to look at a run: its page on a server, or the `mlflow ui` command that serves a
    local store and the run's page there (a shared store holds many runs)."""
    uri = redact_uri(uri)
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if urlsplit(uri).scheme in ("http", "https"):
        return f"{uri.rstrip('/')}/{page}"
    return (f"mlflow ui --backend-store-uri {uri}\n  then http://127.0.0.1:5000/{page}   "
            f"(bound to 127.0.0.1 by default)")


def download_model_files(model_uri: str, tracking_uri: str, folder: str, dst: Path) -> Path:
    """Download ``folder`` of the model ``model_uri`` (``models:/NAME/VERSION``, ``@alias``,
    ``/latest``, or a LoggedModel's ``models:/<id>``) from the store at ``tracking_uri`` into
    ``dst``; returns the local folder. Anything MLflow cannot find is a TrackingError (one line);
    a SQLite store that does not exist is not created."""
    import mlflow.artifacts
    from mlflow.store.artifact.utils.models import get_model_name_and_version
    from mlflow.tracking import MlflowClient

    where = f"MLflow at {redact_uri(tracking_uri)}"
    if (db := sqlite_path(tracking_uri)) is not None and not db.is_file():
        raise TrackingError(f"{model_uri}: no MLflow store at {db} (pass --tracking-uri or set "
                            f"{URI_VARIABLE})")
    client = MlflowClient(tracking_uri)
    try:
        found = get_model_name_and_version(client, model_uri)  # (id,) or (name, version)
        location = (client.get_logged_model(found[0]).artifact_location if len(found) == 1
                    else client.get_model_version_download_uri(*found)).rstrip("/")
        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location}/{folder}", dst_path=str(dst), tracking_uri=tracking_uri))
    except TrackingError:
        raise
    except Exception as err:  # MlflowException, OSError: one line, naming the store
        raise TrackingError(f"{model_uri} ({where}): {first_line(err)}") from None


# -- a training run's tracker ------------------------------------------------------------------
def read_run_record(output: Path) -> dict[str, str] | None:
    """``<run>/mlflow_run.json``: ``run_id``, ``tracking_uri`` and (when recorded)
    ``experiment_id``; None if the run has none (it ran without MLflow)."""
    path = Path(output) / RUN_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        out = {"run_id": str(record["run_id"]), "tracking_uri": str(record["tracking_uri"])}
        if "experiment_id" in record:
            out["experiment_id"] = str(record["experiment_id"])
        return out
    except (ValueError, KeyError, TypeError):
        raise TrackingError(f"{path}: not an MLflow run record (expected run_id and "
                            f"tracking_uri)") from None


def end_recorded_run(output: Path, status: str) -> None:
    """End the MLflow run of ``output`` with ``status`` if it is still RUNNING: for a process
    that died before it could (a killed learner). Best effort: a warning if MLflow fails."""
    try:
        if (record := read_run_record(output)) is None:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(record["tracking_uri"])
        if client.get_run(record["run_id"]).info.status == "RUNNING":
            client.set_terminated(record["run_id"], status=status)
    except Exception as err:  # the run's files are what matter; do not mask the real failure
        logger.warning("could not end the MLflow run of %s: %s", output, first_line(err))


def write_run_record(output: Path, tracker: MlflowTracker) -> None:
    path = Path(output) / RUN_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"run_id": tracker.run_id, "experiment_id": tracker.experiment_id,
                               "tracking_uri": tracker.tracking_uri}, indent=2))
    os.replace(tmp, path)


def open_run_tracker(output: Path, cfg: RunConfig, task_name: str, *, resume: bool,
                     request: TrackingRequest | None = None, method: str | None = None,
                     ray_address: str | None = None) -> MlflowTracker:
    """The tracker of the run in ``output``: a new MLflow run, or on ``resume`` the run recorded
    in ``output/mlflow_run.json``; store and experiment by ``tracking_target`` from ``request``
    (default: this process's command line environment; ``task_name``: a task from a file is
    named by its task, not its path). Logs tags (``method``, default ``train.objective.kind``,
    and ``seed``: what MLflow's compare view groups by), the config as params, and
    ``config.yaml``."""
    output = Path(output).resolve()
    target = tracking_target(request or tracking_request(),
                             experiment=cfg.tracking.experiment, task_name=task_name,
                             record=read_run_record(output) if resume else None)
    tracker = MlflowTracker(target.uri, target.experiment or task_name, run_name=output.name,
                            run_id=target.run_id)
    write_run_record(output, tracker)
    tracker.set_tags({**run_tags(ray_address), "run_dir": str(output),
                      "method": method or cfg.train.objective.kind, "seed": cfg.seed})
    tracker.log_params(config_to_dict(cfg))
    if (output / "config.yaml").exists():
        tracker.log_artifact(output / "config.yaml")
    return tracker
