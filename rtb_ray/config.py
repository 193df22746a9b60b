"""Typed, validated run configuration, loaded from YAML with ``key.path=value`` overrides.

Every section forbids unknown keys, so a typo is an error that names the key, not a silently
ignored setting. The ``task`` section is validated by the task's own model (rtb_ray/tasks.py:
``task.name`` names a built-in task, a module or a file).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rtb_ray.roles import ROLE_NAMES, check_role_names

MAX_WORKERS_PER_ROLE = 1024  # far above any cluster here; catches a mistyped count early


class ConfigError(ValueError):
    """A bad configuration. The message is one line that names the offending key."""


def first_line(err: BaseException) -> str:
    """An exception as one line for a user: its type and its message's first line (a nested
    traceback in the message stays out of the user's terminal)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class Strict(BaseModel):
    # inf and NaN are never a sensible setting (a learning rate, a share, a timeout)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ExploreConfig(Strict):
    """Variance inflation of posterior rollouts: ``explore`` std added in quadrature per step,
    annealed linearly from ``start`` to ``end`` over the first ``anneal_fraction`` of training."""

    start: float = Field(0.5, ge=0)
    end: float = Field(0.0, ge=0)
    anneal_fraction: float = Field(0.5, gt=0, le=1)

    def at(self, progress: float) -> float:
        frac = min(progress / self.anneal_fraction, 1.0)
        return self.start + (self.end - self.start) * frac


class ObjectiveConfig(Strict):
    kind: Literal["rtb", "vargrad", "kl_rl"] = "rtb"
    beta: float = Field(1.0, gt=0, description="reward temperature: target ∝ p_prior · r^beta")
    loss_clip: float | None = Field(None, ge=0, description="relu(δ² − c) per trajectory")
    log_reward_floor: float | None = Field(None, description="clamp log r from below")
    chunk_steps: int | None = Field(
        None, ge=1, description="backprop Σ log p_φ in chunks of this many steps (O(chunk) memory)"
    )
    subsample_steps: int | None = Field(
        None, ge=1, description="gradients through this many random steps, rescaled to be unbiased"
    )
    kl_weight: float = Field(
        1.0, ge=0, description="kl_rl only: γ in the advantage β log r − γ·log(p_φ/p_prior). 1: "
                               "the KL-regularised objective whose optimum is the posterior; "
                               "γ > 0: DPOK; 0: DDPO (reward only, advantages divided by their "
                               "group's std)")

    @model_validator(mode="after")
    def _kl_weight_is_kl_rl(self) -> "ObjectiveConfig":
        if self.kl_weight != 1.0 and self.kind != "kl_rl":
            raise ValueError(f"kl_weight: applies to kind kl_rl only (kind is {self.kind})")
        return self


class MassCoveringConfig(Strict):
    """An optional maximum-likelihood term beside RTB (off by default; docs/RESULTS.md, digits):
    prior samples resampled ∝ r^β are a sample of the target, and each learner step adds
    ``weight`` × the family's denoising loss on ``batch_size`` of them. It fits class masses
    that RTB's squared log-space error misweights (exp E[β log r] instead of E[r^β])."""

    weight: float = Field(0.0, ge=0, description="× the denoising loss on target samples")
    num_samples: int = Field(20_000, ge=1, description="prior samples resampled ∝ r^β, once")
    batch_size: int = Field(256, ge=1)
    first_steps: int | None = Field(
        None, ge=1, description="the term only on chain steps k < first_steps, where the "
                                "coarse shape is drawn (None: all steps); RTB alone shapes the rest")
    warm_start_steps: int = Field(0, ge=0, description="denoising-only steps before the first RTB step")
    warm_start_lr: float = Field(3e-4, gt=0)

    @property
    def enabled(self) -> bool:
        """Whether the run needs the target samples (for the term or the warm start)."""
        return self.weight > 0 or self.warm_start_steps > 0


class AdapterConfig(Strict):
    """What of the posterior network is trained: all of it (``full``) or low-rank adapters on
    the linear layers of a frozen copy of the prior (``lora``)."""

    kind: Literal["full", "lora"] = "full"
    rank: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0, description="the adapters' output is scaled by alpha/rank")
    target_modules: list[str] | None = Field(
        None, min_length=1, description="module paths, dotted suffixes (to_out.0) or globs "
                                        "(*.attn.c_*) to adapt (None: every linear layer)")


