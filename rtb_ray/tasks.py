"""The task contract. A task is one module ``pipelines/<name>.py`` exporting ``Config`` (its
pydantic settings, with a ``name`` field) and ``make_task(config) -> Task``. Nothing else in the
system knows about a task's prior, reward or evaluation."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel
from torch import Tensor, nn

from rtb_ray.transitions import TransitionFamily


class Task(Protocol):
    name: str
    family: TransitionFamily

    def prior(self) -> nn.Module:
        """The frozen prior network (loaded from its checkpoint, pretrained when missing)."""
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
    return _module(config.name).make_task(config)  # type: ignore[attr-defined]
