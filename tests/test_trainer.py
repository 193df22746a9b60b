"""Pieces of the training loop: batch composition by the roles, backward starts, the schedule,
the mass-covering term and its warm start."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rtb_ray.batches import InlineBatches
from rtb_ray.config import (ConfigError, ExploreConfig, MassCoveringConfig, ObjectiveConfig,
                            TrainConfig, load_config)
from rtb_ray.learner import Learner
from rtb_ray.loop import prepare, resampled_prior_terminals, train
from rtb_ray.replay import ReplayStore
from rtb_ray.roles import ROLES, RolloutContext, training_mixture
from rtb_ray.rollout import Sampler
from rtb_ray.trajectory import Source, TrajectoryBatch


def test_training_mixture_splits_the_batch_exactly_by_role(gaussian_task):
    from test_cli import CONFIG

    cfg = load_config(CONFIG, ["train.sources={posterior: 0.5, prior: 0.25, backward: 0.25}",
                               "replay.recency_half_life=null"])
    store = ReplayStore(None)
    net = gaussian_task.prior()
    sampler = Sampler(gaussian_task, net, net)
    for source in (Source.POSTERIOR, Source.EXPLORE, Source.PRIOR, Source.BACKWARD):
        terminal = torch.zeros(50, 1) if source == Source.BACKWARD else None
        store.insert(sampler.rollout(source, 50, terminal=terminal, explore=0.1 * (
            source == Source.EXPLORE))).raise_for_status()
    counts = torch.bincount(store.sample(255, sampler=training_mixture(cfg)).source.long(),
                            minlength=4)
    # posterior and explore rows are one role's pool
    assert counts.sum() == 255 and counts[0] + counts[1] in (127, 128)
    assert counts[2] in (63, 64) and counts[3] in (63, 64)
    only = load_config(CONFIG, ["train.sources={posterior: 1.0, prior: 0.0}"])
    assert set(store.sample(7, sampler=training_mixture(only)).source.tolist()) <= {0, 1}


def test_explore_schedule_anneals_then_holds():
    ex = ExploreConfig(start=0.4, end=0.1, anneal_fraction=0.5)
    assert ex.at(0.0) == 0.4 and abs(ex.at(0.25) - 0.25) < 1e-12
    assert abs(ex.at(0.5) - 0.1) < 1e-12 and abs(ex.at(0.9) - 0.1) < 1e-12


def backward_starts(gaussian_task, batch: TrajectoryBatch, beta: float, n: int = 20_000):
    """The terminal states the backward role starts from, with ``batch`` in the store."""
    from test_cli import CONFIG

    cfg = load_config(CONFIG, [f"train.objective.beta={beta}", "train.backward_candidates=1"])
    store = ReplayStore(None)
    store.insert(batch).raise_for_status()
    net = gaussian_task.prior()
    context = RolloutContext(Sampler(gaussian_task, net, net), cfg,
                             torch.Generator().manual_seed(0),
                             read_store=lambda k, rows: store.sample(k, sampler=rows,
                                                                     rate_limited=False))
    made = ROLES["backward"].rollout(context, n)
    assert (made.source == Source.BACKWARD).all()
    return made.terminal


def test_backward_starts_resample_in_proportion_to_reward_and_skip_non_finite(gaussian_task):
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    states = torch.cat([torch.zeros(4, 50, 1), x[:, None]], 1)
    log_reward = torch.tensor([0.0, 1.0, float("nan"), -float("inf")])
    batch = TrajectoryBatch.make(states, log_reward, torch.zeros(4), torch.zeros(4), Source.PRIOR)
    draws = backward_starts(gaussian_task, batch, beta=1.0)
    assert set(draws[:, 0].tolist()) <= {0.0, 1.0}  # non-finite rewards never enter
    share_one = (draws[:, 0] == 1.0).double().mean().item()
    assert abs(share_one - torch.e / (1 + torch.e)) < 0.02  # ∝ r: e¹ against e⁰, r = 0 never


def test_backward_starts_weight_posterior_rows_by_target_over_behaviour(gaussian_task):
    # Two posterior rows whose sampler already put r^β into them (log q = log p_prior + β log r
    # − log Z): their importance weights are equal, so resampling must not favour the higher
    # reward again (∝ r^β would pick row 1 e² times as often as row 0).
    x = torch.tensor([[0.0], [1.0]])
    states = torch.cat([torch.zeros(2, 50, 1), x[:, None]], 1)
    log_reward, log_prior = torch.tensor([0.0, 1.0]), torch.tensor([-3.0, -3.0])
    log_behaviour = log_prior + 2.0 * log_reward - 0.7
    batch = TrajectoryBatch.make(states, log_reward, log_prior, log_behaviour, Source.POSTERIOR)
    draws = backward_starts(gaussian_task, batch, beta=2.0)
    assert abs((draws[:, 0] == 1.0).double().mean().item() - 0.5) < 0.02


def test_resampled_prior_terminals_are_samples_of_the_target(gaussian_task):
    # prior N(0, 1) tilted by the likelihood: the exact posterior is N(0.75, 0.5)
    x, info = resampled_prior_terminals(gaussian_task, gaussian_task.prior(), 20_000,
                                        ObjectiveConfig(beta=1.0), torch.Generator().manual_seed(0))
    assert x.shape == (20_000, 1)
    assert abs(x.mean().item() - gaussian_task.post_mean.item()) < 0.03
    assert abs(x.var().item() - gaussian_task.post_var) < 0.04
    assert 0.5 < info["ess_fraction"] < 0.9 and 5_000 < info["distinct"] < 20_000
    # β = 2 is the tilt by r²: the posterior with half the likelihood's variance
    x2, _ = resampled_prior_terminals(gaussian_task, gaussian_task.prior(), 20_000,
                                      ObjectiveConfig(beta=2.0), torch.Generator().manual_seed(0))
    assert abs(x2.mean().item() - 1.0) < 0.03  # v = 1/(1 + 2) = 1/3, m = v·2·1.5 = 1


def learner_grads(task, weight: float, batch, targets, state) -> list[torch.Tensor]:
    """The gradients one learner step accumulates (the optimiser step skipped)."""
    cfg = TrainConfig(steps=10, batch_size=64, objective=ObjectiveConfig(kind="vargrad"),
                      mass_covering=MassCoveringConfig(weight=weight, batch_size=32))
    learner = Learner(task.family, task.prior(), cfg)
    learner.target_terminals = targets
    learner.generator.set_state(state)
    learner.optimizer.step = lambda *args, **kwargs: None
    stats = learner.step(batch)
    assert ("mass_covering_loss" in stats) == (weight > 0)
    return [p.grad.clone() for p in learner.trainable]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_mass_covering_adds_its_weighted_denoising_gradient(gaussian_task):
    gen = torch.Generator().manual_seed(0)
    net = gaussian_task.prior()
    torch.nn.init.normal_(net.trunk[-1].weight, std=0.1)  # a drift that is not zero everywhere
    gaussian_task.prior = lambda: copy.deepcopy(net)
    batch = Sampler(gaussian_task, net, net).rollout(Source.PRIOR, 64, generator=gen)
    targets = gaussian_task.sample_posterior(500, gen)
    state = torch.Generator().manual_seed(3).get_state()
    plain = learner_grads(gaussian_task, 0.0, batch, targets, state)
    mixed = learner_grads(gaussian_task, 2.5, batch, targets, state)
    # the same term by hand: the learner draws its rows, then the loss's noise, from its generator
    g = torch.Generator().set_state(state)
    posterior = copy.deepcopy(net).requires_grad_(True)
    x = targets[torch.randint(0, 500, (32,), generator=g)]
    fit = gaussian_task.family.pretrain_loss(posterior, x, g)
    by_hand = torch.autograd.grad(fit, [p for p in posterior.parameters()])
    assert any(h.abs().max() > 1e-4 for h in by_hand)
    for p, m, h in zip(plain, mixed, by_hand):
        torch.testing.assert_close(m - p, 2.5 * h, rtol=1e-4, atol=1e-5)


def test_warm_start_alone_fits_the_target_samples(gaussian_task):
    cfg = TrainConfig(steps=10, mass_covering=MassCoveringConfig(batch_size=256))
    learner = Learner(gaussian_task.family, gaussian_task.prior(), cfg)
    gen = torch.Generator().manual_seed(0)
    learner.target_terminals = gaussian_task.sample_posterior(20_000, gen)
    losses = learner.warm_start(300, 3e-3)
    assert losses[-1] < losses[0]
    x = gaussian_task.family.sample(learner.posterior, 20_000, generator=gen)[0][:, -1]
    assert abs(x.mean().item() - gaussian_task.post_mean.item()) < 0.05
    assert learner.step_count == 0  # the RTB steps, and the policy versions, start after it


def in_process(cfg, output, resume: bool = False):
    run = prepare(cfg, output, resume=resume)
    batches = InlineBatches(cfg, Sampler(run.task, run.learner.prior, run.learner.posterior))
    run.run_dir.start()
    return run, batches


def test_in_process_run_with_mass_covering_warm_starts_once_and_resumes(tmp_path, cache, monkeypatch):
    from test_cli import CONFIG, TINY

    monkeypatch.setenv("RTB_RAY_CACHE", str(cache))
    with pytest.raises(ConfigError, match="train.mass_covering.first_steps: 21 is more than"):
        prepare(load_config(CONFIG, [*TINY, "train.mass_covering.weight=1",
                                     "train.mass_covering.first_steps=21"]),
                tmp_path / "bad", resume=False)
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    overrides = [*TINY, "train.mass_covering.weight=2.0", "train.mass_covering.num_samples=2000",
                 "train.mass_covering.warm_start_steps=30", "tracking.enabled=false"]
    half = load_config(CONFIG, [*overrides, "train.steps=10"])
    run_dir = tmp_path / "run"
    run, batches = in_process(half, run_dir)
    prior_state = copy.deepcopy(run.learner.prior.state_dict())
    train(run, batches, progress=False)  # the warm start is the loop's first phase
    info = json.loads((run_dir / "mass_covering.json").read_text())
    assert info["warm_start_steps"] == 30 and 0 < info["distinct"] <= 2000
    assert any(not torch.equal(run.learner.posterior.state_dict()[k], v)
               for k, v in prior_state.items())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mass_covering_loss"] > 0 for r in rows if r["kind"] == "train")
    saved = copy.deepcopy(run.learner.posterior.state_dict())
    targets = run.learner.target_terminals

    again, batches = in_process(load_config(CONFIG, overrides), run_dir, resume=True)
    for k, v in again.learner.posterior.state_dict().items():  # the checkpoint's
        assert torch.equal(v, saved[k]), k
    assert train(again, batches, progress=False)["step"] == 20
    assert "warm_start_steps" not in json.loads((run_dir / "mass_covering.json").read_text())
    assert torch.equal(again.learner.target_terminals, targets)  # the same samples, drawn again


def test_a_learner_that_dies_at_its_first_batch_leaves_a_step_0_checkpoint(tmp_path, cache,
                                                                          monkeypatch):
    """So a dead learner can be restarted, and a killed run resumed, from the start."""
    from test_cli import CONFIG, TINY

    monkeypatch.setenv("RTB_RAY_CACHE", str(cache))
    run, batches = in_process(load_config(CONFIG, [*TINY, "tracking.enabled=false"]),
                              tmp_path / "run")

    def dies(learner):  # type: ignore[no-untyped-def]
        raise RuntimeError("the learner's node went away")

    monkeypatch.setattr(batches, "next_batch", dies)
    with pytest.raises(RuntimeError, match="node went away"):
        train(run, batches, progress=False)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["learner"]["step"] == 0
    again, batches = in_process(load_config(CONFIG, [*TINY, "tracking.enabled=false"]),
                                tmp_path / "run", resume=True)
    assert train(again, batches, progress=False)["step"] == again.cfg.train.steps


def test_a_signal_during_a_finaliser_still_stops_the_loop():
    """Ctrl-C raised as KeyboardInterrupt inside a ``__del__`` is printed and dropped by
    CPython; as a flag it cannot be lost. A second signal raises, and the handlers go back."""
    import os
    import signal
    import threading

    from rtb_ray.loop import stop_on_signals

    class SignalledWhileFinalised:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # bytecode: the handler runs here, inside the finaliser

    stop = threading.Event()
    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals(stop):
        SignalledWhileFinalised()
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))
    assert signal.getsignal(signal.SIGINT) is before
