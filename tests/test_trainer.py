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


def test_terminal_pool_weights_posterior_rows_by_target_over_behaviour():
    # Two posterior rows whose sampler already put r^β into them (log q = log p_prior + β log r
    # − log Z): their importance weights are equal, so resampling must not favour the higher
    # reward again (∝ r^β would pick row 1 e² times as often as row 0).
    x = torch.tensor([[0.0], [1.0]])
    states = torch.stack([torch.zeros_like(x), x], 1)
    log_reward, log_prior = torch.tensor([0.0, 1.0]), torch.tensor([-3.0, -3.0])
    log_behaviour = log_prior + 2.0 * log_reward - 0.7
    batch = TrajectoryBatch.make(states, log_reward, log_prior, log_behaviour, Source.POSTERIOR)
    pool = TerminalPool(capacity=10, beta=2.0)
    pool.add(batch)
    draws = pool.sample(20_000, torch.Generator().manual_seed(0))
    assert abs((draws[:, 0] == 1.0).double().mean().item() - 0.5) < 0.02
