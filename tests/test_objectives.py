"""Objectives: exactness at the trivial reward, chunked and subsampled gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from rtb_ray.config import ConfigError, LogZConfig, ObjectiveConfig, TrainConfig
from rtb_ray.learner import Learner
from rtb_ray.log_z import make_log_z
from rtb_ray.networks import TimeMLP
from rtb_ray.objectives import centred, rtb_backward, trajectory_loss
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
    assert learner.mean_log_z().item() == 0.0


def _grads(task, cfg: ObjectiveConfig, batch, seed=0):
    learner = Learner(task.family, task.prior(), TrainConfig(objective=cfg))
    with torch.no_grad():  # move away from the prior so that δ ≠ 0
        for p in learner.posterior.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        learner.log_z.value.fill_(0.3)
    rtb_backward(task.family, learner.posterior, learner.log_z, batch, cfg,
                 torch.Generator().manual_seed(seed))
    return ([p.grad.clone() for p in learner.posterior.parameters()]
            + [learner.log_z.value.grad.clone()])


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


class FlatConditionalReward(FlatReward):
    """r ≡ 1 with a condition id the prior reads: the posterior is the prior for every y and
    log Z(y) = 0."""

    name = "flat_cond"

    def prior(self) -> TimeMLP:
        torch.manual_seed(0)
        net = TimeMLP(2, 16, hidden=32, out_dim=4, cond_dim=1)
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.2)
        return net.requires_grad_(False)

    def conditions(self, n, generator):
        return torch.randint(0, 4, (n, 1), generator=generator).float()

    def eval_conditions(self):
        return torch.arange(4.0)[:, None]


@pytest.mark.parametrize("kind,log_z", [("rtb", "mlp"), ("vargrad", "mlp"), ("kl_rl", "scalar")])
def test_flat_reward_on_a_conditional_task_gives_zero_loss_and_gradient(kind, log_z):
    task = FlatConditionalReward()
    cfg = TrainConfig(objective=ObjectiveConfig(kind=kind), log_z=LogZConfig(kind=log_z),
                      group_size=8)
    learner = Learner(task.family, task.prior(), cfg, eval_conditions=task.eval_conditions())
    batch = Sampler(task, learner.prior, learner.posterior).rollout(
        Source.EXPLORE, 64, explore=0.4, generator=torch.Generator().manual_seed(0), group_size=8)
    assert batch.cond is not None and torch.equal(batch.cond[:8], batch.cond[:1].expand(8, 1))
    stats = rtb_backward(task.family, learner.posterior, learner.log_z, batch, cfg.objective,
                         group_size=8)
    assert stats["loss"] == 0.0
    for p in [*learner.posterior.parameters(), *learner.log_z.parameters()]:
        assert p.grad is None or torch.all(p.grad == 0)


def test_vargrad_centres_within_groups_not_across_them():
    d = torch.tensor([1.0, 3.0, 10.0, 14.0])  # two groups of 2, far apart
    assert torch.equal(centred(d, 2), torch.tensor([-1.0, 1.0, -2.0, 2.0]))
    assert torch.equal(centred(d, 1), d - d.mean())
    log_z = torch.zeros(4)
    loss, _ = trajectory_loss(d, torch.zeros(4), torch.zeros(4), log_z,
                              ObjectiveConfig(kind="vargrad"), group_size=2)
    fit_log_z = d.square().mean()  # log Z is fitted to −d on its own
    torch.testing.assert_close(loss, torch.tensor(2.5) + fit_log_z)
    with pytest.raises(ValueError, match="train.group_size=3"):
        trajectory_loss(d, torch.zeros(4), torch.zeros(4), log_z, ObjectiveConfig(kind="vargrad"),
                        group_size=3)


def test_kl_weight_interpolates_kl_rl_from_the_posterior_objective_to_ddpo():
    """The gradient of kl_rl's loss with respect to S_b is −(A_b − mean A)/B: γ = 1 is the
    KL-regularised advantage, γ = 0.5 halves the log-ratio's share (DPOK), γ = 0 is the reward
    alone divided by its group's std (DDPO)."""
    log_prior = torch.tensor([0.0, 0.5, -1.0, 2.0])
    beta_log_reward = torch.tensor([1.0, 2.0, 4.0, 0.0])
    log_post_values = torch.tensor([0.3, 0.1, -0.2, 1.0])

    def grad(kl_weight: float, group_size: int) -> torch.Tensor:
        log_post = log_post_values.clone().requires_grad_()
        loss, _ = trajectory_loss(log_post, log_prior, beta_log_reward, torch.zeros(4),
                                  ObjectiveConfig(kind="kl_rl", kl_weight=kl_weight), group_size)
        loss.backward()
        return log_post.grad

    ratio = log_post_values - log_prior
    for gamma in (1.0, 0.5):
        advantage = beta_log_reward - gamma * ratio
        torch.testing.assert_close(grad(gamma, 2), -centred(advantage, 2) / 4)
    per_group = centred(beta_log_reward, 2).view(2, 2)
    ddpo = (per_group / per_group.std(1, keepdim=True)).view(-1)
    torch.testing.assert_close(grad(0.0, 2), -ddpo / 4)
    whole = centred(beta_log_reward, 1)
    torch.testing.assert_close(grad(0.0, 1), -(whole / whole.std()) / 4)
    with pytest.raises(ValueError, match="kl_weight: applies to kind kl_rl only"):
        ObjectiveConfig(kind="rtb", kl_weight=0.0)


def test_log_z_modules_and_checkpoints(reward_task):
    ids = torch.tensor([[0], [2], [1]])
    table = make_log_z(LogZConfig(kind="table", num_conditions=3), ids)
    with torch.no_grad():
        table.table.copy_(torch.tensor([0.5, 1.0, 2.0]))
    assert table(ids, 3).tolist() == [0.5, 2.0, 1.0]
    with pytest.raises(ValueError, match="train.log_z.num_conditions = 3"):
        table(torch.tensor([[3]]), 1)
    with pytest.raises(ConfigError, match="num_conditions"):
        make_log_z(LogZConfig(kind="table", num_conditions=2), ids)
    with pytest.raises(ConfigError, match="this task is unconditional"):
        make_log_z(LogZConfig(kind="mlp"), None)
    mlp = make_log_z(LogZConfig(kind="mlp"), torch.randn(5, 3))
    assert torch.equal(mlp(torch.randn(7, 3), 7), torch.zeros(7))  # starts at log Z(y) = 0
    # a checkpoint from before train.log_z (one tensor, no kind) resumes a scalar learner...
    learner = Learner(reward_task.family, reward_task.prior(), TrainConfig())
    old = learner.state_dict()
    old["log_z"], _ = torch.tensor(1.25), old.pop("log_z_kind")
    learner.load_state_dict(old)
    assert learner.mean_log_z().item() == 1.25
    # ...and a checkpoint of another kind is refused in one line
    table_learner = Learner(reward_task.family, reward_task.prior(),
                            TrainConfig(log_z=LogZConfig(kind="table", num_conditions=3)),
                            eval_conditions=ids)
    with pytest.raises(ValueError, match="the checkpoint's log Z kind is scalar; train.log_z.kind"):
        table_learner.load_state_dict(old)
