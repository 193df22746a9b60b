"""Where the learner's batches come from. Both runtimes run one algorithm: the roles insert into a
replay store and the learner samples ``training_mixture`` under its rate limiter; on Ray through
actors (actors/learner.py ``StoreBatches``), in process inline (``InlineBatches``)."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from rtb_ray.config import RunConfig
from rtb_ray.learner import Learner
from rtb_ray.replay import ReplayStore, SampleTimeout
from rtb_ray.roles import ROLES, RolloutContext, training_mixture
from rtb_ray.rollout import Sampler
from rtb_ray.trajectory import TrajectoryBatch


class BatchSource(Protocol):
    def next_batch(self, learner: Learner) -> TrajectoryBatch:
        """The next training batch (blocks until the store can give one)."""
        ...

    def after_step(self, learner: Learner) -> None:
        """The learner took a step (the Ray source publishes weights here)."""
        ...

    def row_extras(self) -> dict[str, float]:
        """Numbers for the next train row (store and rollout figures)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the source (on Ray: seals the store's rows first, so a
        checkpoint never refers to rows that are not on disk)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def store_settings(cfg: RunConfig) -> dict[str, Any]:
    """The ``ReplayStore`` keyword arguments of a run (``cfg.replay``), on both runtimes."""
    replay = cfg.replay
    return dict(capacity_trajectories=replay.capacity, segment_rows=replay.segment_rows,
                keep_bytes=replay.keep_bytes, keep_segments=replay.keep_segments,
                seal_every_s=replay.seal_every_s,
                seed=cfg.seeds.store, samples_per_insert=replay.samples_per_insert,
                error_buffer=replay.error_buffer or max(replay.min_size_to_sample,
                                                        2 * cfg.train.batch_size),
                min_size_to_sample=replay.min_size_to_sample, group_size=cfg.train.group_size)


class InlineBatches:
    """The roles called inline: whenever the store's rate limiter holds the learner back, the
    next role in turn (``runtime.workers`` turns each) inserts ``runtime.rollout_batch_size``
    trajectories. The rollouts use the learner's own posterior: always the newest weights."""

    def __init__(self, cfg: RunConfig, sampler: Sampler) -> None:
        self.cfg = cfg
        self.store = ReplayStore(**store_settings(cfg))  # memory only
        self.mixture = training_mixture(cfg)
        self.turns = [role for name, role in ROLES.items()
                      for _ in range(cfg.runtime.workers.get(name, 0))]
        self.turn = 0
        self.context = RolloutContext(
            sampler, cfg, torch.Generator().manual_seed(cfg.seeds.inline_rollouts),
            read_store=lambda n, rows: self.store.sample(n, sampler=rows, timeout=0,
                                                         rate_limited=False))

    def next_batch(self, learner: Learner) -> TrajectoryBatch:
        self.context.policy_version = learner.version
        while True:
            try:
                return self.store.sample(self.cfg.train.batch_size, sampler=self.mixture,
                                         timeout=0)
            except SampleTimeout:  # the rate limiter wants more rows first
                role = self.turns[self.turn % len(self.turns)]
                self.turn += 1
                batch = role.rollout(self.context, self.cfg.runtime.rollout_batch_size)
                self.store.insert(batch, worker=role.name, timeout=0).raise_for_status()

    def after_step(self, learner: Learner) -> None:
        pass

    def row_extras(self) -> dict[str, float]:
        stats = self.store.stats()
        return {"replay_size": float(stats["size"]),
                "replay_samples_per_insert": float(stats["samples_per_insert"])}

    def state_dict(self) -> dict[str, Any]:
        return {"rollout_rng": self.context.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the random stream goes on; the memory-only store refills, from the first
        turn (forward roles first: backward rollouts start from their rows)."""
        if "rollout_rng" in state:
            self.context.generator.set_state(state["rollout_rng"])
