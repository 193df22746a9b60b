"""The masked categorical family: log-probs, noising, the ELBO, exact marginals, RTB on tokens."""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch

from rtb_ray.config import TrainConfig
from rtb_ray.discrete import MaskedCategorical, TokenMLP
from rtb_ray.learner import Learner
from rtb_ray.objectives import rtb_backward
from rtb_ray.replay import ReplayStore
from rtb_ray.rollout import Sampler
from rtb_ray.trajectory import Source, TrajectoryBatch, from_arrow
from rtb_ray.transitions import TransitionFamily

# from_arrow hands out tensors over read-only Arrow memory; torch says so once per process
pytestmark = [pytest.mark.filterwarnings("ignore:The given NumPy array is not writable"),
              pytest.mark.usefixtures("one_thread")]  # one_thread: conftest.py

MODES = {"one": None, "schedule": 4}  # unmask mode -> num_steps
L, V = 3, 3


def family(mode: str) -> MaskedCategorical:
    return MaskedCategorical(L, V, mode, MODES[mode])  # type: ignore[arg-type]


def random_net(fam: MaskedCategorical, seed: int = 0, uniform_order: bool = False) -> TokenMLP:
    """A non-trivial network (the zero last layer replaced); ``uniform_order``: a prior's order
    head, zero."""
    torch.manual_seed(seed)
    net = TokenMLP(fam.length, fam.vocab_size, fam.num_steps, hidden=32)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if uniform_order:
        with torch.no_grad():
            last = net.trunk[-1]
            last.weight.view(fam.length, V + 1, -1)[:, V] = 0
            last.bias.view(fam.length, V + 1)[:, V] = 0
    return net


ALL = torch.tensor(list(itertools.product(range(V), repeat=L)))  # index order of exact_marginal


def frequencies(x: torch.Tensor) -> torch.Tensor:
    index = (x * V ** torch.arange(L - 1, -1, -1)).sum(-1)
    return torch.bincount(index, minlength=V**L).double() / x.shape[0]


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def manual_step_log_prob(fam: MaskedCategorical, net: TokenMLP, x: torch.Tensor,
                         x_next: torch.Tensor, k: int, eps: float) -> float:
    """One transition from first principles, position by position, in plain Python."""
    out = net(x[None], k)[0]
    masked = [i for i in range(L) if x[i] == V]
    tok = lambda i, v: (1 - eps) * out[i, :V].softmax(-1)[v].item() + eps / V  # noqa: E731
    if fam.unmask == "one":
        (i,) = [i for i in range(L) if x_next[i] != x[i]]
        order = out[masked, V].softmax(-1)[masked.index(i)].item()
        return math.log((1 - eps) * order + eps / len(masked)) + math.log(tok(i, x_next[i]))
    q = 1 / (fam.num_steps - k)
    return sum(math.log(q * tok(i, x_next[i])) if x_next[i] != V else math.log(1 - q)
               for i in masked)


def test_is_a_transition_family_and_refuses_bad_settings():
    for mode in MODES:
        fam = family(mode)
        assert isinstance(fam, TransitionFamily)
        assert fam.event_shape == (L,) and fam.net_out_dim == V + 1
    assert family("one").num_steps == L
    with pytest.raises(ValueError, match="num_steps"):
        MaskedCategorical(L, V, "one", 5)
    with pytest.raises(ValueError, match="num_steps"):
        MaskedCategorical(L, V, "schedule")
    with pytest.raises(ValueError, match="unmask"):
        MaskedCategorical(L, V, "all")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_sample_log_probs_are_recomputed_exactly(mode, eps):
    fam = family(mode)
    net = random_net(fam)
    states, log_behaviour = fam.sample(net, 512, explore=eps,
                                       generator=torch.Generator().manual_seed(1))
    assert states.dtype == torch.int64 and states.shape == (512, fam.num_steps + 1, L)
    assert torch.all(states[:, 0] == V) and torch.all(states[:, -1] < V)
    opened = states[:, :-1] != V
    assert torch.all(states[:, 1:][opened] == states[:, :-1][opened])  # revealed tokens stay
    if mode == "one":
        assert torch.all((states[:, 1:] != states[:, :-1]).sum(-1) == 1)

    steps = fam.step_log_probs(net, states, explore=eps)
    assert steps.shape == (512, fam.num_steps) and torch.isfinite(steps).all()
    torch.testing.assert_close(steps.sum(1), log_behaviour, atol=1e-4, rtol=1e-5)
    # a subset of steps is the same columns
    some = torch.tensor([0, fam.num_steps - 1])
    torch.testing.assert_close(fam.step_log_probs(net, states, steps=some, explore=eps),
                               steps[:, some], atol=1e-5, rtol=1e-5)
    for b, k in [(0, 0), (1, 1), (2, fam.num_steps - 1), (3, 2)]:
        manual = manual_step_log_prob(fam, net, states[b, k], states[b, k + 1], k, eps)
        assert steps[b, k].item() == pytest.approx(manual, abs=1e-4)
    if eps > 0:  # the behaviour process is the explored one, not the network's own
        assert not torch.allclose(fam.step_log_probs(net, states).sum(1), log_behaviour)


