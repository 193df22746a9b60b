"""The language domain's exact tier (pipelines/infill_hmm.py): the HMM's forward algorithm, the
data checks, the prior that cannot see y, the posterior that starts as the prior, the exact
log Z(c), and a tiny end-to-end run."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
import torch

from pipelines.infill_hmm import HMM, Config, InfillHMMTask, ResidualPosterior, check_tokens
from rtb_ray.config import AdapterConfig, ConfigError, load_config
from test_cli import ROOT, rtb_ray, sets

CONFIG = ROOT / "pipelines" / "configs" / "infill_hmm.yaml"
# a task small enough to enumerate everything by hand: V = 3, L = 3, one token of x and of y
TINY = dict(num_states=2, vocab_size=3, x_length=1, infill_length=3, y_length=1, dim=16,
            depth=1, heads=2, residual_dim=16, residual_depth=1, num_train_contexts=4,
            num_eval_contexts=2, pretrain={"steps": 5, "batch_size": 16},
            # pinned, not the defaults: 6 distinct contexts of 9 must be likely under the HMM
            stickiness=0.7, emission_concentration=0.3)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def brute_force_log_prob(hmm: HMM, tokens: list[int]) -> float:
    """log p(tokens), summing over every hidden path."""
    h = hmm.initial.shape[0]
    total = 0.0
    for path in itertools.product(range(h), repeat=len(tokens)):
        p = hmm.initial[path[0]].item()
        for t, (s, v) in enumerate(zip(path, tokens)):
            if t:
                p *= hmm.transition[path[t - 1], s].item()
            p *= hmm.emission[s, v].item()
        total += p
    return math.log(total)


def randomised(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (the zero head included): a network whose outputs depend on all of
    its inputs."""
    torch.manual_seed(seed)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return net


def tiny_task(tmp_path, **changes) -> InfillHMMTask:
    return InfillHMMTask(Config(**{**TINY, **changes,
                                   "prior_checkpoint": str(tmp_path / "prior.pt")}))


def test_forward_algorithm_matches_enumeration():
    hmm = HMM.seeded(3, 4, seed=5, stickiness=0.5, concentration=0.7)
    seqs = hmm.sample(6, 5, torch.Generator().manual_seed(0))
    cum = hmm.prefix_log_probs(seqs)
    assert cum.shape == (6, 5) and cum.dtype == torch.float64
    for row, c in zip(seqs.tolist(), cum):
        for t in (0, 2, 4):  # every prefix is its own marginal
            assert c[t].item() == pytest.approx(brute_force_log_prob(hmm, row[:t + 1]), abs=1e-10)
    # the probabilities of all sequences of one length sum to one
    every = torch.tensor(list(itertools.product(range(4), repeat=3)))
    assert hmm.prefix_log_probs(every)[:, -1].exp().sum().item() == pytest.approx(1, abs=1e-12)


def test_log_reward_is_the_likelihood_of_y_given_x_and_z(tmp_path):
    task = tiny_task(tmp_path)
    cond = task.eval_conditions()
    z = torch.tensor([[0, 1, 2], [2, 2, 0]])
    got = task.log_reward(z, cond)
    for i, (context, infill) in enumerate(zip(task.decode(cond).tolist(), z.tolist())):
        x, y = context[:1], context[1:]
        expected = (brute_force_log_prob(task.hmm, x + infill + y)
                    - brute_force_log_prob(task.hmm, x + infill))
        assert got[i].item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="infills must be tokens 0..2"):
        task.log_reward(torch.full((2, 3), 3), cond)


