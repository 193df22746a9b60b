"""The Gaussian transition family: batched log-probs, sampling and backward (bridge) noising."""

from __future__ import annotations

import math

import pytest
import torch

from rtb_ray.networks import TimeMLP
from rtb_ray.transitions import PinnedBrownian, _normal_log_prob


def random_net(family: PinnedBrownian, seed: int = 0) -> TimeMLP:
    torch.manual_seed(seed)
    net = TimeMLP(family.dim, family.num_steps, hidden=32, out_dim=family.net_out_dim)
    for p in net.parameters():  # leave the zero init: make the drift and variance non-trivial
        torch.nn.init.normal_(p, std=0.1)
    return net


@pytest.mark.parametrize("learn_variance", [False, True])
def test_batched_log_probs_equal_step_by_step(learn_variance):
    family = PinnedBrownian(dim=3, num_steps=20, sigma=1.7, learn_variance=learn_variance)
    net = random_net(family)
    states, _ = family.sample(net, 64, explore=0.3, generator=torch.Generator().manual_seed(1))
    batched = family.step_log_probs(net, states)
    sequential = torch.stack(
        [family.step_log_probs(net, states, steps=torch.tensor([t]))[:, 0]
         for t in range(family.num_steps)], dim=1)
    # and from first principles, one transition at a time
    manual = []
    for t in range(family.num_steps):
        mean, var = family.moments(net, states[:, t], t)
        manual.append(_normal_log_prob(states[:, t + 1], mean, var))
    assert batched.shape == (64, 20)
    torch.testing.assert_close(batched, sequential, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched, torch.stack(manual, 1), atol=1e-5, rtol=1e-5)


def test_sample_log_behaviour_matches_recomputed_log_probs():
    family = PinnedBrownian(dim=2, num_steps=10, sigma=2.0, learn_variance=True)
    net = random_net(family)
    states, log_behaviour = family.sample(net, 128)
    torch.testing.assert_close(log_behaviour, family.step_log_probs(net, states).sum(1),
                               atol=1e-4, rtol=1e-5)
    assert torch.all(states[:, 0] == 0)


def test_exploration_only_widens_the_sampling_process():
    family = PinnedBrownian(dim=2, num_steps=10, sigma=1.0)
    net = random_net(family)
    gen = torch.Generator().manual_seed(0)
    states, log_behaviour = family.sample(net, 20_000, explore=0.5, generator=gen)
    # terminal variance of a zero-ish-drift walk grows by T·explore²; behaviour density is the
    # explored one, which differs from the policy's own density of the same path
    on_policy = family.step_log_probs(net, states).sum(1)
    assert not torch.allclose(log_behaviour, on_policy)
    plain, _ = family.sample(net, 20_000, generator=gen)
    assert states[:, -1].var() > plain[:, -1].var() + 0.5 * family.num_steps * 0.25


def test_backward_bridge_has_brownian_bridge_marginals():
    family = PinnedBrownian(dim=1, num_steps=50, sigma=2.0)
    x = torch.full((40_000, 1), 3.0)
    states, log_q = family.backward_sample(x, generator=torch.Generator().manual_seed(0))
    assert torch.all(states[:, -1] == 3.0) and torch.all(states[:, 0] == 0.0)
    assert torch.isfinite(log_q).all()
    t = 20 / 50  # bridge from 0 to x: mean t·x, variance σ² t (1 − t)
    assert abs(states[:, 20].mean().item() - t * 3.0) < 0.03
    assert abs(states[:, 20].var().item() - 4.0 * t * (1 - t)) < 0.03


def test_step_log_probs_rejects_nothing_silently_on_bad_shapes():
    family = PinnedBrownian(dim=2, num_steps=5, sigma=1.0)
    net = random_net(family)
    with pytest.raises(RuntimeError):
        family.step_log_probs(net, torch.zeros(4, 6, 3))  # event dim 3, family dim 2


def test_zero_initialised_network_is_the_plain_brownian_motion():
    family = PinnedBrownian(dim=2, num_steps=10, sigma=1.5, learn_variance=True)
    net = TimeMLP(2, 10, hidden=16, out_dim=family.net_out_dim)
    states = torch.randn(8, 11, 2)
    expected = torch.stack([_normal_log_prob(states[:, k + 1], states[:, k], family.step_var)
                            for k in range(10)], 1)
    torch.testing.assert_close(family.step_log_probs(net, states), expected)
    assert math.isclose(family.step_var, 1.5**2 / 10)