class LogZConfig(Strict):
    """log Z, or log Z(y) for a conditional task: one number (``scalar``), one per condition id
    (``table``: ``cond`` holds ids 0..num_conditions-1), or an MLP of the condition (``mlp``).
    Its learning rate is ``train.lr_log_z``."""

    kind: Literal["scalar", "table", "mlp"] = "scalar"
    num_conditions: int | None = Field(None, ge=1, description="table: how many condition ids")
    hidden: int = Field(64, ge=1, description="mlp: width")
    depth: int = Field(2, ge=1, description="mlp: hidden layers")

    @model_validator(mode="after")
    def _table_size(self) -> "LogZConfig":
        if self.kind == "table" and self.num_conditions is None:
            raise ValueError("num_conditions: a table log Z needs the number of condition ids")
        return self


class TrainConfig(Strict):
    steps: int = Field(5000, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_log_z: float = Field(0.1, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    lr_final_fraction: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)
    explore: ExploreConfig = ExploreConfig()
    adapter: AdapterConfig = AdapterConfig()
    sources: dict[str, float] = Field(
        default_factory=lambda: {"posterior": 1.0},
        description="share of each batch per source: posterior, prior, backward, dataset",
    )
    backward_half_life: int = Field(
        4096, ge=1, description="backward rollouts start from recent forward terminals of the "
                                "store: a row this many rows older is drawn half as often"
    )
    backward_candidates: int = Field(
        4, ge=1, description="stored terminals drawn per backward trajectory, resampled by "
                             "importance weight toward the target"
    )
    objective: ObjectiveConfig = ObjectiveConfig()
    log_z: LogZConfig = LogZConfig()
    group_size: int = Field(
        1, ge=1, description="rollouts draw n/k conditions and repeat each k times; VarGrad and "
                             "KL-RL centre within these groups (1: over the whole batch)")
    mass_covering: MassCoveringConfig = MassCoveringConfig()
    log_every_steps: int = Field(
        50, ge=1, description="average the step stats over this many steps into one train row"
    )

    @field_validator("sources")
    @classmethod
    def _check_sources(cls, v: dict[str, float]) -> dict[str, float]:
        check_role_names(v, "train.sources", noun="source")
        for name, share in v.items():
            if not 0 <= share < math.inf:
                raise ValueError(f"share of {name!r} must be a finite number >= 0 (got {share})")
        if sum(v.values()) <= 0:
            raise ValueError("shares must not all be zero")
        return v


MAX_EVAL_SAMPLES = 1_000_000  # each keeps T+1 states in memory: more is a typo, not a setting


class EvalConfig(Strict):
    every_steps: int = Field(500, ge=1)
    num_samples: int = Field(10_000, ge=10, le=MAX_EVAL_SAMPLES)
    final_num_samples: int = Field(50_000, ge=10, le=MAX_EVAL_SAMPLES)


class TrackingConfig(Strict):
    """MLflow tracking of a run (where it is stored is not a setting: ``--tracking-uri``, else
    ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``; rtb_ray/tracking.py ``tracking_target``)."""

    enabled: bool = True
    experiment: str | None = Field(
        None, min_length=1, max_length=500,
        description="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else the task name)"
    )
    log_checkpoints: bool = Field(False, description="upload checkpoint.pt at every checkpoint")
    log_model: bool = Field(True, description="log the final posterior with the PyTorch flavour")
    system_metrics_every_s: float = Field(
        10.0, ge=0, description="sample the learner's CPU, memory, disk and network (and GPUs) "
        "every this many seconds as MLflow's system/* metrics; 0: off")
    register_as: str | None = Field(
        None, max_length=256,  # the registry's column (MLflow's SQL schema)
        description="register the final posterior in the MLflow model registry under this name"
    )

    @field_validator("register_as")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        if v is not None:  # MLflow's own rule, so that a name it would refuse fails before training
            from mlflow.exceptions import MlflowException
            from mlflow.utils.validation import _validate_model_name

            try:
                _validate_model_name(v)
            except MlflowException as err:
                raise ValueError(err.message) from None
        return v

    @model_validator(mode="after")
    def _registered_model_is_logged(self) -> "TrackingConfig":
        if self.register_as is not None and not (self.enabled and self.log_model):
            raise ValueError(f"register_as ({self.register_as!r}) needs the posterior logged "
                             f"to MLflow (tracking.enabled and tracking.log_model true, no "
                             f"--no-mlflow)")
        return self


class ReplayConfig(Strict):
    """The replay store the roles fill and the learner samples (docs/REPLAY.md)."""

    capacity: int = Field(200_000, ge=1, le=1 << 30,
                          description="trajectories held in memory (FIFO)")
    samples_per_insert: float | None = Field(
        4.0, gt=0, description="target learner samples per inserted trajectory (None: no limit)"
    )
    error_buffer: float | None = Field(
        None, gt=0, description="slack of the ratio, in samples (default: max(min_size, 2·batch))"
    )
    min_size_to_sample: int = Field(1024, ge=1, description="rows stored before the learner starts")
    recency_half_life: int | None = Field(
        None, ge=1, description="learner draws each source's newer rows more often: a row this "
                                "many rows older is drawn half as often (None: uniform)"
    )
    persist: bool = Field(True, description="on Ray, seal segments to <run>/replay (for --resume)")
    segment_rows: int | None = Field(
        None, ge=1, description="rows per sealed segment (default ≈ 64 MiB); every checkpoint "
                                "also seals what is pending"
    )
    seal_every_s: float | None = Field(
        10.0, gt=0, description="also seal rows that have waited this long (None: only full "
                                "segments): a crash loses at most this many seconds of inserts"
    )
    keep_bytes: int | None = Field(
        None, ge=1, description="bytes of sealed segments kept on disk, the oldest deleted first "
                                "(None: every segment; --resume reloads what is kept)"
    )
    keep_segments: int | None = Field(
        None, ge=1, description="sealed segments kept on disk, the newest (None: every one)"
    )

    @model_validator(mode="after")
    def _fits(self) -> "ReplayConfig":
        for key in ("min_size_to_sample", "segment_rows"):
            value = getattr(self, key)
            if value is not None and value > self.capacity:
                raise ValueError(f"{key} ({value}) must be <= capacity ({self.capacity}): the "
                                 f"store could never hold that many rows")
        return self


def check_worker_counts(counts: dict[str, int], *, total: bool = True) -> dict[str, int]:
    """Rollout workers per role (``runtime.workers``, ``rtb-ray scale``): known roles, whole
    numbers in 0..MAX_WORKERS_PER_ROLE, and (``total``) at least one in all; ValueError."""
    check_role_names(counts, "the worker counts")
    for role, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_WORKERS_PER_ROLE:
            raise ValueError(f"workers of {role!r} must be a whole number in "
                             f"0..{MAX_WORKERS_PER_ROLE} (got {n!r})")
    if total and sum(counts.values()) < 1:
        raise ValueError("at least one rollout worker is needed: with none the learner waits "
                         "forever (stop the run with Ctrl-C instead)")
    return counts


class RuntimeConfig(Strict):
    """How the roles run: on Ray, workers per role; in process, turns in those proportions."""

    workers: dict[str, int] = Field(
        default_factory=lambda: {"posterior": 1, "prior": 1, "backward": 1},
        description="rollout workers per role at start (rtb-ray scale changes it live)",
    )
    rollout_batch_size: int = Field(128, ge=1, description="trajectories per worker call")
    worker_num_cpus: float = Field(0.5, gt=0, description="Ray CPUs per rollout worker")
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources per rollout worker, e.g. {rollout: 1} on cluster.yaml: "
                    "workers then run only on nodes that have them, and wait (pending) for the "
                    "autoscaler to add such nodes")
    learner_num_cpus: float = Field(1.0, gt=0)
    learner_num_gpus: float = Field(0.0, ge=0, description="> 0: the learner runs on CUDA")
    publish_every_steps: int = Field(5, ge=1, description="learner steps between weight versions")
    max_staleness: int | None = Field(
        None, ge=1, description="posterior workers wait rather than sample with weights more "
                                "than this many learner steps old (None: no bound)"
    )
    max_in_flight: int = Field(2, ge=1, description="sampling calls in flight per worker")
    call_timeout_s: float = Field(
        60.0, gt=0, description="a worker call waiting longer for the store or for fresh "
                                "weights returns without a batch (and is counted)")
    store_max_restarts: int = Field(
        2, ge=0, le=100, description="times the replay store's actor is restarted from its "
                                     "sealed segments if it dies (unsealed rows are lost)")
    learner_max_restarts: int = Field(
        2, ge=0, le=100, description="times a learner that died (killed, node lost, OOM) is "
                                     "restarted from the last checkpoint before the run fails")
    sample_timeout_s: float = Field(
        600.0, gt=0, description="the learner fails when the store has no batch for it this long")

    @field_validator("workers")
    @classmethod
    def _check_workers(cls, v: dict[str, int]) -> dict[str, int]:
        return check_worker_counts(v)

    @field_validator("worker_resources")
    @classmethod
    def _check_worker_resources(cls, v: dict[str, float]) -> dict[str, float]:
        # Ray's own rules, checked here so a typo is one line before anything starts
        for name, amount in v.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"{name!r} is not a custom resource (CPUs per worker: "
                                 f"runtime.worker_num_cpus)")
            if not name:
                raise ValueError("a resource name must not be empty")
            if not 0 < amount <= 1024 or (amount > 1 and amount != int(amount)):
                raise ValueError(f"{name!r}: an amount in (0, 1] or a whole number up to 1024 "
                                 f"(got {amount})")
        return v

    @model_validator(mode="after")
    def _staleness_reachable(self) -> "RuntimeConfig":
        if self.max_staleness is not None and self.max_staleness < self.publish_every_steps:
            raise ValueError(f"max_staleness ({self.max_staleness}) must be >= "
                             f"publish_every_steps ({self.publish_every_steps}): workers would "
                             f"wait for versions that are never published")
        return self


