"""The Pendulum task (issue #17, Tier B): scripted data, references, bad input, a tiny run."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from pipelines.pendulum import (DATASETS, EPISODE_STEPS, EXPERT_RETURN, MAX_TORQUE,
                                RANDOM_RETURN, Config, PendulumTask,
                                episode_returns, generate_dataset, normalized_score,
                                reference_returns, run_episodes, scripted_policy)
from rtb_ray.config import ConfigError, load_config
from rtb_ray.loop import check_config_for_task
from rtb_ray.offline_rl import D4RL_KEYS, write_d4rl_npz
from test_cli import ROOT, rtb_ray, sets

CONFIG = ROOT / "pipelines" / "configs" / "pendulum.yaml"
# a prior and critic that train in seconds on a few episodes
TINY = dict(num_episodes=6, num_steps=8, hidden=32, depth=1, num_eval_states=4, eval_episodes=3,
            pretrain={"steps": 40, "batch_size": 128, "stats_samples": 128},
            critic={"steps": 40, "batch_size": 64, "hidden": 32})


def dataset_digest(data: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays: a generated dataset's identity."""
    h = hashlib.sha256()
    for k in D4RL_KEYS:
        h.update(np.ascontiguousarray(data[k]).tobytes())
    return h.hexdigest()

pytestmark = pytest.mark.usefixtures("one_thread", "cache_dir")  # conftest.py


def tiny_task(tmp_path, **changes) -> PendulumTask:
    return PendulumTask(Config(**{**TINY, "prior_checkpoint": str(tmp_path / "prior.pt"),
                                  **changes}))


def test_reference_returns_are_what_the_frozen_constants_say():
    random, expert = reference_returns()
    assert random == pytest.approx(RANDOM_RETURN, abs=0.01)
    assert expert == pytest.approx(EXPERT_RETURN, abs=0.01)
    assert normalized_score(np.array([RANDOM_RETURN, EXPERT_RETURN])) == pytest.approx([0, 100])


@pytest.mark.parametrize("kind", [k for k in DATASETS if k != "medium-expert"])
def test_generated_data_is_d4rl_keyed_bounded_and_deterministic_per_seed(kind):
    data = generate_dataset(kind, 4, seed=3)
    n = 4 * EPISODE_STEPS
    assert {k: data[k].shape for k in D4RL_KEYS} == {
        "observations": (n, 3), "actions": (n, 1), "rewards": (n,), "next_observations": (n, 3),
        "terminals": (n,), "timeouts": (n,)}
    assert np.abs(data["actions"]).max() <= MAX_TORQUE and not data["terminals"].any()
    assert data["timeouts"].reshape(4, -1)[:, -1].all() and data["timeouts"].sum() == 4
    # consecutive rows of an episode chain: s' of one step is s of the next
    assert np.array_equal(data["next_observations"].reshape(4, -1, 3)[:, :-1],
                          data["observations"].reshape(4, -1, 3)[:, 1:])
    assert dataset_digest(data) == dataset_digest(generate_dataset(kind, 4, seed=3))
    assert dataset_digest(data) != dataset_digest(generate_dataset(kind, 4, seed=4))


def test_dataset_qualities_are_ordered():
    """The scripted behaviours score as their names say: the expert near 100, random near 0,
    the medium ones between, replay below medium."""
    score = {k: normalized_score(generate_dataset(k, 50, 0)["rewards"].reshape(50, -1).sum(1)
                                 ).mean() for k in ("random", "medium-replay", "medium",
                                                    "expert")}
    assert score["expert"] > 90 and abs(score["random"]) < 10, score
    assert 10 < score["medium-replay"] < score["medium"] < 70, score


def test_the_bimodal_behaviour_kicks_both_ways_from_the_same_states():
    """Low-energy, slow states: the actions of the two coins' episodes differ in sign."""
    rng = np.random.default_rng(0)
    policy = scripted_policy("bimodal", 2, rng)
    policy.kick, policy.noise = np.array([-1.0, 1.0]), np.zeros(2)
    bottom = np.array([[-1.0, 0.0, 0.2], [-1.0, 0.0, 0.2]])
    a = policy(bottom, rng)[:, 0]
    assert a[0] < -1 and a[1] > 1


