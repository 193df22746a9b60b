"""The task contract, and where a task comes from.

A task is a module exporting ``Config`` (a pydantic model with a ``name`` field) and
``make_task(config) -> Task``. ``task.name`` is a built-in task (``gmm25``: ``pipelines.gmm25``),
a dotted module (``my_tasks.ring``) or a ``.py`` file (made absolute when the config is loaded).
Code outside a task uses only ``Task`` and ``TransitionFamily`` (docs/examples/ring_task.py).
Optional members: ``eval_conditions`` and the rest of ``ConditionalTask`` (a posterior per
condition); ``posterior_network(prior, adapter) -> nn.Module``, the task's own posterior network
(rtb_ray/learner.py ``make_posterior``), which must start equal to the prior;
``known_terminals(n, generator) -> (x [n, *event], cond [n, *cond] or None)``, samples of data
the posterior should cover, for the ``dataset`` source."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from rtb_ray.config import ConfigError, first_line
from rtb_ray.pretrain import atomic_write_bytes
from rtb_ray.transitions import TransitionFamily

# this project's packages: on every node already, never shipped with a job
OWN_PACKAGES = ("pipelines", "rtb_ray", "actors")


@runtime_checkable
class Task(Protocol):
    name: str
    family: TransitionFamily
    progress_metrics: tuple[str, ...]
    """Keys of ``evaluate()`` that a progress or evaluation line prints."""
    baseline_metric: str
    """The key of ``evaluate()`` by which a baseline sweep picks its best setting (lowest)."""

    def prior(self) -> nn.Module:
        """The frozen prior network (loaded from ``prior_path()``, pretrained when missing and
        the task's settings allow it; a one-line error otherwise)."""
        ...

    def prior_path(self) -> Path | None:
        """The checkpoint file ``prior()`` loads, which the Ray runtime ships to nodes that lack
        it; None when the prior is not a file. No I/O: callable before ``prior()``."""
        ...

    def pretrain(self, progress: bool = True) -> dict[str, Any]:
        """Train the prior and save it to ``prior_path()``; returns its statistics (the floats
        among them are printed by ``rtb-ray pretrain``)."""
        ...

    def log_reward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``log r(x)`` of terminal states ``[n, *event]`` -> ``[n]`` (no temperature)."""
        ...

    def evaluate(self, x: Tensor) -> dict[str, float]:
        """Task-specific metrics of posterior terminal samples (mode weights, distances...)."""
        ...

    def reference_log_z(self, beta: float = 1.0) -> float | None:
        """log E_prior[r^β], the target's normaliser under the learned prior, when the task
        knows it."""
        ...

    def plot(self, x: Tensor, path: Path, title: str = "") -> None:
        """Save a picture of terminal samples (a scatter, an image grid...) as PNG."""
        ...


@runtime_checkable
class ConditionalTask(Task, Protocol):
    """A task whose posterior is p(x | y) ∝ p_prior(x | y)·r(x, y): every rollout, reward,
    metric and log Z(y) is per condition. The prior network takes ``cond``. Where ``Task``'s
    methods take an optional ``cond``, a conditional task's are always called with it."""

    def conditions(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` conditions for rollouts ``[n, *cond]`` (ids: int64; features: float32), drawn
        from the task's distribution over conditions with ``generator``."""
        ...

    def eval_conditions(self) -> Tensor:
        """The fixed conditions evaluation reports on ``[m, *cond]`` (same dtype and shape per
        row as ``conditions``); also what a logged mean log Z(y) averages over."""
        ...

    def reference_log_z(self, beta: float = 1.0, cond: Tensor | None = None) -> Tensor | None:
        """log Z(y) per row of ``cond`` ``[m]``, when the task knows it."""
        ...

    def evaluate(self, x: Tensor, cond: Tensor | None = None,
                 ctx: "EvalContext | None" = None) -> dict[str, float]:
        """Metrics of posterior samples ``x`` of conditions ``cond`` (rows of
        ``eval_conditions()``, each repeated); ``ctx`` can sample the posterior for other
        conditions."""
        ...

    def plot(self, x: Tensor, path: Path, title: str = "", cond: Tensor | None = None) -> None:
        ...


@dataclass
class EvalContext:
    """What a conditional task's ``evaluate`` may use beyond the samples it is given: the
    networks, and ``sample(cond)`` of posterior terminal states for any conditions."""

    prior: nn.Module
    posterior: nn.Module
    sample: Callable[[Tensor], Tensor]
    generator: torch.Generator


def conditional(task: object) -> bool:
    """Whether the task is conditional (``ConditionalTask``): it has ``eval_conditions``."""
    return callable(getattr(task, "eval_conditions", None))


def _members(protocol: type) -> list[str]:
    """What a protocol declares (for error messages that say what is missing)."""
    return [*protocol.__annotations__,
            *(k for k, v in vars(protocol).items() if callable(v) and not k.startswith("_"))]


def resolve_task_name(name: Any) -> str:
    """``task.name`` as the validated config keeps it: a ``.py`` path made absolute."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"task name must be a non-empty string (got {name!r})")
    return str(Path(name).expanduser().resolve()) if name.endswith(".py") else name


def _module_name(path: Path) -> str:
    """A module name for a task file, one per path, the same in every process: its classes
    pickle, and Ray workers import the file under it (task_runtime_env)."""
    stem = re.sub(r"\W", "_", path.stem)
    return f"rtb_ray_task_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def _load_file(name: str) -> ModuleType:
    path = Path(resolve_task_name(name))
    module = _module_name(path)
    if module in sys.modules:
        return sys.modules[module]
    if not path.is_file():
        try:  # on a Ray node without this path: the copy the job shipped (task_runtime_env)
            return importlib.import_module(module)
        except ModuleNotFoundError:
            raise ConfigError(f"task {name!r}: the file {path} does not exist") from None
    spec = importlib.util.spec_from_file_location(module, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as err:
        del sys.modules[module]
        raise ConfigError(f"task {name!r}: loading {path} failed: {first_line(err)}") from None
    return mod


def task_module(name: Any) -> ModuleType:
    """The module that ``task.name`` names (see the module docstring); ConfigError in one line
    naming what was tried and why it failed."""
    name = resolve_task_name(name)
    if name.endswith(".py"):
        return _load_file(name)
    module = f"pipelines.{name}" if name.isidentifier() else name
    if not all(part.isidentifier() for part in module.split(".")):
        raise ConfigError(f"task {name!r} is neither a task name (gmm25), a module path "
                          f"(my_tasks.ring) nor a .py file")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and (module + ".").startswith(err.name + "."):
            missing = f"pipelines/{name}.py" if module != name else f"{err.name} on sys.path"
            raise ConfigError(f"unknown task {name!r}: no module {missing}") from None
        raise ConfigError(f"task {name!r}: importing {module} failed: {first_line(err)}") from None
    except Exception as err:
        raise ConfigError(f"task {name!r}: importing {module} failed: {first_line(err)}") from None


def task_config_model(name: Any) -> type[BaseModel]:
    """The task's ``Config``, checked to be a pydantic model with a ``name`` field."""
    mod = task_module(name)
    config, make = getattr(mod, "Config", None), getattr(mod, "make_task", None)
    where = f"task {name!r} ({mod.__file__})"
    if not (isinstance(config, type) and issubclass(config, BaseModel)) or not callable(make):
        raise ConfigError(f"{where} must define Config (a pydantic model) and make_task(config)")
    if "name" not in config.model_fields:
        raise ConfigError(f"{where}: Config has no 'name' field")
    return config


def make_task(config: BaseModel) -> Task:
    """The task of a validated task config, checked against the contract."""
    name = getattr(config, "name")
    task = task_module(name).make_task(config)
    if not isinstance(task, Task) or not isinstance(task.family, TransitionFamily):
        missing = ([m for m in _members(Task) if not hasattr(task, m)]
                   or [f"family.{m}" for m in _members(TransitionFamily)
                       if not hasattr(task.family, m)])
        raise ConfigError(f"task {name!r}: make_task returned a {type(task).__name__}, which is "
                          f"not a Task (missing: {', '.join(missing)})")
    return task


def task_runtime_env(name: str) -> dict[str, Any]:
    """The Ray runtime env that makes task ``name`` (as validated) importable on every node:
    its top-level package, or a copy of its file, as ``py_modules``; nothing for this
    project's own tasks."""
    if name.endswith(".py"):
        # the copy is named as the file's module is here: workers import the file under that
        # name, on any node, and unpickle its Config instances (a RunConfig sent to an actor)
        path = Path(resolve_task_name(name))
        copy = Path(tempfile.gettempdir()) / "rtb-ray-tasks" / f"{_module_name(path)}.py"
        atomic_write_bytes(copy, path.read_bytes())
        return {"py_modules": [str(copy)]}
    top = task_module(name).__name__.partition(".")[0]
    if top in OWN_PACKAGES:
        return {}
    # a package's folder(s): a namespace package may have several, and Ray ships each
    return {"py_modules": list(sys.modules[top].__path__)}
