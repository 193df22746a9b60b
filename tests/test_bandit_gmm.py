"""The control domain's exact tier (pipelines/bandit_gmm.py): the closed-form posterior against
quadrature and SIR, zero loss when the reward is constant, deterministic data, the data checks,
the state-dimension refusal, the evaluation's figures, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from pipelines.bandit_gmm import (DATA_KEYS, BanditGMMTask, Config, check_dataset,
                                  generate_data)
from rtb_ray.config import ConfigError, load_config
from rtb_ray.learner import Learner
from rtb_ray.loop import check_config_for_task
from rtb_ray.objectives import rtb_backward
from rtb_ray.replay import ReplayStore
from rtb_ray.roles import ROLES, RolloutContext
from rtb_ray.rollout import Sampler
from rtb_ray.trajectory import Source
from test_cli import ROOT, rtb_ray, sets

CONFIG = ROOT / "pipelines" / "configs" / "bandit_gmm.yaml"
RAY_CONFIG = ROOT / "pipelines" / "configs" / "bandit_gmm_ray.yaml"
# a prior that pretrains in a second: few steps, small network, few evaluation states
TINY = dict(num_steps=8, hidden=32, depth=1, num_data=2000, num_eval_states=4,
            pretrain={"steps": 30, "batch_size": 128, "stats_samples": 256})


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_task(tmp_path, **changes) -> BanditGMMTask:
    return BanditGMMTask(Config(**{**TINY, **changes,
                                   "prior_checkpoint": str(tmp_path / "prior.pt")}))


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_exact_posterior_integrates_to_one_and_matches_sir_from_the_behaviour(beta):
    """π*(a | s) and Z(s) by quadrature on a grid, and against 10⁵ behaviour samples resampled
    by e^{βQ}: mode weights, mean, E[Q], log Z, within four standard errors."""
    task = BanditGMMTask(Config())
    bandit = task.bandit
    states = task.eval_conditions()[:3]
    exact, log_z = bandit.posterior(states, beta)
    # the midpoint rule on a Gaussian of std ≥ 0.19 with h = 0.04: error ~ e^{−2π²σ²/h²}, nil
    h = 0.04
    grid = torch.arange(-7, 7, h, dtype=torch.float64) + h / 2
    points = torch.cartesian_prod(grid, grid)
    gen = torch.Generator().manual_seed(0)
    n = 100_000
    for i, s in enumerate(states):
        rows = s[None].expand(points.shape[0], -1)
        post = bandit.posterior(rows, beta)[0]
        assert post.log_prob(points).exp().sum().item() * h * h == pytest.approx(1, abs=1e-9)
        tilted = bandit.behaviour(rows).log_prob(points) + beta * bandit.q(rows, points)
        assert (tilted.logsumexp(0) + 2 * math.log(h)).item() == pytest.approx(
            log_z[i].item(), abs=1e-9)
        # SIR from μ
        a = bandit.behaviour(s[None].expand(n, -1)).sample(gen)
        lw = beta * bandit.q(s[None].expand(n, -1), a)
        w = lw.softmax(0)
        ess = 1 / w.square().sum().item()
        se_log_z = (w.std() / w.mean()).item() / math.sqrt(n)
        assert abs(lw.logsumexp(0).item() - math.log(n) - log_z[i].item()) < 4 * se_log_z
        weights = (w[:, None] * task.bandit.posterior(s[None].expand(n, -1), beta)[0]
                   .responsibilities(a)).sum(0)
        pi = exact.log_weights[i].exp()
        assert torch.allclose(weights, pi, atol=4 * math.sqrt(0.25 / ess)), (weights, pi)
        mean = (pi[:, None] * exact.means[i]).sum(0)
        spread = (w[:, None] * (a - mean).square()).sum(0).sqrt()
        assert torch.all(((w[:, None] * a).sum(0) - mean).abs() < 4 * spread / math.sqrt(ess))
        q = bandit.q(s[None].expand(n, -1), a)
        q_se = ((w * (q - (w * q).sum()).square()).sum().sqrt() / math.sqrt(ess)).item()
        expected_q = bandit.expected_q(exact, states)[i].item()
        assert abs((w * q).sum().item() - expected_q) < 4 * q_se
    # the tilt moves the mass to the rarest behaviour, near the goal
    rarest = bandit.rarest
    assert torch.all(exact.log_weights.exp()[:, rarest] >
                     bandit.behaviour(states).log_weights.exp()[:, rarest])


def test_data_generation_is_deterministic_per_seed():
    base = Config(num_data=500)
    s1, a1 = generate_data(base)
    s2, a2 = generate_data(Config(num_data=500))
    assert np.array_equal(s1, s2) and np.array_equal(a1, a2)
    s3, a3 = generate_data(Config(num_data=500, data_seed=1))
    assert not np.array_equal(s1, s3) and not np.array_equal(a1, a3)
    assert s1.shape == (500, 2) and a1.shape == (500, 2) and np.abs(s1).max() <= 1
    sb, ab = generate_data(Config(num_data=500, bounded=True))
    assert np.array_equal(sb, s1) and np.allclose(ab, np.tanh(a1))  # the same draws, squashed
    assert np.abs(ab).max() < 1


def test_a_constant_reward_gives_zero_loss_at_init(tmp_path):
    """r ≡ 1: the target is the prior, and the posterior starts as the prior, so every
    trajectory's residual (RTB with log Z = 0, VarGrad) is zero, whichever role made it."""
    task = tiny_task(tmp_path)
    task.log_reward = lambda x, cond=None: torch.zeros(x.shape[0])
    prior = task.prior()
    for kind in ("rtb", "vargrad"):
        cfg = load_config(CONFIG, ["train.group_size=4", "train.batch_size=32",
                                   f"train.objective.kind={kind}",
                                   "train.sources={posterior: 1, prior: 1, backward: 1, "
                                   "dataset: 1}", f"task.num_steps={TINY['num_steps']}"])
        learner = Learner(task.family, prior, cfg.train, eval_conditions=task.eval_conditions(),
                          task=task)
        gen = torch.Generator().manual_seed(0)
        store = ReplayStore(group_size=4)
        ctx = RolloutContext(Sampler(task, learner.prior, learner.posterior), cfg, gen,
                             read_store=lambda n, rows: store.sample(
                                 n, sampler=rows, timeout=0, rate_limited=False))
        for role in ("posterior", "prior", "dataset", "backward"):
            batch = ROLES[role].rollout(ctx, 32)
            store.insert(batch).raise_for_status()
            # the loss, not a step: Adam would turn a rounding-sized gradient into a full step
            stats = rtb_backward(task.family, learner.posterior, learner.log_z, batch,
                                 cfg.train.objective, group_size=4)
            assert stats["loss"].item() < 1e-8 and stats["delta_sq"].item() < 1e-8, (kind, role)


