"""Conditional prior pretraining: the cond reaches the network, and cond_drop (classifier-free-
guidance training) teaches one network both the conditional and the unconditional law."""

from __future__ import annotations


import pytest
import torch
from torch import Tensor, nn

from rtb_ray.networks import TimeMLP
from rtb_ray.pretrain import pretrain_prior
from rtb_ray.transitions import DDPMGaussian, PinnedBrownian

MODES = 2.0  # the data: x ~ N(y, 0.1²) with y = ±MODES, y given as the cond


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def two_modes(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    y = (torch.randint(0, 2, (n, 1), generator=generator) * 2 - 1).float() * MODES
    return y + 0.1 * torch.randn(n, 1, generator=generator), y


def pretrained(cond_drop: float) -> tuple[PinnedBrownian, TimeMLP]:
    family = PinnedBrownian(dim=1, num_steps=20, sigma=1.0)
    torch.manual_seed(0)
    net = TimeMLP(1, 20, hidden=64, depth=2, time_features=16, cond_dim=1)
    pretrain_prior(family, net, two_modes, steps=800, batch_size=256, lr=3e-3, progress=False,
                   cond_drop=cond_drop, null_cond=torch.zeros(1) if cond_drop else None)
    return family, net


def terminal(family: PinnedBrownian, net: TimeMLP, cond: float, n: int = 4000) -> Tensor:
    states, _ = family.sample(net, n, cond=torch.full((n, 1), cond),
                              generator=torch.Generator().manual_seed(1))
    return states[:, -1, 0]


def near(x: Tensor, mode: float) -> float:
    return ((x - mode).abs() < 0.5).float().mean().item()


# Tolerance on a mode's mean: 0.2. The chain's last step alone adds noise of std σ·√dt ≈ 0.22,
# so samples spread ~0.23–0.32 and 4000 of them pin the mean to ±0.005; what is left is the
# short training's bias (seen: ≤ 0.08 over seeds). A cond the network ignored would put the
# mean at 0, a swapped one at ∓2: 10–20 tolerances away.


def test_conditional_pretraining_ends_in_the_conditions_mode():
    family, net = pretrained(cond_drop=0.0)
    for y in (MODES, -MODES):
        x = terminal(family, net, y)
        assert abs(x.mean().item() - y) < 0.2, (y, x.mean())
        assert near(x, y) > 0.8 and near(x, -y) == 0.0, (y, near(x, y), near(x, -y))


def test_cond_drop_teaches_the_null_cond_the_mixture():
    family, net = pretrained(cond_drop=0.5)
    unconditional = terminal(family, net, 0.0)  # the null cond (zeros)
    # bimodal: about half the mass at each mode (seen 0.44–0.46 each), little in between
    assert near(unconditional, MODES) > 0.3 and near(unconditional, -MODES) > 0.3
    assert near(unconditional, MODES) + near(unconditional, -MODES) > 0.8
    for y in (MODES, -MODES):  # and the conditions still pick their mode
        x = terminal(family, net, y)
        assert abs(x.mean().item() - y) < 0.2, (y, x.mean())
        assert near(x, y) > 0.8 and near(x, -y) == 0.0


class _RecordingFamily:
    """Records the cond each pretraining step hands the family (its loss: a trivial one)."""

    def __init__(self) -> None:
        self.conds: list[Tensor | None] = []

    def pretrain_loss(self, net: nn.Module, x: Tensor, generator: torch.Generator | None = None,
                      first_steps: int | None = None, cond: Tensor | None = None) -> Tensor:
        self.conds.append(cond)
        return sum(p.square().sum() for p in net.parameters())


def test_cond_drop_replaces_rows_by_the_null_cond_with_its_probability():
    cond = torch.arange(1, 2001, dtype=torch.float32)[:, None].repeat(1, 3)
    null = torch.tensor([-1.0, -2.0, -3.0])
    family, net = _RecordingFamily(), nn.Linear(1, 1)
    pretrain_prior(family, net, lambda n, g: (torch.zeros(n, 1), cond), steps=3, batch_size=2000,
                   lr=1e-3, progress=False, cond_drop=0.3, null_cond=null)
    for seen in family.conds:
        dropped = (seen == null).all(1)
        assert torch.equal(seen[~dropped], cond[~dropped])  # the others are untouched
        assert abs(dropped.float().mean().item() - 0.3) < 0.05  # 2000 rows: std 0.01
    assert not torch.equal(family.conds[0], family.conds[1])  # a fresh draw every step
    # without cond_drop the cond passes through as sampled
    family = _RecordingFamily()
    pretrain_prior(family, net, lambda n, g: (torch.zeros(n, 1), cond), steps=1, batch_size=2000,
                   lr=1e-3, progress=False)
    assert torch.equal(family.conds[0], cond)


def test_cond_drop_needs_a_null_cond_and_conditions():
    family = PinnedBrownian(dim=1, num_steps=5, sigma=1.0)
    net = TimeMLP(1, 5, hidden=8, cond_dim=1)
    with pytest.raises(ValueError, match="cond_drop"):
        pretrain_prior(family, net, two_modes, steps=1, batch_size=4, lr=1e-3, progress=False,
                       cond_drop=0.5)
    unconditional = lambda n, g: two_modes(n, g)[0]  # noqa: E731
    with pytest.raises(ValueError, match="cond_drop"):
        pretrain_prior(family, net, unconditional, steps=1, batch_size=4, lr=1e-3,
                       progress=False, cond_drop=0.5, null_cond=torch.zeros(1))


@pytest.mark.parametrize("family", [PinnedBrownian(dim=2, num_steps=6, sigma=1.0),
                                    DDPMGaussian(dim=2, num_steps=6),
                                    DDPMGaussian(dim=2, num_steps=6, learn_variance=True)],
                         ids=["pinned", "ddpm", "ddpm-learn-variance"])
def test_every_family_hands_pretraining_cond_to_the_network(family):
    net = TimeMLP(2, 6, hidden=8, out_dim=family.net_out_dim, cond_dim=3)
    for p in net.parameters():  # past the zero last layer, so gradients reach the cond input
        nn.init.normal_(p, std=0.3)
    x, cond = torch.randn(16, 2), torch.randn(16, 3)
    loss = family.pretrain_loss(net, x, torch.Generator().manual_seed(0), cond=cond)
    loss.backward()
    assert net.cond_input.weight.grad.abs().sum() > 0  # the cond was an input of the loss
    with pytest.raises(ValueError, match="conditional"):  # and it is not optional for such a net
        family.pretrain_loss(net, x, torch.Generator().manual_seed(0))
