"""log Z, or log Z(y) for a conditional task: the learner's second trainable part.

Every kind is a module ``log_z(cond, n) -> [n]``: one value per trajectory, so the objectives
read it the same way whether the normaliser is one number or a function of the condition.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rtb_ray.config import ConfigError, LogZConfig


class ScalarLogZ(nn.Module):
    """One number for every trajectory (an unconditional task, or a conditional one whose
    conditions all share the normaliser)."""

    def __init__(self) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(()))

    def forward(self, cond: Tensor | None, n: int) -> Tensor:
        return self.value.expand(n)


class TableLogZ(nn.Module):
    """One number per condition id: ``cond`` holds integer ids ``0..num_conditions-1``."""

    def __init__(self, num_conditions: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(num_conditions))

    def forward(self, cond: Tensor | None, n: int) -> Tensor:
        if cond is None or cond.is_floating_point() or cond[0].numel() != 1:
            got = "none" if cond is None else f"{cond.dtype} {tuple(cond.shape)}"
            raise ValueError(f"train.log_z.kind: a table needs one integer condition id per row "
                             f"(got {got})")
        ids = cond.reshape(n)
        bad = ids[(ids < 0) | (ids >= self.table.shape[0])]
        if bad.numel():  # torch would index out of bounds (on a GPU: a device assert)
            raise ValueError(f"condition id {int(bad[0])} is outside 0..num_conditions-1 "
                             f"(train.log_z.num_conditions = {self.table.shape[0]})")
        return self.table[ids]


class MLPLogZ(nn.Module):
    """An MLP of the (flattened, float) condition. The last layer starts at zero: log Z(y) = 0."""

    def __init__(self, cond_dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = cond_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        last = nn.Linear(width, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, cond: Tensor | None, n: int) -> Tensor:
        if cond is None:
            raise ValueError("train.log_z.kind: mlp needs a condition per row (got none)")
        return self.net(cond.reshape(n, -1).float()).squeeze(1)


def make_log_z(cfg: LogZConfig, example_cond: Tensor | None) -> nn.Module:
    """The log Z module of ``train.log_z`` for a task whose conditions look like
    ``example_cond [m, *cond]`` (None: an unconditional task)."""
    if cfg.kind == "scalar":
        return ScalarLogZ()
    if example_cond is None:
        raise ConfigError(f"train.log_z.kind: {cfg.kind} is a function of the condition; this "
                          f"task is unconditional (use scalar)")
    if cfg.kind == "table":
        assert cfg.num_conditions is not None  # LogZConfig checks it
        module = TableLogZ(cfg.num_conditions)
        try:
            module(example_cond, example_cond.shape[0])
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return module
    return MLPLogZ(example_cond[0].numel(), cfg.hidden, cfg.depth)


def check_log_z_kind(learner_state: dict, kind: str) -> None:
    """ValueError in one line unless a learner checkpoint holds a log Z of ``kind`` (one from
    before ``train.log_z``, a bare tensor, is a scalar)."""
    theirs = learner_state.get("log_z_kind", "scalar")
    if theirs != kind:
        raise ValueError(f"the checkpoint's log Z kind is {theirs}; train.log_z.kind is {kind} "
                         f"(resume with the kind it was trained with)")
