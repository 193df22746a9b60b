"""DDIMGaussian: the steps diffusers draws, Gaussian densities that add up, image-shaped events,
and a backward process and pretraining loss that follow the re-spaced schedule."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch import Tensor, nn

from rtb_ray.transitions import DDIMGaussian

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (3, 4, 4)


def scheduler(**overrides: object) -> DDIMScheduler:
    return DDIMScheduler(**{"clip_sample": False, **overrides})


class FixedEps(nn.Module):
    """ε(x, t) = w·x + b(t): deterministic, depends on both inputs, records the timesteps."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3))
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor | int, cond: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *[1] * (x.dim() - 1))
        self.seen.append(t.flatten())
        return self.w * x + 0.001 * t


class GaussianEps(nn.Module):
    """The exact ε-predictor of data x_0 ~ N(0, diag(λ)) on a diffusers schedule."""

    def __init__(self, alphas_cumprod: Tensor, lam: Tensor) -> None:
        super().__init__()
        self.register_buffer("alphas", alphas_cumprod.float())
        self.register_buffer("lam", lam)
        self.dummy = nn.Parameter(torch.zeros(()))  # a device to read

    def forward(self, x: Tensor, t: Tensor | int, cond: Tensor | None = None) -> Tensor:
        a = self.alphas[torch.as_tensor(t)].reshape(-1, *[1] * (x.dim() - 1))
        return (1 - a).sqrt() * x / (a * self.lam + 1 - a)


@pytest.mark.parametrize("spacing,steps", [("leading", 50), ("trailing", 10), ("leading", 7)])
def test_each_step_is_what_diffusers_draws_with_eta_1(spacing, steps):
    sched = scheduler(timestep_spacing=spacing)
    fam = DDIMGaussian.from_scheduler(sched, steps, SHAPE, min_std=1e-3)
    net = FixedEps()
    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(0))
    for k, t in enumerate(sched.timesteps.tolist()):
        mean, var = fam.moments(net, x, k)
        eps = net(x, t)
        out = sched.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        std = sched._get_variance(t, t - sched.config.num_train_timesteps // steps).sqrt()
        torch.testing.assert_close(mean, out, rtol=1e-4, atol=1e-5)
        assert math.isclose(var.sqrt().item(), max(std.item(), 1e-3), rel_tol=1e-4)
    # the network read diffusion timesteps, not chain indices
    assert [int(s[0]) for s in net.seen[::2]] == sched.timesteps.tolist()


def test_states_keep_the_image_shape_and_log_probs_add_up():
    sched = scheduler()
    fam = DDIMGaussian.from_scheduler(sched, 12, SHAPE)
    net = GaussianEps(sched.alphas_cumprod, torch.rand(SHAPE, generator=torch.Generator()) + 0.1)
    gen = torch.Generator().manual_seed(1)
    states, log_behaviour = fam.sample(net, 6, generator=gen)
    assert states.shape == (6, 13, *SHAPE)
    per_step = fam.step_log_probs(net, states)
    assert per_step.shape == (6, 12)
    torch.testing.assert_close(per_step.sum(1), log_behaviour, rtol=1e-5, atol=1e-3)
    # a subset of steps is the same numbers
    steps = torch.tensor([0, 5, 11])
    torch.testing.assert_close(fam.step_log_probs(net, states, steps=steps), per_step[:, steps])
    # exploration widens the sampler: its own log-density, not the network's
    explored, log_explored = fam.sample(net, 6, explore=0.1, generator=gen)
    assert not torch.allclose(fam.step_log_probs(net, explored).sum(1), log_explored)


def test_backward_sample_is_the_respaced_noising_process():
    fam = DDIMGaussian.from_scheduler(scheduler(timestep_spacing="trailing"), 10, (2,))
    x0 = torch.tensor([[1.5, -0.5]]).expand(40_000, 2)
    states, log_q = fam.backward_sample(x0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(states[:, -1], x0)
    # x at chain step k is x_{t_k} ~ N(√ā_k·x_0, (1 − ā_k) I), ā_k = alphas_cumprod[t_k]
    for k in (0, 4, 9):
        a = fam.alpha_bar[k].item()
        torch.testing.assert_close(states[:, k].mean(0), math.sqrt(a) * x0[0], atol=0.02, rtol=0)
        torch.testing.assert_close(states[:, k].var(0), torch.full((2,), 1 - a), atol=0.02,
                                   rtol=0.03)
    # log q is the sum of the Gaussian noising steps' densities
    one = states[:3]
    expected = torch.zeros(3)
    for k in range(10):
        shrink, var = fam.backward_step(k)
        resid = one[:, k] - shrink * one[:, k + 1]
        expected += -0.5 * (resid.square().sum(-1) / var + 2 * math.log(2 * math.pi * var))
    torch.testing.assert_close(log_q[:3], expected, rtol=1e-5, atol=1e-4)


def test_the_exact_denoiser_reaches_the_eps_matching_minimum():
    """ε-matching draws x_t with the step's own ā and gives the network its timestep: the exact
    predictor's loss is the closed-form minimum Σ_i āλ_i / (āλ_i + 1 − ā), averaged over steps."""
    sched = scheduler()
    fam = DDIMGaussian.from_scheduler(sched, 20, (3,))
    lam = torch.tensor([0.05, 1.0, 4.0])
    net = GaussianEps(sched.alphas_cumprod, lam)
    gen = torch.Generator().manual_seed(3)
    x0 = lam.sqrt() * torch.randn(200_000, 3, generator=gen)
    loss = fam.pretrain_loss(net, x0, generator=gen).item()
    a = fam.alpha_bar.double()[:, None]
    minimum = (a * lam / (a * lam + 1 - a)).sum(1).mean().item()
    assert loss == pytest.approx(minimum, rel=0.02)
    # a predictor that reads the timestep 50 off (2.5 chain steps) is far from it
    late = GaussianEps(sched.alphas_cumprod.roll(50), lam)
    assert fam.pretrain_loss(late, x0, generator=torch.Generator().manual_seed(3)).item() > \
        minimum * 1.15


@pytest.mark.parametrize("overrides,message", [
    ({"clip_sample": True}, "clip_sample=True"),
    ({"thresholding": True}, "thresholding=True"),
    ({"prediction_type": "v_prediction"}, "prediction_type='v_prediction'"),
    ({"timestep_spacing": "linspace"}, "timestep_spacing='linspace'"),
])
def test_schedulers_whose_steps_are_not_this_family_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        DDIMGaussian.from_scheduler(scheduler(**overrides), 50, SHAPE)
