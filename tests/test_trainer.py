"""Pieces of the in-process trainer: batch composition, the backward pool, the schedule."""

from __future__ import annotations

import torch

from rtb_ray.config import ExploreConfig
from rtb_ray.trainer import TerminalPool, source_counts
from rtb_ray.trajectory import Source, TrajectoryBatch


def test_source_counts_split_the_batch_exactly():
    counts = source_counts({"posterior": 0.5, "prior": 0.25, "backward": 0.25}, 255)
    assert sum(counts.values()) == 255
    assert counts[Source.POSTERIOR] in (127, 128) and counts[Source.PRIOR] in (63, 64)
    assert source_counts({"posterior": 1.0, "prior": 0.0}, 7) == {Source.POSTERIOR: 7}


def test_explore_schedule_anneals_then_holds():
    ex = ExploreConfig(start=0.4, end=0.1, anneal_fraction=0.5)
    assert ex.at(0.0) == 0.4 and abs(ex.at(0.25) - 0.25) < 1e-12
    assert abs(ex.at(0.5) - 0.1) < 1e-12 and abs(ex.at(0.9) - 0.1) < 1e-12


def test_terminal_pool_resamples_in_proportion_to_reward_and_skips_non_finite():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    states = torch.stack([torch.zeros_like(x), x], 1)
    log_reward = torch.tensor([0.0, 1.0, float("nan"), -float("inf")])
    batch = TrajectoryBatch.make(states, log_reward, torch.zeros(4), torch.zeros(4), Source.PRIOR)
    pool = TerminalPool(capacity=3)
    pool.add(batch)
    assert pool.x.shape[0] == 2  # non-finite rewards never enter
    draws = pool.sample(20_000, torch.Generator().manual_seed(0))
    share_one = (draws[:, 0] == 1.0).double().mean().item()
    assert abs(share_one - torch.e / (1 + torch.e)) < 0.02  # ∝ r: e¹ against e⁰, r = 0 never
    pool.add(batch)  # FIFO at capacity
    assert pool.x.shape[0] == 3
