"""The task contract. A task is one module ``pipelines/<name>.py`` exporting ``Config`` (its
pydantic settings, with a ``name`` field) and ``make_task(config) -> Task``. Nothing else in the
system knows about a task's prior, reward or evaluation: code outside the task uses only the
members of ``Task`` and ``TransitionFamily``."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel
from torch import Tensor, nn

from rtb_ray.transitions import TransitionFamily


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

    def conditions(self, n: int) -> Tensor | None:
        """Conditioning for n rollouts, or None for an unconditional task."""
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


def _members(protocol: type) -> list[str]:
    """What a protocol declares (for error messages that say what is missing)."""
    return [*protocol.__annotations__,
            *(k for k, v in vars(protocol).items() if callable(v) and not k.startswith("_"))]


def _module(name: str) -> Any:
    if not name.isidentifier():
        raise ValueError(f"task name {name!r} is not a valid module name")
    try:
        return importlib.import_module(f"pipelines.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"pipelines.{name}":
            raise ValueError(f"unknown task {name!r}: no module pipelines/{name}.py") from None
        raise


def task_config_model(name: str) -> type[BaseModel]:
    return _module(name).Config


def make_task(config: BaseModel) -> Task:
    """The task of a validated task config, checked against the contract."""
    name = getattr(config, "name")
    task = _module(name).make_task(config)
    if not isinstance(task, Task) or not isinstance(task.family, TransitionFamily):
        missing = ([m for m in _members(Task) if not hasattr(task, m)]
                   or [f"family.{m}" for m in _members(TransitionFamily)
                       if not hasattr(task.family, m)])
        raise ValueError(f"task {name!r}: make_task returned a {type(task).__name__}, which is "
                         f"not a Task (missing: {', '.join(missing)})")
    return task
