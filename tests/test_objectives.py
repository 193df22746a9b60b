"""Objectives: exactness at the trivial reward, chunked and subsampled gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from rtb_ray.config import ObjectiveConfig, TrainConfig
from rtb_ray.learner import Learner
from rtb_ray.networks import TimeMLP
from rtb_ray.objectives import rtb_backward
from rtb_ray.rollout import Sampler
from rtb_ray.trajectory import Source
from rtb_ray.transitions import PinnedBrownian


class FlatReward:
    """r ≡ 1 on a random (non-trivial) prior: the posterior must be the prior, log Z = 0."""

    name = "flat"

    def __init__(self) -> None:
        self.family = PinnedBrownian(2, 16, 1.5, learn_variance=True)

    def prior(self) -> TimeMLP:
        torch.manual_seed(0)
        net = TimeMLP(2, 16, hidden=32, out_dim=4)
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.2)
        return net.requires_grad_(False)

    def log_reward(self, x, cond=None):
        return torch.zeros(x.shape[0])

    def conditions(self, n):
        return None


@pytest.mark.parametrize("kind", ["rtb", "vargrad"])
def test_flat_reward_gives_exactly_zero_loss_and_gradient_at_init(kind):
    task = FlatReward()
    learner = Learner(task.family, task.prior(), TrainConfig(objective=ObjectiveConfig(kind=kind)))
    sampler = Sampler(task, learner.prior, learner.posterior)
    batch = sampler.rollout(Source.EXPLORE, 128, explore=0.4)
    stats = rtb_backward(task.family, learner.posterior, learner.log_z, batch,
                         learner.cfg.objective)
    assert stats["loss"] == 0.0
    assert all(p.grad is None or torch.all(p.grad == 0) for p in learner.posterior.parameters())
    # and after an optimiser step the posterior is still the prior
    learner.step(batch)
    for a, b in zip(learner.posterior.parameters(), learner.prior.parameters()):
        assert torch.equal(a, b)
    assert learner.log_z.item() == 0.0


def _grads(task, cfg: ObjectiveConfig, batch, seed=0):
    learner = Learner(task.family, task.prior(), TrainConfig(objective=cfg))
    with torch.no_grad():  # move away from the prior so that δ ≠ 0
        for p in learner.posterior.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        learner.log_z.fill_(0.3)
    rtb_backward(task.family, learner.posterior, learner.log_z, batch, cfg,
                 torch.Generator().manual_seed(seed))
    return [p.grad.clone() for p in learner.posterior.parameters()] + [learner.log_z.grad.clone()]


@pytest.fixture
def reward_task():
    task = FlatReward()
    task.log_reward = lambda x, cond=None: -0.5 * (x - 1.0).square().sum(-1)
    return task


@pytest.mark.parametrize("kind,clip", [("rtb", None), ("rtb", 0.1), ("vargrad", None),
                                       ("kl_rl", None)])
def test_chunked_gradient_equals_full_gradient(reward_task, kind, clip):
    sampler = Sampler(reward_task, reward_task.prior(), reward_task.prior())
    batch = sampler.rollout(Source.EXPLORE, 64, explore=0.3,
                            generator=torch.Generator().manual_seed(0))
    full = _grads(reward_task, ObjectiveConfig(kind=kind, loss_clip=clip), batch)
    chunked = _grads(reward_task, ObjectiveConfig(kind=kind, loss_clip=clip, chunk_steps=5), batch)
    assert any(g.abs().sum() > 0 for g in full)
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_step_subsampling_is_unbiased(reward_task):
    sampler = Sampler(reward_task, reward_task.prior(), reward_task.prior())
    batch = sampler.rollout(Source.EXPLORE, 32, explore=0.3,
                            generator=torch.Generator().manual_seed(0))
    full = torch.cat([g.flatten() for g in _grads(reward_task, ObjectiveConfig(), batch)])
    runs = 400
    mean = sum(
        torch.cat([g.flatten() for g in
                   _grads(reward_task, ObjectiveConfig(subsample_steps=4), batch, seed=s)])
        for s in range(runs)) / runs
    one = torch.cat([g.flatten() for g in
                     _grads(reward_task, ObjectiveConfig(subsample_steps=4), batch, seed=0)])
    # a single subsampled gradient is noisy, the average of many is the full gradient
    assert (one - full).norm() > 0.05 * full.norm()
    assert (mean - full).norm() < 0.1 * full.norm()
    # the chunked path subsamples the same way
    chunked = torch.cat([g.flatten() for g in _grads(
        reward_task, ObjectiveConfig(subsample_steps=4, chunk_steps=2), batch, seed=0)])
    torch.testing.assert_close(chunked, one, atol=1e-5, rtol=1e-4)


def test_learner_state_round_trips(reward_task):
    learner = Learner(reward_task.family, reward_task.prior(), TrainConfig())
    sampler = Sampler(reward_task, learner.prior, learner.posterior)
    for _ in range(3):
        learner.step(sampler.rollout(Source.POSTERIOR, 16))
    state = copy.deepcopy(learner.state_dict())
    other = Learner(reward_task.family, reward_task.prior(), TrainConfig())
    other.load_state_dict(state)
    batch = sampler.rollout(Source.POSTERIOR, 16, generator=torch.Generator().manual_seed(5))
    a, b = learner.step(batch), other.step(batch)
    assert a["loss"] == b["loss"] and other.version == learner.version == 4