def test_a_non_finite_q_is_quarantined_by_the_store(tmp_path):
    task = tiny_task(tmp_path)
    prior = task.prior()
    batch = Sampler(task, prior, prior).rollout(
        Source.PRIOR, 16, generator=torch.Generator().manual_seed(0), group_size=4)
    batch.log_reward[5] = float("nan")
    store = ReplayStore(group_size=4)
    store.insert(batch).raise_for_status()
    assert store.size == 12 and store.stats()["quarantined_rows"] == 4  # its whole group


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


GOOD_S = np.zeros((5, 2))
GOOD_A = np.zeros((5, 2))
NAN_A = GOOD_A.copy()
NAN_A[3, 1] = np.nan
FAR_S = GOOD_S.copy()
FAR_S[2, 0] = 1.5
EDGE_A = GOOD_A.copy()
EDGE_A[4] = [0.5, -1.0]


@pytest.mark.parametrize("arrays,bounded,expected", [
    ({"states": GOOD_S}, False, "missing key 'actions' (it has: states)"),
    ({"states": GOOD_S, "actions": NAN_A}, False,
     "key 'actions', row 3: [0.0, nan] holds a value that is not a finite number"),
    ({"states": np.zeros((5, 3)), "actions": GOOD_A}, False,
     "key 'states': shape (5, 3), expected (N, 2) (task.state_dim)"),
    ({"states": GOOD_S, "actions": np.zeros((4, 2))}, False,
     "key 'actions': 4 rows, but 'states' has 5"),
    ({"states": FAR_S, "actions": GOOD_A}, False,
     "key 'states', row 2: [1.5, 0.0] is outside [-1, 1]^2"),
    ({"states": GOOD_S, "actions": EDGE_A}, True,
     "key 'actions', row 4: [0.5, -1.0] is outside (-1, 1)² (task.bounded"),
    ({"states": GOOD_S, "actions": np.array([["a", "b"]] * 5)}, False,
     "key 'actions': dtype <U1 is not numeric"),
])
def test_bad_data_is_refused_in_one_line_naming_key_and_row(tmp_path, cache_dir, arrays,
                                                             bounded, expected):
    path = write_npz(tmp_path / "data.npz", **arrays)
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [f"task.dataset={path}", f"task.bounded={str(bounded).lower()}"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"task: dataset {path}: {expected}"), message
    assert not cache_dir.exists()  # refused before anything was pretrained or cached