def test_a_failed_episode_is_counted_never_averaged():
    def policy(obs):
        a = np.zeros((obs.shape[0], 1))
        a[1] = np.nan  # episode 1's torque: its state becomes NaN
        return a

    episodes = run_episodes(policy, 3, seed=0)
    assert episodes.failed.tolist() == [False, True, False]
    assert np.isfinite(episodes.returns).all() and episodes.scores().shape == (2,)


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def good_arrays() -> dict[str, np.ndarray]:
    return generate_dataset("medium", 1, seed=0)


@pytest.mark.parametrize("change,expected", [
    (lambda d: d.pop("timeouts"), "missing key 'timeouts'"),
    (lambda d: d["rewards"].__setitem__(7, np.nan), "'rewards'.*row 7"),
    (lambda d: d.__setitem__("observations", d["observations"][:, :2]), "'observations'.*3"),
    (lambda d: d["actions"].__setitem__((4, 0), 2.5), "'actions'.*row 4"),
])
def test_bad_data_is_refused_in_one_line_naming_key_and_row(tmp_path, cache_dir, change,
                                                            expected):
    data = good_arrays()
    change(data)
    path = write_npz(tmp_path / "data.npz", **data)
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [f"task.dataset={path}"])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"task: dataset {path}"), message
    assert re.search(expected, message), message
    assert not cache_dir.exists()  # refused before anything was generated, trained or cached


def test_a_dataset_that_is_neither_a_name_nor_a_file_is_refused():
    with pytest.raises(ConfigError, match="dataset: 'medium-reply' is neither one of"):
        load_config(CONFIG, ["task.dataset=medium-reply"])


def test_a_dataset_file_is_what_the_prior_learns_from(tmp_path):
    data = good_arrays()
    path = tmp_path / "mine.npz"
    write_d4rl_npz(path, data)
    task = tiny_task(tmp_path, dataset=str(path))
    assert np.array_equal(task.data()["observations"], data["observations"])
    assert "dataset_sha256" in task.config.spec()  # the file's digest names the prior


def test_a_d4rl_hdf5_file_feeds_the_task(tmp_path):
    """A D4RL-keyed HDF5 file (with D4RL's extra ``infos/`` group) is a dataset like any."""
    h5py = pytest.importorskip("h5py")
    data = good_arrays()
    path = tmp_path / "pendulum-medium-v0.hdf5"
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=value)
        f.create_dataset("infos/qpos", data=np.zeros((data["rewards"].shape[0], 1)))
    cfg = load_config(CONFIG, [f"task.dataset={path}"])
    task = PendulumTask(cfg.task.model_copy(update={"prior_checkpoint": str(tmp_path / "p.pt")}))
    assert all(np.array_equal(task.data()[k], data[k]) for k in D4RL_KEYS)