def path(text: str) -> torch.Tensor:
    """``"MMM 0MM 01M 012"`` -> states ``[T+1, L]`` (M: the mask, ``x``: the id 7)."""
    ids = {"M": V, "x": 7, "-": -1}
    return torch.tensor([[ids[c] if c in ids else int(c) for c in state]
                         for state in text.split()])


@pytest.mark.parametrize("mode,text,bad", [
    ("one", "MMM 0MM 01M 012", ()),  # valid
    ("one", "MMM 0MM 2MM 21M", (1, 2)),  # a revealed token changes (and a mask is left)
    ("one", "MMM 01M 012 012", (0, 2)),  # two positions revealed at once, none at step 2
    ("one", "MMM 0MM 0MM 01M", (1, 2)),  # none revealed at step 1, a mask left at the end
    ("one", "MMM 0MM MMM 0MM", (1, 2)),  # a revealed position masked again
    ("one", "MMM xMM x1M x12", (0, 1, 2)),  # a token id out of range
    ("one", "MMM -MM -1M -12", (0, 1, 2)),  # a negative id
    ("schedule", "MMM 0MM 01M 01M 012", ()),  # valid (nothing opens at step 2)
    ("schedule", "MMM MMM MMM MMM 012", ()),  # valid: everything opens at the last step
    ("schedule", "MMM 0MM 21M 21M 212", (1,)),  # a revealed token changes
    ("schedule", "MMM 0MM M1M M1M 012", (1,)),  # a revealed position masked again
    ("schedule", "MMM 0MM 01M 01M 01M", (3,)),  # a mask stays at the last step
    ("schedule", "MMM xMM x1M x1M x12", (0, 1, 2, 3)),  # a token id out of range
])
def test_impossible_transitions_are_minus_infinity(mode, text, bad):
    fam = family(mode)
    net = random_net(fam)
    states = path(text)[None].repeat(2, 1, 1)
    for eps in (0.0, 0.3):
        lp = fam.step_log_probs(net, states, explore=eps)
        assert lp.shape == (2, fam.num_steps) and not lp.isnan().any()
        impossible = torch.zeros(fam.num_steps, dtype=torch.bool)
        impossible[list(bad)] = True
        assert torch.all(lp[:, impossible] == -math.inf)
        assert torch.isfinite(lp[:, ~impossible]).all()
        # the possible steps still backpropagate cleanly past the impossible ones
        net.zero_grad()
        lp[:, ~impossible].sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("mode", MODES)