class RunConfig(Strict):
    """One experiment. ``task`` holds the task's own settings (validated by the task)."""

    task: Any
    seed: int = Field(0, strict=True)  # `seed: true` is a mistake, not 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = Field(None, ge=1, description="default: the CPUs available")
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint_every_steps: int = Field(1000, ge=1)
    tracking: TrackingConfig = TrackingConfig()
    replay: ReplayConfig = ReplayConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, v: Any) -> Any:
        from rtb_ray.tasks import resolve_task_name, task_config_model

        if not isinstance(v, dict) or "name" not in v:
            raise ValueError("must be a mapping with a 'name' (e.g. name: gmm25, "
                             "name: my_tasks.ring or name: ./ring.py)")
        name = resolve_task_name(v["name"])  # a task file by its absolute path, for every node
        return task_config_model(name).model_validate({**v, "name": name})

    @model_validator(mode="after")
    def _whole_groups(self) -> "RunConfig":
        k = self.train.group_size
        for key, value in (("train.batch_size", self.train.batch_size),
                           ("runtime.rollout_batch_size", self.runtime.rollout_batch_size),
                           ("replay.capacity", self.replay.capacity)):
            if value % k:
                raise ValueError(f"{key} ({value}) must be a multiple of train.group_size ({k}): "
                                 f"batches are made of whole groups")
        return self

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]

    @property
    def seeds(self) -> "Seeds":
        return Seeds(self.seed)