def test_the_prior_checkpoint_holds_prior_critic_and_figures(tmp_path, cache_dir):
    task = tiny_task(tmp_path)
    stats = task.pretrain(progress=False)
    assert stats["prior_samples"].shape == (4, 128, 1)
    assert np.isfinite(stats["prior_score"]) and stats["num_transitions"] == 6 * EPISODE_STEPS
    # the generated data went to the cache, not the run
    assert [p.name for p in (cache_dir / "pendulum" / "data").iterdir()] == \
        ["medium-replay-e6-s0-v1.npz"]
    fresh = tiny_task(tmp_path)
    states = fresh.eval_conditions()
    x = torch.zeros(4, 1)
    q = fresh.log_reward(x, states)
    assert q.shape == (4,) and torch.isfinite(q).all()
    log_z = fresh.reference_log_z(1.0, states)
    prior_q = fresh.critic().q(states.repeat_interleave(128, 0),
                               2 * fresh.stats["prior_samples"].reshape(-1, 1).tanh()).view(4, -1)
    assert torch.allclose(log_z.float(), prior_q.logsumexp(1) - np.log(128), atol=1e-5)
    # the prior's own samples are 1 by definition; the target's (SIR from them) near 0
    m = fresh.evaluate(fresh.stats["prior_samples"].reshape(-1, 1),
                       states.repeat_interleave(128, 0))
    assert m["q_gap_ratio"] == pytest.approx(1, abs=1e-4), m
    gen = torch.Generator().manual_seed(0)
    picks = torch.multinomial(prior_q.double().softmax(1), 4096, replacement=True,
                              generator=gen)
    target = torch.stack([fresh.stats["prior_samples"][i, picks[i]] for i in range(4)])
    m = fresh.evaluate(target.reshape(-1, 1), states.repeat_interleave(4096, 0))
    assert m["q_gap_ratio"] < 0.3, m
    with pytest.raises(ValueError, match="states of dimension 2; Pendulum-v1's are 3"):
        fresh.log_reward(x, torch.zeros(4, 2))


def test_a_prior_of_another_state_dimension_is_refused(tmp_path):
    from pipelines.bandit_gmm import BanditGMMTask, Config as BanditConfig

    other = BanditGMMTask(BanditConfig(num_steps=8, hidden=32, depth=1, num_data=500,
                                       num_eval_states=2, prior_checkpoint=str(tmp_path / "b.pt"),
                                       pretrain={"steps": 5, "batch_size": 64,
                                                 "stats_samples": 100}))
    other.pretrain(progress=False)
    task = tiny_task(tmp_path, prior_checkpoint=str(tmp_path / "b.pt"))
    with pytest.raises(ValueError, match=re.escape(
            f"prior_checkpoint {tmp_path / 'b.pt'}: a prior over states of dimension 2; "
            f"Pendulum-v1's are 3 (refused)")):
        task.prior()


def test_the_config_passes_the_checks():
    cfg = load_config(CONFIG)
    assert (cfg.train.objective.kind, cfg.train.group_size) == ("vargrad", 16)
    assert set(cfg.train.sources) == {"posterior", "prior", "dataset"}
    check_config_for_task(cfg, PendulumTask(cfg.task))


SMALL = ["train.steps=10", "train.log_every_steps=5", "train.batch_size=64",
         "eval.every_steps=10", "eval.num_samples=256", "eval.final_num_samples=256",
         "checkpoint_every_steps=10", "runtime.rollout_batch_size=64", "replay.capacity=4096",
         "replay.min_size_to_sample=128", "tracking.enabled=false",
         *(f"task.{k}={json.dumps(v)}" for k, v in TINY.items())]


def test_a_tiny_run_writes_scores_and_a_rollout_picture(tmp_path):
    run = tmp_path / "run"
    rtb_ray("train", str(CONFIG), "--in-process", "--no-progress", "--output", str(run),
            *sets(SMALL + ["torch_threads=1"]), cache=tmp_path, check=True)
    final = json.loads((run / "final_eval.json").read_text())
    for key in ("score", "score_std", "q_gap_ratio", "log_z_error_max", "prior_score"):
        assert np.isfinite(final[key]), key
    assert final["failed_episodes"] == 0
    assert (run / "eval" / "step_10.png").stat().st_size > 0


# -- Tier C: D4RL's MuJoCo locomotion, behind task.env --------------------------------------------
D4RL_CONFIG = ROOT / "pipelines" / "configs" / "d4rl.yaml"


def hopper_like(lengths=(30, 50), seed=0) -> dict[str, np.ndarray]:
    """D4RL-keyed transitions shaped as hopper's: episode 0 ends by a terminal (a fall), the
    others by a timeout."""
    rng = np.random.default_rng(seed)
    parts = []
    for i, n in enumerate(lengths):
        obs = rng.normal(size=(n + 1, 11)).astype(np.float32)
        end = np.zeros(n, dtype=bool)
        end[-1] = True
        parts.append({"observations": obs[:-1], "next_observations": obs[1:],
                      "actions": rng.uniform(-1, 1, (n, 3)).astype(np.float32),
                      "rewards": rng.normal(1, 0.1, n).astype(np.float32),
                      "terminals": end if i == 0 else ~end & end,
                      "timeouts": ~end & end if i == 0 else end})
    return {k: np.concatenate([p[k] for p in parts]) for k in D4RL_KEYS}