@pytest.mark.parametrize("override,expected", [
    ("task.eval_contexts=[[0,1,2,3,0,1,2],[1,2,3,4,0,5,1]]",
     "task.eval_contexts: row 1, y[1]: 5 is the mask id (5), which data never holds"),
    ("task.train_contexts=[[0,1,2,3,0,1,2],[1,2,3,4,0,1,2],[1,7,3,4,0,1,2]]",
     "task.train_contexts: row 2, x[1]: 7 is not a token id 0..4"),
    ("task.train_contexts=[[0,1,2,3,0,-1,2]]",
     "task.train_contexts: row 0, y[1]: -1 is not a token id 0..4"),
    ("task.eval_contexts=[[0,1,2,3,0,1,2],[0,1,2,3,0,1]]",
     "task.eval_contexts: row 1 has 6 tokens, expected 7"),
    ("task.vocab_size=11", "task: vocab_size, infill_length: exact evaluation enumerates "
                           "V^L = 11^5 infills, more than 100000"),
])
def test_bad_data_is_refused_in_one_line_naming_field_and_row(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [override])
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(expected), str(err.value)


def test_check_tokens_on_tensors():
    names = ["x[0]", "z[0]", "z[1]", "y[0]"]
    good = torch.tensor([[0, 1, 2, 0], [2, 2, 2, 2]])
    assert torch.equal(check_tokens("data", good, 4, 3, names), good)
    with pytest.raises(ValueError, match=re.escape("data: row 1, z[1]: 3 is the mask id (3)")):
        check_tokens("data", torch.tensor([[0, 1, 2, 0], [2, 2, 3, 2]]), 4, 3, names)
    with pytest.raises(ValueError, match=re.escape("data: rows of [5] tokens, expected [4]")):
        check_tokens("data", torch.zeros(2, 5, dtype=torch.long), 4, 3, names)


def test_the_prior_does_not_read_y_and_the_posterior_starts_as_the_prior(tmp_path):
    task = tiny_task(tmp_path, x_length=2, y_length=2, dim=32, heads=4)
    prior = randomised(task.new_prior_network(), 0).requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    n, v = 64, task.config.vocab_size
    x_t = torch.randint(0, v + 1, (n, 3), generator=gen)  # masks included
    t = torch.randint(0, task.family.num_steps, (n,), generator=gen)
    context = torch.randint(0, v, (n, 4), generator=gen)
    other_y = context.clone()
    other_y[:, 2:] = (context[:, 2:] + 1) % v
    other_x = context.clone()
    other_x[:, :2] = (context[:, :2] + 1) % v
    out = prior(x_t, t, task.encode(context))
    assert torch.equal(out, prior(x_t, t, task.encode(other_y)))  # y is never read
    assert not torch.allclose(out, prior(x_t, t, task.encode(other_x)))  # x is
    assert torch.equal(out, prior(x_t, t, context))  # ids or one-hot: the same context

    posterior = task.posterior_network(prior, AdapterConfig())
    assert isinstance(posterior, ResidualPosterior)
    assert torch.equal(posterior(x_t, t, task.encode(context)), out)  # exactly, at init
    trainable = [name for name, p in posterior.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("residual.") for name in trainable)
    randomised(posterior.residual, 2)  # once trained, the posterior reads y
    assert not torch.allclose(posterior(x_t, t, task.encode(context)),
                              posterior(x_t, t, task.encode(other_y)))
    with pytest.raises(ConfigError, match="^train.adapter.kind: lora does not apply"):
        task.posterior_network(prior, AdapterConfig(kind="lora"))


@pytest.mark.parametrize("unmask", ["one", "schedule"])
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_reference_log_z_is_the_sum_over_every_infill(tmp_path, unmask, beta):
    """log Z(c) = log Σ_z P_θ(z | x) r(z)^β with r by hidden-path enumeration, over all V^L
    infills, for a (random, non-uniform) learned prior."""
    task = tiny_task(tmp_path, unmask=unmask, num_steps=4 if unmask == "schedule" else None)
    prior = randomised(task.new_prior_network(), 3).requires_grad_(False)
    with torch.no_grad():  # the order head of a pretrained prior is zero: make it so
        prior.head.weight[-1] = 0
        prior.head.bias[-1] = 0
    task._prior_net = prior  # instead of pretraining one
    cond = task.eval_conditions()
    reference = task.reference_log_z(beta, cond)
    infills = list(itertools.product(range(3), repeat=3))
    for i, context in enumerate(task.decode(cond).tolist()):
        p = task.family.exact_marginal(prior, cond=cond[i:i + 1])
        assert p.sum().item() == pytest.approx(1, abs=1e-6) and p.max() < 0.5
        x, y = context[:1], context[1:]
        total = sum(p[k].item() * math.exp(beta * (
            brute_force_log_prob(task.hmm, x + list(z) + y)
            - brute_force_log_prob(task.hmm, x + list(z)))) for k, z in enumerate(infills))
        assert reference[i].item() == pytest.approx(math.log(total), abs=1e-6)