def test_backward_noising_is_the_reversed_prior_process(mode):
    fam = family(mode)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (20_000, L), generator=gen)
    states, log_q = fam.backward_sample(x, generator=gen)
    T = fam.num_steps
    assert torch.equal(states[:, -1], x) and torch.all(states[:, 0] == V)
    opened = states[:, :-1] != V
    assert torch.all(states[:, 1:][opened] == states[:, :-1][opened])
    reveal = (states == V).sum(1) - 1  # the step at which each position opens
    if mode == "one":
        expected = -math.log(math.factorial(L))
        assert torch.all((states[:, 1:] != states[:, :-1]).sum(-1) == 1)
    else:
        expected = -L * math.log(T)
    torch.testing.assert_close(log_q, torch.full_like(log_q, expected))
    # each position's reveal step is uniform on {0..T-1}
    freq = torch.stack([(reveal == k).double().mean(0) for k in range(T)])
    assert (freq - 1 / T).abs().max() < 0.02
    # independently: a uniform-order, uniform-token prior's path probability factorises as
    # p(τ) = p(x)·q(τ|x) (time reversal), with p(x) = V^-L
    prior = TokenMLP(L, V, T)
    log_p = fam.step_log_probs(prior, states[:256]).sum(1)
    torch.testing.assert_close(log_p + L * math.log(V), log_q[:256], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="without masks"):
        fam.backward_sample(torch.full((2, L), V))


@pytest.mark.parametrize("mode", MODES)
def test_exact_marginal_matches_sampling(mode):
    fam = family(mode)
    net = random_net(fam)
    exact = fam.exact_marginal(net)
    assert exact.shape == (V**L,)
    assert exact.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert exact.max() < 0.5  # a spread-out distribution, not a near-deterministic network
    states, _ = fam.sample(net, 200_000, generator=torch.Generator().manual_seed(4))
    assert tv(frequencies(states[:, -1]), exact) < 0.02


def test_conditional_network():
    fam = family("one")
    torch.manual_seed(0)
    net = TokenMLP(L, V, fam.num_steps, hidden=32, cond_dim=2)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    marginals = []
    for y in ([1.0, 0.0], [0.0, 1.0]):
        cond = torch.tensor([y]).repeat(100_000, 1)
        states, log_behaviour = fam.sample(net, 100_000, cond=cond,
                                           generator=torch.Generator().manual_seed(11))
        torch.testing.assert_close(fam.step_log_probs(net, states, cond=cond).sum(1),
                                   log_behaviour, atol=1e-4, rtol=1e-5)
        marginals.append(fam.exact_marginal(net, cond=cond[:1]))
        assert tv(frequencies(states[:, -1]), marginals[-1]) < 0.02
    assert tv(*marginals) > 0.1  # the condition matters
    with pytest.raises(ValueError, match="pass cond"):
        fam.sample(net, 4)


@pytest.mark.parametrize("mode", MODES)
def test_exact_marginal_refuses_too_many_states(mode):
    fam = MaskedCategorical(9, 4, mode, MODES[mode])  # type: ignore[arg-type]
    net = TokenMLP(9, 4, fam.num_steps, hidden=8)
    with pytest.raises(ValueError, match=r"L=9, V=4"):
        fam.exact_marginal(net, max_states=1000)


@pytest.mark.parametrize("mode", MODES)
def test_pretrain_loss_is_the_elbo(mode):
    """E[pretrain_loss]·L = E_q[log q(τ|x) − log p(τ)] for the noising process q: the loss is
    the exact discrete-time bound on −log p(x) (the order head stays uniform)."""
    fam = family(mode)
    net = random_net(fam, uniform_order=True)
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, V, (4, L), generator=gen).repeat(50_000, 1)
    with torch.no_grad():
        loss = fam.pretrain_loss(net, x, gen).item() * L
        states, log_q = fam.backward_sample(x, generator=gen)
        bound = (log_q - fam.step_log_probs(net, states).sum(1)).mean().item()
    assert loss == pytest.approx(bound, rel=0.01)
    # and the bound holds: −log p(x) averaged over the four data points is below it
    exact = fam.exact_marginal(net)
    index = (x[:4] * V ** torch.arange(L - 1, -1, -1)).sum(-1)
    assert -exact[index].log().mean().item() < bound


