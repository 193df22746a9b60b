"""Rollouts: turn a task and a policy into scored trajectory batches, from any source."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rtb_ray.metrics import sum_log_probs
from rtb_ray.tasks import Task, conditional
from rtb_ray.trajectory import Source, TrajectoryBatch


class Sampler:
    """Produces trajectories from the posterior (optionally explored), the prior, or backwards
    from given terminal states, and scores each once: Σ log p_prior and log r travel with it."""

    def __init__(self, task: Task, prior: nn.Module, posterior: nn.Module) -> None:
        self.task = task
        self.family = task.family
        self.prior = prior
        self.posterior = posterior

    @torch.no_grad()
    def rollout(
        self,
        source: Source,
        n: int,
        *,
        explore: float = 0.0,
        policy_version: int = -1,
        terminal: Tensor | None = None,
        cond: Tensor | None = None,
        generator: torch.Generator | None = None,
        group_size: int = 1,
    ) -> TrajectoryBatch:
        """``terminal`` (and its ``cond``) are the known x_T that backward rollouts start from.
        A conditional task's forward rollouts draw ``n / group_size`` conditions, each repeated
        ``group_size`` times in consecutive rows (a group), unless ``cond`` is given."""
        if cond is None and terminal is None and conditional(self.task):
            if n % group_size:
                raise ValueError(f"{n} rollouts are not whole groups of {group_size}")
            drawn = self.task.conditions(n // group_size, generator or torch.default_generator)
            device = next(self.posterior.parameters()).device
            cond = drawn.repeat_interleave(group_size, dim=0).to(device)
        if source in (Source.POSTERIOR, Source.EXPLORE):
            source = Source.EXPLORE if explore > 0 else Source.POSTERIOR
            states, log_behaviour = self.family.sample(
                self.posterior, n, cond=cond, explore=explore, generator=generator
            )
            log_prior = sum_log_probs(self.family, self.prior, states, cond)
        elif source == Source.PRIOR:
            # the prior sampled it: its behaviour log-prob *is* log p_prior
            states, log_prior = self.family.sample(self.prior, n, cond=cond, generator=generator)
            log_behaviour = log_prior
            policy_version = -1
        elif source in (Source.BACKWARD, Source.LOCAL_SEARCH, Source.DATASET):
            if terminal is None:
                raise ValueError("backward rollouts need terminal states")
            device = next(self.posterior.parameters()).device
            states, log_behaviour = self.family.backward_sample(
                terminal.to(device), generator=generator
            )
            log_prior = sum_log_probs(self.family, self.prior, states, cond)
            policy_version = -1
        else:
            raise ValueError(f"unknown source {source!r}")
        log_reward = self.task.log_reward(states[:, -1], cond)
        return TrajectoryBatch.make(
            states, log_reward, log_prior, log_behaviour, source, policy_version, cond
        )
