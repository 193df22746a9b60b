"""Conditional posteriors p(x | y): the exact task, groups from rollout to store to backward
rollouts, the checks a conditional config gets, and end-to-end runs on both runtimes."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from pipelines.gauss_cond import Config, GaussCondTask
from rtb_ray.config import ConfigError, load_config
from rtb_ray.loop import check_config_for_task
from rtb_ray.replay import ReplayStore
from rtb_ray.roles import RolloutContext, backward_rollouts
from rtb_ray.rollout import Sampler
from rtb_ray.tasks import make_task
from rtb_ray.trajectory import Source
from test_cli import ROOT, rtb_ray, sets

CONFIGS = ROOT / "pipelines" / "configs"


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_closed_forms_match_monte_carlo_under_the_prior(beta):
    """log E_prior[r^β] and the posterior's moments by importance sampling from the prior, to
    within four of their Monte Carlo standard errors."""
    task = GaussCondTask(Config(dim=2, cond="ids"))
    gen = torch.Generator().manual_seed(0)
    n = 1_000_000
    x = task.config.sigma * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    ids = task.eval_conditions()
    reference = task.reference_log_z(beta, ids)
    for k in range(ids.shape[0]):
        log_w = beta * task.log_reward(x, torch.full((n,), k)).double()
        w = torch.exp(log_w - log_w.max())
        se = (w.std() / w.mean()).item() / math.sqrt(n)  # of log mean w, by the delta method
        estimate = torch.logsumexp(log_w, 0).item() - math.log(n)
        assert abs(estimate - reference[k].item()) < 4 * se, (k, estimate, se)
        w = (w / w.sum())[:, None]
        mean, std = task.exact_posterior(torch.tensor([k]), beta)
        ess = 1 / w.square().sum().item()
        assert torch.allclose((w * x).sum(0), mean[0].double(), atol=4 * std / math.sqrt(ess))
        var = (w * (x - mean[0]).square()).sum(0)
        assert torch.allclose(var.sqrt(), torch.full((2,), std, dtype=torch.float64),
                              rtol=4 / math.sqrt(ess))


def test_groups_go_from_rollouts_through_the_store_into_backward_rollouts():
    cfg = load_config(CONFIGS / "gauss_cond_vargrad.yaml",
                      ["train.group_size=4", "train.batch_size=32"])
    task = make_task(cfg.task)
    prior = task.prior()
    sampler = Sampler(task, prior, prior)
    gen = torch.Generator().manual_seed(0)
    store = ReplayStore(group_size=4)
    for _ in range(4):
        store.insert(sampler.rollout(Source.PRIOR, 32, generator=gen, group_size=4)
                     ).raise_for_status()
    batch = store.sample(32)
    for group in batch.cond.view(-1, 4):
        assert torch.all(group == group[0])  # a training batch holds whole groups
    ctx = RolloutContext(sampler, cfg, gen, read_store=lambda n, rows: store.sample(
        n, sampler=rows, timeout=0, rate_limited=False))
    backward = backward_rollouts(ctx, 16)
    stored = store.to_table()
    states = np.stack(stored.column("states").to_numpy(zero_copy_only=False))
    stored_terminal = states.reshape(stored.num_rows, cfg.task.num_steps + 1, -1)[:, -1]
    stored_cond = stored.column("cond").to_numpy()
    for i in range(16):  # each row starts from a stored terminal of its own condition
        y = backward.cond[i].item()
        assert backward.cond[i // 4 * 4].item() == y
        same = stored_terminal[stored_cond == y]
        assert np.isclose(same, backward.terminal[i].numpy()).all(axis=1).any()


@pytest.mark.parametrize("config,override,expected", [
    ("gauss_cond_vargrad.yaml", "train.group_size=1", "train.group_size: vargrad on a conditional"),
    ("gauss_cond.yaml", "train.log_z.num_conditions=4",
     "condition id 4 is outside 0..num_conditions-1 (train.log_z.num_conditions = 4)"),
    ("gauss_cond_mlp.yaml", "train.log_z.kind=table",
     "train.log_z: num_conditions: a table log Z needs the number of condition ids"),
    ("gauss_cond.yaml", "train.group_size=3",
     "train.batch_size (256) must be a multiple of train.group_size (3)"),
    ("gmm25.yaml", "train.log_z.kind=mlp", "train.log_z.kind: mlp is a function of the condition"),
])
def test_a_conditional_config_is_checked_before_anything_starts(config, override, expected):
    with pytest.raises(ConfigError, match="^" + re.escape(expected)):
        cfg = load_config(CONFIGS / config, [override])
        check_config_for_task(cfg, make_task(cfg.task))


SMALL = ["train.steps=40", "train.log_every_steps=10", "train.batch_size=64", "eval.every_steps=20", "eval.num_samples=400",
         "eval.final_num_samples=800", "checkpoint_every_steps=20", "runtime.rollout_batch_size=64",
         "replay.min_size_to_sample=128", "tracking.log_model=false"]


@pytest.mark.parametrize("config,runtime", [("gauss_cond_vargrad.yaml", ["--in-process"]),
                                            ("gauss_cond_mlp.yaml", [])])
def test_a_conditional_run_reports_per_condition_metrics_and_samples_with_cond(
        tmp_path, config, runtime):
    run = tmp_path / "run"
    rtb_ray("train", str(CONFIGS / config), *runtime, "--no-progress", "--output", str(run),
            *sets(SMALL), cache=tmp_path, check=True)
    final = json.loads((run / "final_eval.json").read_text())
    for key in ("log_z_error_max", "mean_error_max", "std_rel_error_max", "elbo_gap_max",
                "eubo_gap_max", "ess_fraction_min", "log_z_error", "elbo", "eubo"):
        assert np.isfinite(final[key]), key
    assert final["log_z_error_max"] >= abs(final["log_z_error"])
    assert final["num_samples"] == 800  # 100 per condition
    train = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()
             if '"train"' in r]
    assert train and all(np.isfinite(r["log_z"]) for r in train)
    rtb_ray("sample", str(run), "--n", "50", "--out", str(tmp_path / "s.npz"), cache=tmp_path,
            check=True)
    samples = np.load(tmp_path / "s.npz")
    assert samples["x"].shape == (50, 1) and samples["cond"].shape[0] == 50
    y_values = Config().y_values
    if config == "gauss_cond_mlp.yaml":  # cond holds y itself
        assert (np.abs(samples["cond"] - np.array(y_values)[None]).min(1) < 1e-6).all()
    else:
        assert samples["cond"].dtype == np.int64 and samples["cond"].max() < len(y_values)
