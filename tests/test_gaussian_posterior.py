"""RTB against a posterior known in closed form, from on-policy, explored and backward data."""

from __future__ import annotations

import pytest
import torch

from rtb_ray.config import ObjectiveConfig, TrainConfig
from rtb_ray.learner import Learner
from rtb_ray.metrics import sum_log_probs
from rtb_ray.rollout import Sampler
from rtb_ray.trajectory import Source


def fit(task, source: str, steps: int = 400, objective: str = "rtb", seed: int = 0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = TrainConfig(steps=steps, batch_size=256, lr=3e-3, lr_log_z=0.05,
                      objective=ObjectiveConfig(kind=objective))
    learner = Learner(task.family, task.prior(), cfg, seed=seed)
    sampler = Sampler(task, learner.prior, learner.posterior)
    for _ in range(steps):
        if source == "on-policy":
            batch = sampler.rollout(Source.POSTERIOR, 256, generator=gen)
        elif source == "explored":
            batch = sampler.rollout(Source.EXPLORE, 256, explore=0.1, generator=gen)
        else:  # bridge-noised exact posterior samples: never sampled from the policy at all
            batch = sampler.rollout(Source.BACKWARD, 256,
                                    terminal=task.sample_posterior(256, gen), generator=gen)
        learner.step(batch)
    x = task.family.sample(learner.posterior, 20_000, generator=gen)[0][:, -1]
    return learner, x


@pytest.mark.parametrize("source", ["on-policy", "explored", "backward"])
def test_rtb_recovers_analytic_posterior_and_log_z(gaussian_task, source):
    learner, x = fit(gaussian_task, source)
    assert abs(learner.mean_log_z().item() - gaussian_task.log_z) < 0.05
    mean, var = x.mean().item(), x.var().item()
    assert abs(mean - gaussian_task.post_mean.item()) < 0.05 * abs(gaussian_task.post_mean.item())
    assert abs(var - gaussian_task.post_var) < 0.05 * gaussian_task.post_var


def test_vargrad_recovers_analytic_posterior(gaussian_task):
    learner, x = fit(gaussian_task, "on-policy", objective="vargrad")
    assert abs(learner.mean_log_z().item() - gaussian_task.log_z) < 0.05
    assert abs(x.var().item() - gaussian_task.post_var) < 0.05 * gaussian_task.post_var


def test_elbo_below_and_eubo_above_log_z_after_training(gaussian_task):
    learner, _ = fit(gaussian_task, "on-policy", steps=300)
    gen = torch.Generator().manual_seed(3)
    fam = gaussian_task.family
    states, log_post = fam.sample(learner.posterior, 20_000, generator=gen)
    lw = (gaussian_task.log_reward(states[:, -1])
          + sum_log_probs(fam, learner.prior, states) - log_post)
    exact = fam.backward_sample(gaussian_task.sample_posterior(20_000, gen), generator=gen)[0]
    lw_exact = (gaussian_task.log_reward(exact[:, -1]) + sum_log_probs(fam, learner.prior, exact)
                - sum_log_probs(fam, learner.posterior, exact))
    assert lw.mean() <= gaussian_task.log_z + 0.01
    assert lw_exact.mean() >= gaussian_task.log_z - 0.01