def write_hdf5(path, data):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=value)
    return path


def test_generated_datasets_are_pendulum_only():
    with pytest.raises(ConfigError, match="dataset: 'medium-replay' is generated for pendulum "
                                          "only; env hopper needs d4rl:<file> or minari:<dir>"):
        load_config(CONFIG, ["task.env=hopper"])


def test_a_hopper_file_of_pendulum_shape_is_refused(tmp_path):
    path = write_hdf5(tmp_path / "pendulum.hdf5", good_arrays())
    with pytest.raises(ConfigError, match="'observations'.*11"):
        load_config(D4RL_CONFIG, [f"task.dataset=d4rl:{path}"])


def test_episode_returns_split_at_terminals_and_timeouts():
    data = hopper_like((3, 4))
    expected = [data["rewards"][:3].sum(), data["rewards"][3:].sum()]
    assert episode_returns(data) == pytest.approx(expected, rel=1e-6)


def test_a_minari_dataset_feeds_the_task(tmp_path):
    """Minari's layout (an episode per group, T + 1 observations) becomes D4RL's rows."""
    h5py = pytest.importorskip("h5py")
    data = good_arrays()  # one 200-step episode: split in two
    (tmp_path / "ds" / "data").mkdir(parents=True)
    with h5py.File(tmp_path / "ds" / "data" / "main_data.hdf5", "w") as f:
        for i, rows in enumerate((slice(0, 80), slice(80, 200))):
            g = f.create_group(f"episode_{i}")
            obs = data["observations"][rows]
            g.create_dataset("observations", data=np.concatenate(
                [obs, data["next_observations"][rows][-1:]]))
            g.create_dataset("actions", data=data["actions"][rows])
            g.create_dataset("rewards", data=data["rewards"][rows])
            g.create_dataset("terminations", data=data["terminals"][rows])
            g.create_dataset("truncations", data=np.arange(obs.shape[0]) == obs.shape[0] - 1)
    task = tiny_task(tmp_path, dataset=f"minari:{tmp_path / 'ds'}")
    assert task.config.dataset == f"minari:{tmp_path / 'ds'}"
    for key in ("observations", "actions", "rewards", "next_observations"):
        assert np.array_equal(task.data()[key], data[key]), key
    assert task.data()["timeouts"].sum() == 2


def test_a_tiny_hopper_run_trains_on_a_d4rl_file_and_rolls_out_in_mujoco(tmp_path):
    pytest.importorskip("mujoco")
    path = write_hdf5(tmp_path / "hopper_medium-v2.hdf5", hopper_like())
    cfg = load_config(D4RL_CONFIG, [f"task.dataset=d4rl:{path}"])
    assert (cfg.task.env, cfg.train.objective.beta, cfg.train.group_size) == ("hopper", 10, 64)
    check_config_for_task(cfg, PendulumTask(cfg.task))
    run = tmp_path / "run"
    rtb_ray("train", str(D4RL_CONFIG), "--in-process", "--no-progress", "--output", str(run),
            *sets(SMALL + [f"task.dataset=d4rl:{path}", "train.group_size=16",
                           "runtime.workers={posterior: 1, prior: 1, dataset: 1}",
                           "runtime.learner_num_gpus=0", "torch_threads=1"]),
            cache=tmp_path, check=True)
    final = json.loads((run / "final_eval.json").read_text())
    assert np.isfinite(final["score"]) and final["failed_episodes"] == 0
    assert np.isfinite(final["q_gap_ratio"])
    assert (run / "eval" / "step_10.png").stat().st_size > 0
