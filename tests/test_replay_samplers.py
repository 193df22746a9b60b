"""Samplers: the empirical frequencies match the intended weights (χ² tests), quotas hold,
and a seed fixes every draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from rtb_ray.replay import Mixture, Prioritised, Recency, ReplayStore, Uniform
from rtb_ray.replay.samplers import split_by_quota
from rtb_ray.trajectory import Source, TrajectoryBatch


def batch(log_reward: torch.Tensor, source: Source = Source.PRIOR) -> TrajectoryBatch:
    b = len(log_reward)
    return TrajectoryBatch.make(torch.zeros(b, 3, 1), log_reward, torch.zeros(b), torch.zeros(b),
                                source)


def draw_counts(store: ReplayStore, sampler, draws: int, first_id: int, n: int) -> np.ndarray:
    ids = np.concatenate([store.sample(5000, sampler=sampler, timeout=5).extras["id"].numpy()
                          for _ in range(draws // 5000)])
    return np.bincount(ids - first_id, minlength=n)


def test_prioritised_frequencies_match_rank_weights() -> None:
    n, k = 300, 0.05
    rng = np.random.default_rng(1)
    # fill past capacity, sampling in between, so the rank index sees merges and evictions
    store = ReplayStore(capacity_trajectories=n, seed=3)
    rewards = rng.permutation(1000).astype(np.float32) / 10  # distinct, in random order
    for part in np.split(rewards, 10):
        store.insert(batch(torch.from_numpy(part)))
        store.sample(10, sampler=Prioritised(k))
    held = rewards[-n:]  # ids 700..999
    rank = np.argsort(np.argsort(-held))  # 0 = highest log_reward
    observed = draw_counts(store, Prioritised(k), 200_000, 1000 - n, n)
    expected = Prioritised(k).weights(n)[rank] * observed.sum()
    assert chisquare(observed, expected).pvalue > 1e-3
    # the test has power: uniform or reversed ranks are rejected outright
    assert chisquare(observed, np.full(n, observed.sum() / n)).pvalue < 1e-12
    reversed_rank = n - 1 - rank
    assert chisquare(observed, Prioritised(k).weights(n)[reversed_rank]
                     * observed.sum()).pvalue < 1e-12


def test_recency_frequencies_match_half_life() -> None:
    n, half_life = 200, 40.0
    store = ReplayStore(capacity_trajectories=n, seed=5)
    for part in torch.zeros(250).split(50):
        assert store.insert(batch(part)).ok  # ids 50..249 held
    observed = draw_counts(store, Recency(half_life), 100_000, 50, n)
    age = n - 1 - np.arange(n)
    weights = 0.5 ** (age / half_life)
    expected = weights / weights.sum() * observed.sum()
    assert chisquare(observed, expected).pvalue > 1e-3
    assert chisquare(observed, np.full(n, observed.sum() / n)).pvalue < 1e-12


def test_uniform_frequencies_are_flat() -> None:
    store = ReplayStore(capacity_trajectories=100, seed=6)
    store.insert(batch(torch.arange(100.0)))
    observed = draw_counts(store, Uniform(), 50_000, 0, 100)
    assert chisquare(observed).pvalue > 1e-3


def mixed_store(seed: int = 0, backward: int = 100) -> ReplayStore:
    store = ReplayStore(capacity_trajectories=10_000, seed=seed)
    store.insert(batch(torch.zeros(600), Source.POSTERIOR))
    store.insert(batch(torch.ones(300), Source.PRIOR))
    store.insert(batch(torch.full((200,), 2.0), Source.EXPLORE))
    if backward:
        store.insert(batch(torch.full((backward,), 3.0), Source.BACKWARD))
    return store


def source_counts(b: TrajectoryBatch) -> dict[str, int]:
    codes = np.bincount(b.source.numpy(), minlength=len(Source))
    return {s.name.lower(): int(codes[s]) for s in Source if codes[s]}


def test_mixture_quotas_hold() -> None:
    store = mixed_store()
    quotas = {"posterior": 0.5, "prior": 0.25, "backward": 0.25}
    got = source_counts(store.sample(512, sampler=Mixture(quotas)))
    assert got == {"posterior": 256, "prior": 128, "backward": 128}
    # not a multiple: largest remainder, never off by more than one row
    got = source_counts(store.sample(101, sampler=Mixture(quotas)))
    assert sum(got.values()) == 101
    for name, share in quotas.items():
        assert abs(got[name] - 101 * share) < 1
    # pooled sources, and a prioritised draw inside each source
    pooled = Mixture({"posterior|explore": 0.8, "prior": 0.2}, inner=Prioritised(0.01))
    b = store.sample(1000, sampler=pooled)
    got = source_counts(b)
    assert got["posterior"] + got["explore"] == 800 and got["prior"] == 200
    assert got["explore"] > got["posterior"]  # explore rows have the higher log_reward
    # the batch is shuffled, not grouped by source
    assert len(np.flatnonzero(np.diff(b.source.numpy()))) > 100


def test_mixture_gives_an_absent_source_quota_to_the_others() -> None:
    store = mixed_store(backward=0)
    got = source_counts(store.sample(600, sampler=Mixture(
        {"posterior": 0.5, "prior": 0.25, "backward": 0.25})))
    assert got == {"posterior": 400, "prior": 200}
    with pytest.raises(ValueError, match="no stored rows"):
        store.sample(10, sampler=Mixture({"local_search": 1.0}))
    with pytest.raises(ValueError, match="unknown source 'teleport'"):
        Mixture({"teleport": 1.0})


def test_split_by_quota() -> None:
    assert split_by_quota(10, [1, 1, 1]) == [4, 3, 3]
    assert split_by_quota(7, [0.5, 0.5, 0.0]) == [4, 3, 0]
    assert sum(split_by_quota(513, [0.3, 0.3, 0.4])) == 513


@pytest.mark.parametrize("sampler", [
    Uniform(), Prioritised(0.1), Recency(50.0),
    Mixture({"posterior": 0.5, "prior": 0.25, "backward": 0.25}),
])
def test_sampling_is_deterministic_under_a_seed(sampler) -> None:
    def ids(seed: int) -> list[list[int]]:
        store = mixed_store(seed)
        store.insert(batch(torch.linspace(-1, 1, 100), Source.BACKWARD))
        return [store.sample(64, sampler=sampler).extras["id"].tolist() for _ in range(3)]

    assert ids(7) == ids(7)
    assert ids(7) != ids(8)


def test_samplers_reject_bad_parameters() -> None:
    for make in (lambda: Prioritised(0.0), lambda: Recency(-1.0),
                 lambda: Mixture({"prior": -0.5}), lambda: Mixture({"prior": 0.0})):
        with pytest.raises(ValueError):
            make()