def test_files_that_are_not_data_are_refused_in_one_line(tmp_path):
    objects = np.empty(2, dtype=object)
    cases = {write_npz(tmp_path / "obj.npz", states=objects, actions=GOOD_A):
             "key 'states': Object arrays cannot be loaded when allow_pickle=False",
             tmp_path / "missing.npz": "cannot be read as an .npz archive (FileNotFoundError",
             tmp_path / "plain.npy": "not an .npz archive (one .npy array, not the keys "
                                     "states, actions)"}
    np.save(tmp_path / "plain.npy", GOOD_A)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    cases[tmp_path / "junk.npz"] = "not an .npz archive (a zip of .npy arrays)"
    for path, expected in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(CONFIG, [f"task.dataset={path}"])
        assert "\n" not in str(err.value)
        assert str(err.value).startswith(f"task: dataset {path}: {expected}"), str(err.value)


def test_a_dataset_file_names_its_prior_and_is_what_the_prior_clones(tmp_path):
    states, actions = generate_data(Config(num_data=300, bounded=True))
    one = write_npz(tmp_path / "one.npz", states=states, actions=actions)
    two = write_npz(tmp_path / "two.npz", states=states[:200], actions=actions[:200])
    cfg_one = Config(dataset=str(one), bounded=True)
    cfg_two = Config(dataset=str(two), bounded=True)
    assert cfg_one.prior_path() != cfg_two.prior_path() != Config(bounded=True).prior_path()
    assert Config(dataset=str(one), bounded=True).prior_path() == cfg_one.prior_path()
    s, x = BanditGMMTask(cfg_one).data()
    assert torch.allclose(x.double(), torch.from_numpy(np.arctanh(actions)), atol=1e-5)
    assert torch.equal(s, torch.from_numpy(states).float())
    # the data were checked when the config was loaded; a file changed since is refused
    write_npz(one, states=states[:10], actions=actions[:10])
    with pytest.raises(ValueError, match="the file changed since the config was loaded"):
        BanditGMMTask(cfg_one).data()
    # check_dataset is the same check on arrays
    with pytest.raises(ValueError, match=re.escape("x: missing key 'states'")):
        check_dataset("x", {"actions": actions}, 2, False)
    assert set(DATA_KEYS) == {"states", "actions"}


def test_a_prior_of_another_state_dimension_is_refused(tmp_path):
    task = tiny_task(tmp_path)
    stats = task.pretrain(progress=False)
    assert stats["prior_samples"].shape == (4, 256, 2)
    assert task.prior().cond_input.in_features == 2
    other = tiny_task(tmp_path, state_dim=3)
    with pytest.raises(ValueError, match=re.escape(
            f"prior_checkpoint {tmp_path / 'prior.pt'}: a prior over states of dimension 2; "
            f"task.state_dim is 3 (refused)")):
        other.prior()
    with pytest.raises(ValueError, match="states of dimension 2; task.state_dim is 3"):
        other.log_reward(torch.zeros(2, 2), torch.zeros(2, 2))