def test_y_depends_on_z_in_the_shipped_hmm():
    """The shipped settings tilt: the Bayes infill p(z | x, y) is far from p(z | x)."""
    task = InfillHMMTask(load_config(CONFIG).task)
    c = task.config
    tvs = []
    for context in task.eval_contexts:
        n = task.infills.shape[0]
        x, y = context[:c.x_length].expand(n, -1), context[c.x_length:].expand(n, -1)
        given_x = task.hmm.prefix_log_probs(torch.cat([x, task.infills], 1))[:, -1].softmax(0)
        given_xy = task.hmm.prefix_log_probs(torch.cat([x, task.infills, y], 1))[:, -1].softmax(0)
        tvs.append(0.5 * (given_x - given_xy).abs().sum().item())
    assert sum(tvs) / len(tvs) > 0.2, tvs
    # and the evaluation contexts are held out
    train = {tuple(r) for r in task.train_contexts.tolist()}
    assert len(train) == c.num_train_contexts
    assert not train & {tuple(r) for r in task.eval_contexts.tolist()}


def test_a_prior_over_another_vocabulary_is_refused(tmp_path):
    small = tiny_task(tmp_path, vocab_size=2, num_train_contexts=2, num_eval_contexts=1)
    small.pretrain(progress=False)
    assert small.prior_path().exists()
    with pytest.raises(ValueError, match=re.escape(
            f"prior_checkpoint {small.prior_path()}: a prior over a vocabulary of 2 tokens; "
            f"task.vocab_size is 3 (refused)")):
        tiny_task(tmp_path).prior()


SMALL = [  # a tiny task and a short run: the final evaluation's keys, not its quality
    "task.num_states=2", "task.vocab_size=3", "task.infill_length=3", "task.x_length=2",
    "task.y_length=2", "task.dim=16", "task.depth=1", "task.heads=2", "task.residual_dim=16",
    "task.residual_depth=1", "task.num_train_contexts=16", "task.num_eval_contexts=3",
    "task.pretrain={steps: 30, batch_size: 64}", "train.steps=20", "train.batch_size=64",
    "train.log_every_steps=10", "eval.every_steps=10", "eval.num_samples=60",
    "eval.final_num_samples=120", "checkpoint_every_steps=10", "runtime.rollout_batch_size=64",
    "replay.min_size_to_sample=128", "tracking.log_model=false"]


def test_a_tiny_run_writes_the_exact_figures(tmp_path):
    run = tmp_path / "run"
    rtb_ray("train", str(CONFIG), "--in-process", "--no-progress", "--output", str(run),
            *sets(SMALL), cache=tmp_path, check=True)
    final = json.loads((run / "final_eval.json").read_text())
    for key in ("tv_target", "kl_target", "tv_prior_to_target", "log_z_error_max",
                "mean_log_reward_error", "tv_target_max", "tv_bayes_to_target"):
        assert np.isfinite(final[key]), key
    assert 0 <= final["tv_target"] <= final["tv_target_max"] <= 1
    assert final["kl_target"] >= 0 and final["tv_prior_to_target"] > 0
    assert 0 <= final["closer_than_prior"] <= 1
    assert final["num_samples"] == 120  # 40 per context
    assert list((tmp_path / "infill_hmm").glob("prior-*.pt"))  # pretrained once, cached
    assert (run / "eval" / "step_20.png").exists()  # the final evaluation's picture