class Seeds:
    """Every random stream of a run, derived from ``seed`` here and nowhere else. The offsets
    only keep the streams apart; both runtimes use the same ones."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.learner = seed  # torch's global stream and the learner's (objective noise)
        self.store = seed  # the replay store's draws
        self.inline_rollouts = seed + 1  # the in-process roles
        self.mass_covering = seed + 2  # the target samples of train.mass_covering
        self.eval_targets = seed + 7  # the prior trajectories the EUBO resamples
        self.guidance = seed + 10_000  # the guidance baseline's samples, at every scale

    def evaluation(self, step: int) -> int:
        return self.seed + 10_000 + step

    def worker(self, role: str, index: int) -> int:
        """The ``index``-th rollout worker of ``role`` (replacements get new indices)."""
        return self.seed + 1000 * ROLE_NAMES.index(role) + index


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg += f" (got {e['input']!r})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def validate_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of YAML; anything larger is not one


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: not a config file (a regular YAML file of at most "
                          f"{MAX_CONFIG_BYTES >> 10} KiB)")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read ({err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return validate_config(apply_overrides(data, overrides or []))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.path=value`` settings (values parsed as YAML) written into a config tree."""
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted.strip():
            raise ConfigError(f"override {item!r}: expected key.path=value")
        *sections, key = dotted.strip().split(".")
        node = data
        for name in sections:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted.strip()}: {name} is not a section")
        node[key] = yaml.safe_load(raw)
    return data


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return json.loads(cfg.model_dump_json())
