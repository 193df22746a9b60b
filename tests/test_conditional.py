"""Conditional posteriors p(x | y): the exact task, groups from rollout to store to backward
rollouts, the checks a conditional config gets, and end-to-end runs on both runtimes."""

from __future__ import annotations

import dataclasses
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
from rtb_ray.learner import Learner
from rtb_ray.roles import ROLES, RolloutContext, backward_rollouts
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
    # a batch without cond (or with another kind of cond) is rejected whole, naming it
    plain = dataclasses.replace(batch, cond=None)
    assert "missing field 'cond'" in store.insert(plain).reason
    other = dataclasses.replace(batch, cond=batch.cond.float())
    assert "field 'cond': expected int64" in store.insert(other).reason
    assert store.size == 128
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


def test_the_dataset_source_alone_trains_to_the_exact_conditional_posterior(one_thread):
    """Supervised (y, x) pairs noised back (offline data, never sampled from a policy): RTB with
    a table log Z recovers p(x | y) and log Z(y) for every y."""
    torch.manual_seed(0)  # the networks' initialisation: the rollouts have their own generator
    cfg = load_config(CONFIGS / "gauss_cond.yaml", [
        "train.sources={dataset: 1}", "train.group_size=4", "train.lr=0.003"])
    task = make_task(cfg.task)
    check_config_for_task(cfg, task)
    learner = Learner(task.family, task.prior(), cfg.train, eval_conditions=task.eval_conditions(),
                      task=task)
    gen = torch.Generator().manual_seed(0)
    ctx = RolloutContext(Sampler(task, learner.prior, learner.posterior), cfg, gen,
                         read_store=lambda n, rows: None)
    # 800 steps: for some initialisations the rare far-off samples of the largest y (where no
    # data goes) take 500-600 steps to die out; at 400, three seeds in five failed
    for _ in range(800):
        batch = ROLES["dataset"].rollout(ctx, 256)
        learner.step(batch)
    assert torch.all(batch.source == Source.DATASET)
    assert torch.equal(batch.terminal[0:4], batch.terminal[0:1].expand(4, 1))  # k paths, one datum
    ids = task.eval_conditions()
    log_z_error = learner.log_z_of(ids, 8).double().cpu() - task.reference_log_z(1.0, ids)
    assert log_z_error.abs().max() < 0.05, log_z_error
    cond = ids.repeat_interleave(4000)
    x = Sampler(task, learner.prior, learner.posterior).rollout(
        Source.POSTERIOR, cond.shape[0], cond=cond, generator=gen).terminal
    metrics = task.evaluate(x, cond)
    assert metrics["mean_error_max"] < 0.05 and metrics["std_rel_error_max"] < 0.05, metrics


def test_conditions_unlike_the_evaluation_conditions_are_refused_before_training():
    cfg = load_config(CONFIGS / "gauss_cond.yaml")
    task = make_task(cfg.task)
    task.conditions = lambda n, generator: torch.zeros(n, 2)  # floats of another shape than ids
    with pytest.raises(ConfigError, match=re.escape(
            "task 'gauss_cond': conditions() gives torch.float32 rows of shape (2,), "
            "eval_conditions() torch.int64 rows of shape ()")):
        check_config_for_task(cfg, task)


def test_the_guidance_baseline_refuses_a_conditional_task(tmp_path):
    from rtb_ray.baselines import guidance_sweep
    from rtb_ray.transitions import DDPMGaussian

    cfg = load_config(CONFIGS / "gauss_cond.yaml")
    task = make_task(cfg.task)
    task.family = DDPMGaussian(1, 10)  # a guided family: only the condition stands in the way
    with pytest.raises(ValueError, match="^guidance evaluates unconditional tasks; task "
                                         "'gauss_cond' is conditional$"):
        guidance_sweep(cfg, task, tmp_path / "g", [0.0], 10)
    assert not (tmp_path / "g").exists()


def test_a_task_without_data_is_refused_the_dataset_source():
    cfg = load_config(CONFIGS / "gmm25.yaml", ["train.sources={posterior: 1, dataset: 1}"])
    with pytest.raises(ConfigError, match="^train.sources.dataset: task 'gmm25' has no known"):
        check_config_for_task(cfg, make_task(cfg.task))


def test_the_task_posterior_network_is_what_every_role_trains_and_samples():
    """A task's own posterior network: here the frozen prior plus a zero-initialised residual."""
    class Residual(torch.nn.Module):
        def __init__(self, prior):
            super().__init__()
            self.prior = prior.requires_grad_(False)
            self.correction = torch.nn.Linear(1, 2)
            torch.nn.init.zeros_(self.correction.weight)
            torch.nn.init.zeros_(self.correction.bias)

        def forward(self, x, t_index, cond=None):
            return self.prior(x, t_index, cond) + self.correction(x)

    task = GaussCondTask(Config(cond="ids"))
    task.posterior_network = lambda prior, adapter: Residual(prior)
    cfg = load_config(CONFIGS / "gauss_cond.yaml")
    learner = Learner(task.family, task.prior(), cfg.train, eval_conditions=task.eval_conditions(),
                      task=task)
    assert isinstance(learner.posterior, Residual)
    assert [n for n, p in learner.posterior.named_parameters() if p.requires_grad] == [
        "correction.weight", "correction.bias"]


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
                "eubo_gap_max", "ess_fraction_min", "log_z_error", "log_z_abs_error", "elbo",
                "eubo"):
        assert np.isfinite(final[key]), key
    assert final["log_z_error_max"] >= final["log_z_abs_error"] >= abs(final["log_z_error"])
    assert final["num_samples"] == 800  # 100 per condition
    train = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()
             if '"train"' in r]
    assert train and all(np.isfinite(r["log_z"]) for r in train)
    # resumed with another kind of log Z: refused in one line, on either runtime, nothing changed
    before = (run / "checkpoint.pt").read_bytes()
    trained, other = ("mlp", "scalar") if config == "gauss_cond_mlp.yaml" else ("table", "mlp")
    for flags in (["--in-process"], []):
        refused = rtb_ray("train", str(CONFIGS / config), *flags, "--resume", str(run), *sets(SMALL),
                          "--set", f"train.log_z.kind={other}", cache=tmp_path)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip() == (
            f"rtb-ray: error: the checkpoint's log Z kind is {trained}; train.log_z.kind is "
            f"{other} (resume with the kind it was trained with)")
    assert (run / "checkpoint.pt").read_bytes() == before
    rtb_ray("sample", str(run), "--n", "50", "--out", str(tmp_path / "s.npz"), cache=tmp_path,
            check=True)
    samples = np.load(tmp_path / "s.npz")
    assert samples["x"].shape == (50, 1) and samples["cond"].shape[0] == 50
    y_values = Config().y_values
    if config == "gauss_cond_mlp.yaml":  # cond holds y itself
        assert (np.abs(samples["cond"] - np.array(y_values)[None]).min(1) < 1e-6).all()
    else:
        assert samples["cond"].dtype == np.int64 and samples["cond"].max() < len(y_values)