@pytest.mark.parametrize("mode", MODES)
def test_pretraining_fits_the_data(mode):
    """"one" can express any distribution; "schedule" opens positions at the same step
    independently, so only a product distribution is exactly in its reach."""
    fam = family(mode)
    net = TokenMLP(L, V, fam.num_steps, hidden=64)
    seeded = torch.Generator().manual_seed(6)
    if mode == "one":
        data = torch.softmax(torch.randn(V**L, generator=seeded) * 2, 0)
    else:
        per_position = torch.softmax(torch.randn(L, V, generator=seeded) * 1.5, -1)
        data = per_position[torch.arange(L), ALL].prod(-1)
    gen = torch.Generator().manual_seed(7)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(400):
        x = ALL[torch.multinomial(data, 256, replacement=True, generator=gen)]
        loss = fam.pretrain_loss(net, x, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert tv(fam.exact_marginal(net), data.double()) < (0.08 if mode == "one" else 0.06)
    # the order head got no gradient: the prior keeps the uniform order
    assert torch.all(net.trunk[-1].weight.view(L, V + 1, -1)[:, V] == 0)


class TokenTask:
    """A task for Sampler: a random prior on L=3, V=3 and a reward that prefers token 0."""

    name = "tokens"

    def __init__(self, mode: str, log_reward_scale: float) -> None:
        self.family = family(mode)
        self.scale = log_reward_scale

    def prior(self) -> TokenMLP:
        return random_net(self.family, uniform_order=True).requires_grad_(False)

    def log_reward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * (x == 0).float().sum(-1)

    def conditions(self, n: int) -> None:
        return None


@pytest.mark.parametrize("mode", MODES)
def test_flat_reward_gives_zero_loss_and_gradient(mode):
    task = TokenTask(mode, 0.0)  # r ≡ 1: the posterior is the prior, log Z = 0
    learner = Learner(task.family, task.prior(), TrainConfig())
    sampler = Sampler(task, learner.prior, learner.posterior)
    batch = sampler.rollout(Source.EXPLORE, 128, explore=0.3,
                            generator=torch.Generator().manual_seed(8))
    stats = rtb_backward(task.family, learner.posterior, learner.log_z, batch,
                         learner.cfg.objective)
    assert stats["loss"] == 0.0
    assert all(p.grad is None or torch.all(p.grad == 0) for p in learner.posterior.parameters())


def test_rtb_training_reaches_the_target_marginal():
    """RTB on tokens ("one" mode): the posterior's exact marginal goes to prior·r / Z."""
    task = TokenTask("one", 1.5)
    fam, steps = task.family, 300
    learner = Learner(fam, task.prior(), TrainConfig(steps=steps))
    sampler = Sampler(task, learner.prior, learner.posterior)
    target = fam.exact_marginal(learner.prior) * task.log_reward(ALL).double().exp()
    log_z = target.sum().log().item()
    target /= target.sum()
    start = tv(fam.exact_marginal(learner.posterior), target)
    gen = torch.Generator().manual_seed(9)
    began, curve = time.monotonic(), []
    for step in range(steps):
        learner.step(sampler.rollout(Source.EXPLORE, 128, explore=0.1, generator=gen,
                                     policy_version=step))
        if step % 50 == 49:
            curve.append(round(tv(fam.exact_marginal(learner.posterior), target), 4))
    assert time.monotonic() - began < 20
    assert start > 0.3, start
    assert curve[-1] < 0.05, curve
    assert learner.mean_log_z().item() == pytest.approx(log_z, abs=0.05)


def test_replay_store_round_trips_token_trajectories():
    task = TokenTask("schedule", 1.0)
    prior = task.prior()
    batch = Sampler(task, prior, prior).rollout(Source.PRIOR, 16,
                                                generator=torch.Generator().manual_seed(10))
    backward = Sampler(task, prior, prior).rollout(Source.BACKWARD, 16,
                                                   terminal=batch.terminal)
    store = ReplayStore(capacity_trajectories=100)
    for b in (batch, backward):
        assert store.insert(b).ok
    back = from_arrow(store.to_table())
    both = TrajectoryBatch.cat([batch, backward])
    assert back.states.dtype == torch.int64 and torch.equal(back.states, both.states)
    for name in ("log_reward", "log_prior", "log_behaviour", "source"):
        assert torch.equal(getattr(back, name), getattr(both, name)), name
    # the learner's recomputation works on what the store hands back
    torch.testing.assert_close(task.family.step_log_probs(prior, back.states).sum(1),
                               both.log_prior)
