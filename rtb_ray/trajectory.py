"""The one trajectory batch that samplers produce, the replay store keeps and the learner eats.

A row is one trajectory ``x_0 -> ... -> x_T``. Everything the RTB loss needs except the
posterior's own log-probabilities is computed once, when the trajectory is made, and travels
with it: the prior is frozen and the reward is a black box, so neither is ever re-evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum

import torch
from torch import Tensor

class Source(IntEnum):
    """Which process made a trajectory. Stored as a small int; names are the public form."""

    POSTERIOR = 0  # the posterior itself, no exploration
    EXPLORE = 1  # the posterior with inflated variance
    PRIOR = 2  # the frozen prior
    BACKWARD = 3  # a known x_T noised back to x_0 by the fixed noising process
    LOCAL_SEARCH = 4  # x_T improved by local search, then noised back

    @classmethod
    def parse(cls, name: str) -> "Source":
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(
                f"unknown source {name!r}; expected one of {[s.name.lower() for s in cls]}"
            ) from None


@dataclass
class TrajectoryBatch:
    """B trajectories. ``states`` is ``[B, T+1, *event]`` (float32, or int64 tokens)."""

    states: Tensor
    log_reward: Tensor  # [B]  log r(x_T), *without* the temperature beta
    log_prior: Tensor  # [B]  sum_t log p_prior(x_{t+1} | x_t)
    log_behaviour: Tensor  # [B]  sum_t log q(x_{t+1} | x_t) under the process that sampled it
    source: Tensor  # [B]  int8 codes of Source
    policy_version: Tensor  # [B]  int64, weights version that sampled it (-1: not a policy)
    cond: Tensor | None = None  # [B, *cond] conditioning (class label, prompt, RL state)
    extras: dict[str, Tensor] = field(default_factory=dict)  # not persisted

    def __post_init__(self) -> None:
        b = self.states.shape[0]
        for f in _COLUMNS[1:]:
            v = getattr(self, f)
            if v.shape != (b,):
                raise ValueError(f"TrajectoryBatch.{f} has shape {tuple(v.shape)}, expected ({b},)")
        if self.cond is not None and self.cond.shape[0] != b:
            raise ValueError(f"TrajectoryBatch.cond has {self.cond.shape[0]} rows, expected {b}")

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def num_steps(self) -> int:
        return self.states.shape[1] - 1

    @property
    def terminal(self) -> Tensor:
        return self.states[:, -1]

    @classmethod
    def make(
        cls,
        states: Tensor,
        log_reward: Tensor,
        log_prior: Tensor,
        log_behaviour: Tensor,
        source: Source,
        policy_version: int = -1,
        cond: Tensor | None = None,
    ) -> "TrajectoryBatch":
        """A batch from one source and one weights version (what every sampler produces)."""
        b, dev = states.shape[0], states.device
        return cls(
            states=states,
            log_reward=log_reward.float(),
            log_prior=log_prior.float(),
            log_behaviour=log_behaviour.float(),
            source=torch.full((b,), int(source), dtype=torch.int8, device=dev),
            policy_version=torch.full((b,), policy_version, dtype=torch.int64, device=dev),
            cond=cond,
        )

    def _map(self, fn) -> "TrajectoryBatch":
        """Apply ``fn`` to every tensor column (cond included); extras are dropped."""
        return replace(
            self,
            **{name: fn(getattr(self, name)) for name in _COLUMNS},
            cond=None if self.cond is None else fn(self.cond),
            extras={},
        )

    def index(self, idx: Tensor | slice) -> "TrajectoryBatch":
        return self._map(lambda t: t[idx])

    def to(self, device: torch.device | str) -> "TrajectoryBatch":
        return self._map(lambda t: t.to(device))

    @classmethod
    def cat(cls, batches: list["TrajectoryBatch"]) -> "TrajectoryBatch":
        if len(batches) == 1:
            return batches[0]
        conds = [b.cond for b in batches]
        if any(c is None for c in conds) and not all(c is None for c in conds):
            raise ValueError("cannot concatenate conditioned and unconditioned trajectories")
        return cls(
            **{name: torch.cat([getattr(b, name) for b in batches]) for name in _COLUMNS},
            cond=None if conds[0] is None else torch.cat(conds),  # type: ignore[arg-type]
        )


_COLUMNS = ("states", "log_reward", "log_prior", "log_behaviour", "source", "policy_version")
