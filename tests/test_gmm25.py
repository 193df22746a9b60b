"""The 25→9 task: reward, analytic target and the metrics that judge a posterior against it."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines import gmm25
from rtb_ray.config import ConfigError, load_config
from rtb_ray.metrics import importance_metrics, mode_weights, sliced_wasserstein, total_variation
from rtb_ray.pretrain import load_prior, save_prior
from rtb_ray.tasks import make_task


def exact_posterior(n: int, seed: int = 0) -> torch.Tensor:
    return gmm25.mixture_sample(n, gmm25.CENTERS_9, gmm25.WEIGHTS_9,
                                torch.Generator().manual_seed(seed))


def test_reward_is_log_p9_over_p25_with_the_reference_expectation():
    x = exact_posterior(400_000)
    mean_log_reward = gmm25.log_reward(x).mean().item()
    assert abs(mean_log_reward - gmm25.EXACT_MEAN_LOG_REWARD) < 0.005
    assert abs(mean_log_reward - 1.149) < 0.01  # RTB.md's reference figure
    # the exact prior's normaliser: E_{p25}[r] = 1
    uniform = torch.full((25,), 1 / 25)
    prior = gmm25.mixture_sample(400_000, gmm25.CENTERS_25, uniform, torch.Generator())
    assert abs(gmm25.log_reward(prior).exp().mean().item() - 1.0) < 0.01


def test_analytic_weights_cover_nine_modes_and_sum_to_one():
    w = gmm25.ANALYTIC_WEIGHTS
    assert (w > 0).sum() == 9 and abs(w.sum().item() - 1.0) < 1e-6
    # the mode the peer drops, (−5, −10), holds 10/61 of the mass
    idx = int((gmm25.CENTERS_25 - torch.tensor([-5.0, -10.0])).norm(dim=1).argmin())
    assert abs(w[idx].item() - 10 / 61) < 1e-6


def test_mode_metrics_of_exact_samples_are_at_their_floor():
    x = exact_posterior(50_000)
    w = mode_weights(x, gmm25.CENTERS_25)
    assert total_variation(w, gmm25.ANALYTIC_WEIGHTS) < 0.01
    wrong = gmm25.mixture_sample(50_000, gmm25.CENTERS_25, torch.full((25,), 1 / 25),
                                 torch.Generator().manual_seed(1))
    assert total_variation(mode_weights(wrong, gmm25.CENTERS_25), gmm25.ANALYTIC_WEIGHTS) > 0.5
    other = exact_posterior(50_000, seed=2)
    assert sliced_wasserstein(x, other) < 0.1 * sliced_wasserstein(x, wrong)


def test_importance_metrics_of_exact_weights():
    lw = torch.zeros(1000)  # a perfect sampler: all log-weights equal log Z = 0
    m = importance_metrics(lw)
    assert m["elbo"] == 0 and abs(m["iw_log_z"]) < 1e-12 and abs(m["ess_fraction"] - 1) < 1e-9
    m = importance_metrics(torch.tensor([0.0, -math.inf]))
    assert m["ess_fraction"] == 0.5


def test_prior_checkpoint_is_refused_for_another_task_or_spec(tmp_path, cache_dir):
    cfg = load_config(gmm25_config_path(), ["task.num_steps=10", "task.hidden=8"])
    task = make_task(cfg.task)
    path = tmp_path / "prior.pt"
    save_prior(path, "gmm25", cfg.task.spec(), task.new_network(), {})
    load_prior(path, "gmm25", cfg.task.spec())
    with pytest.raises(ValueError, match="prior for task 'gmm25', not 'digits'"):
        load_prior(path, "digits", cfg.task.spec())
    with pytest.raises(ValueError, match="other settings"):
        load_prior(path, "gmm25", {**cfg.task.spec(), "hidden": 9})


def test_task_section_is_validated_by_the_task(cache_dir):
    with pytest.raises(ConfigError, match=r"task.hiden: unknown key"):
        load_config(gmm25_config_path(), ["task.hiden=3"])
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        load_config(gmm25_config_path(), ["task.name=nope"])


def gmm25_config_path():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "pipelines" / "configs" / "gmm25.yaml"