def test_evaluation_scores_exact_and_target_samples_near_zero(tmp_path):
    """Samples of π* score ~0 TV to π*; samples of the learned-prior target (its stored prior
    samples resampled by e^{βQ}) ~0 TV to the target and a Q gap ratio ~0; the prior's own
    samples a ratio of 1; log Z_θ(s) is the stored samples' log mean e^{βQ}."""
    task = tiny_task(tmp_path, pretrain={"steps": 30, "batch_size": 128,
                                         "stats_samples": 20_000})
    task.prior()
    states = task.eval_conditions()
    log_z = task.reference_log_z(1.0, states)
    prior_x = task.stats["prior_samples"]
    q = task.bandit.q(states.repeat_interleave(20_000, 0), prior_x.reshape(-1, 2)).view(4, -1)
    assert torch.allclose(log_z, q.logsumexp(1) - math.log(20_000))
    assert task.reference_log_z(1.0, torch.ones(1, 2)) is None  # not an evaluation state
    gen = torch.Generator().manual_seed(0)
    cond = states.repeat_interleave(5000, 0)
    exact = task.bandit.posterior(cond)[0].sample(gen).float()
    assert task.evaluate(exact, cond)["tv_analytic"] < 0.03
    picks = torch.multinomial(q.softmax(1), 5000, replacement=True, generator=gen)
    target = torch.stack([prior_x[i, picks[i]] for i in range(4)]).reshape(-1, 2)
    m = task.evaluate(target, cond)
    assert m["tv_target"] < 0.03 and m["q_gap_ratio"] < 0.05, m
    m = task.evaluate(prior_x[:, :5000].reshape(-1, 2), cond)
    assert m["q_gap_ratio"] == pytest.approx(1, abs=0.05), m
    task.plot(target, tmp_path / "plot.png", "target", cond)
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_both_configs_share_one_task_and_pass_the_checks():
    in_process, ray = load_config(CONFIG), load_config(RAY_CONFIG)
    assert in_process.task == ray.task  # one prior, pretrained and cached once for both
    assert in_process.task.prior_path() == ray.task.prior_path()
    assert (in_process.train.objective.kind, in_process.train.group_size) == ("vargrad", 64)
    assert (ray.train.objective.kind, ray.train.log_z.kind) == ("rtb", "mlp")
    for cfg in (in_process, ray):
        check_config_for_task(cfg, BanditGMMTask(cfg.task))


SMALL = ["train.steps=20", "train.log_every_steps=10", "train.batch_size=64",
         "train.group_size=16", "eval.every_steps=10", "eval.num_samples=400",
         "eval.final_num_samples=800", "checkpoint_every_steps=10",
         "runtime.rollout_batch_size=64", "replay.capacity=4096",
         "replay.min_size_to_sample=128", "tracking.enabled=false",
         *(f"task.{k}={json.dumps(v)}" for k, v in TINY.items())]


def test_a_tiny_run_writes_the_acceptance_figures(tmp_path):
    run = tmp_path / "run"
    rtb_ray("train", str(CONFIG), "--in-process", "--no-progress", "--output", str(run),
            *sets(SMALL + ["torch_threads=1"]), cache=tmp_path, check=True)
    final = json.loads((run / "final_eval.json").read_text())
    for key in ("tv_target", "q_gap_ratio", "log_z_error_max", "log_z_abs_error", "tv_analytic",
                "target_tv_analytic", "tv_floor", "elbo_gap_max"):
        assert np.isfinite(final[key]), key
    assert final["num_samples"] == 800  # 200 per evaluation state
    assert (run / "eval" / "step_20.png").stat().st_size > 0
    # a bad dataset: one line, exit 2, no run directory, the cache as it was
    before = sorted(p.name for p in (tmp_path / "bandit_gmm").iterdir())
    bad = write_npz(tmp_path / "bad.npz", states=GOOD_S, actions=NAN_A)
    refused = rtb_ray("train", str(CONFIG), "--in-process", "--output", str(tmp_path / "r2"),
                      *sets(SMALL + [f"task.dataset={bad}"]), cache=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"rtb-ray: error: task: dataset {bad}: key 'actions', row "
                                      f"3: [0.0, nan] holds a value that is not a finite number")
    assert not (tmp_path / "r2").exists()
    assert sorted(p.name for p in (tmp_path / "bandit_gmm").iterdir()) == before
