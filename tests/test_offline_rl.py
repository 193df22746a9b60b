"""Offline RL machinery (rtb_ray/offline_rl.py): the D4RL data checks and readers (D4RL
.hdf5, .npz and Minari), IQL on
problems whose Q and V are known, BC and AWR policies, and seeded determinism."""

from __future__ import annotations

import copy
import hashlib

import h5py
import numpy as np
import pytest
import torch

from rtb_ray.offline_rl import (D4RL_KEYS, GaussianPolicy, check_d4rl, read_d4rl_hdf5,
                                read_d4rl_npz, read_minari_hdf5, train_awr, train_bc, train_iql,
                                write_d4rl_npz)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SMALL = dict(hidden=64, depth=2, progress=False)


def d4rl_data(n: int = 20, obs_dim: int = 3, action_dim: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "observations": rng.normal(size=(n, obs_dim)),
        "actions": rng.uniform(-1, 1, size=(n, action_dim)),
        "rewards": rng.normal(size=n),
        "next_observations": rng.normal(size=(n, obs_dim)),
        "terminals": rng.uniform(size=n) < 0.1,
        "timeouts": np.arange(n) % 10 == 9,
    }


def bandit_data(n: int = 4096, seed: int = 0) -> dict:
    """One-step bandit: s, a ~ U[-1, 1], r = −(a − s)², every step terminal: Q = r."""
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-1, 1, size=(n, 1))
    act = rng.uniform(-1, 1, size=(n, 1))
    return check_d4rl("bandit", {
        "observations": obs, "actions": act, "rewards": -((act - obs) ** 2)[:, 0],
        "next_observations": rng.uniform(-1, 1, size=(n, 1)),
        "terminals": np.ones(n, bool), "timeouts": np.zeros(n, bool)})


def one_line_error(where: str, call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(where), msg
    return msg


# -- check_d4rl --------------------------------------------------------------------------------
def test_check_d4rl_returns_float32_arrays_and_bool_flags():
    data = d4rl_data()
    data["rewards"] = data["rewards"][:, None]  # [N, 1] is D4RL-like too
    data["terminals"] = data["terminals"].astype(np.float64)
    out = check_d4rl("d", data, obs_dim=3, action_dim=2, action_bound=1.0)
    assert set(out) == set(D4RL_KEYS)
    assert out["observations"].dtype == np.float32 and out["observations"].shape == (20, 3)
    assert out["actions"].shape == (20, 2) and out["next_observations"].shape == (20, 3)
    assert out["rewards"].shape == (20,) and out["rewards"].dtype == np.float32
    assert out["terminals"].dtype == bool and out["timeouts"].dtype == bool
    np.testing.assert_allclose(out["rewards"], data["rewards"][:, 0], rtol=1e-6)
    np.testing.assert_array_equal(out["terminals"], data["terminals"] == 1)
    # the caller's arrays are not shared
    out["observations"][0] = 123.0
    assert data["observations"][0, 0] != 123.0


def _set(key, row, value):
    def change(data):
        data[key] = data[key].astype(np.float64)
        data[key][row] = value
    return change


def _replace(key, make):
    def change(data):
        data[key] = make(data[key])
    return change


BAD_INPUTS = [
    ("missing key", lambda d: d.pop("timeouts"), {}, ["'timeouts'", "it has:", "rewards"]),
    ("nan reward", _set("rewards", 7, np.nan), {}, ["'rewards'", "row 7", "finite"]),
    ("inf observation", _set("observations", 4, np.inf), {}, ["'observations'", "row 4"]),
    ("beyond float32", _set("next_observations", 5, 1e300), {}, ["'next_observations'",
                                                                "row 5"]),
    ("wrong obs width", lambda d: None, {"obs_dim": 4}, ["'observations'", "(20, 3)",
                                                         "(N, 4)"]),
    ("next obs width", _replace("next_observations", lambda v: v[:, :2]), {},
     ["'next_observations'", "(20, 2)", "(N, 3)"]),
    ("actions 1-d", _replace("actions", lambda v: v[:, 0]), {}, ["'actions'", "(20,)"]),
    ("rewards 2 wide", _replace("rewards", lambda v: np.stack([v, v], 1)), {},
     ["'rewards'", "(20, 2)", "(N,) or (N, 1)"]),
    ("row count", _replace("terminals", lambda v: v[:-1]), {}, ["'terminals'", "19 rows",
                                                                "'observations' has 20"]),
    ("no rows", lambda d: d.update({k: v[:0] for k, v in d.items()}), {}, ["no rows"]),
    ("action out of bounds", _set("actions", 3, 1.5), {"action_bound": 1.0},
     ["'actions'", "row 3", "outside"]),
    ("object array", _replace("actions", lambda v: v.astype(object)), {},
     ["'actions'", "dtype object"]),
    ("string array", _replace("rewards", lambda v: v.astype(str)), {}, ["'rewards'", "dtype"]),
    ("terminal not 0/1", _set("terminals", 2, 0.5), {}, ["'terminals'", "row 2", "0 or 1"]),
]


@pytest.mark.parametrize("change, kwargs, words", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_check_d4rl_refuses_bad_input_in_one_line(change, kwargs, words):
    data = d4rl_data()
    change(data)
    before = copy.deepcopy(data)
    msg = one_line_error("bad data", lambda: check_d4rl("bad data", data, **kwargs))
    for word in words:
        assert word in msg, msg
    assert data.keys() == before.keys()
    for key in data:
        assert data[key].dtype == before[key].dtype
        np.testing.assert_array_equal(data[key], before[key])


def test_check_d4rl_accepts_actions_exactly_on_the_bound():
    data = d4rl_data()
    data["actions"][0] = [1.0, -1.0]
    assert check_d4rl("d", data, action_bound=1.0)["actions"][0].tolist() == [1.0, -1.0]


# -- files -------------------------------------------------------------------------------------
def test_read_d4rl_hdf5_returns_what_was_written_and_ignores_infos(tmp_path):
    data = d4rl_data(n=30)
    path = tmp_path / "hopper-medium-v2.hdf5"
    with h5py.File(path, "w") as h5:
        for key, value in data.items():
            h5.create_dataset(key, data=value)
        h5.create_dataset("infos/qpos", data=np.zeros((30, 6)))
        h5.create_dataset("infos/notes", data=np.array([b"a", b"b"], dtype=object),
                          dtype=h5py.string_dtype())
    out, digest = read_d4rl_hdf5(path, obs_dim=3, action_dim=2, action_bound=1.0)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(out) == set(D4RL_KEYS)
    for key in D4RL_KEYS:
        np.testing.assert_array_equal(out[key], data[key].astype(out[key].dtype))

    # the checks run on the file's arrays too
    msg = one_line_error(f"dataset {path}", lambda: read_d4rl_hdf5(path, obs_dim=4))
    assert "'observations'" in msg


def test_read_d4rl_hdf5_refuses_a_missing_key_and_a_non_hdf5_file(tmp_path):
    path = tmp_path / "partial.hdf5"
    with h5py.File(path, "w") as h5:
        for key, value in d4rl_data().items():
            if key != "timeouts":
                h5.create_dataset(key, data=value)
        h5.create_dataset("infos/qpos", data=np.zeros((20, 6)))
    msg = one_line_error(f"dataset {path}", lambda: read_d4rl_hdf5(path))
    assert "'timeouts'" in msg and "infos/" in msg

    not_hdf5 = tmp_path / "data.hdf5"
    not_hdf5.write_bytes(b"this is not an HDF5 file\n" * 10)
    msg = one_line_error(f"dataset {not_hdf5}", lambda: read_d4rl_hdf5(not_hdf5))
    assert "HDF5" in msg
    one_line_error(f"dataset {tmp_path / 'absent.hdf5'}",
                   lambda: read_d4rl_hdf5(tmp_path / "absent.hdf5"))


def test_write_and_read_d4rl_npz_round_trip(tmp_path):
    data = check_d4rl("d", d4rl_data())
    path = tmp_path / "sub" / "data.npz"
    write_d4rl_npz(path, data)
    assert [p.name for p in path.parent.iterdir()] == ["data.npz"]  # no temporary left over
    out, digest = read_d4rl_npz(path, obs_dim=3, action_dim=2)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    for key in D4RL_KEYS:
        assert out[key].dtype == data[key].dtype
        np.testing.assert_array_equal(out[key], data[key])


def test_npz_files_that_are_not_d4rl_are_refused_in_one_line(tmp_path):
    text = tmp_path / "text.npz"
    text.write_text("hello\n")
    assert "not an .npz" in one_line_error(f"dataset {text}", lambda: read_d4rl_npz(text))

    single = tmp_path / "single.npz"
    with single.open("wb") as f:
        np.save(f, np.zeros(3))
    assert "one .npy" in one_line_error(f"dataset {single}", lambda: read_d4rl_npz(single))

    pickled = tmp_path / "pickled.npz"
    data = d4rl_data()
    data["actions"] = data["actions"].astype(object)
    np.savez(pickled, **data)  # np.savez pickles it; the reader must not unpickle it
    assert "'actions'" in one_line_error(f"dataset {pickled}", lambda: read_d4rl_npz(pickled))

    with pytest.raises(ValueError, match="'actions'"):
        write_d4rl_npz(tmp_path / "out.npz", data)
    assert not (tmp_path / "out.npz").exists()


# -- IQL ---------------------------------------------------------------------------------------
IQL_FAST = dict(batch_size=256, lr=1e-3, polyak=0.05, seed=0, **SMALL)


@pytest.fixture(scope="module")
def bandit():
    return bandit_data()


@pytest.fixture(scope="module")
def bandit_critics(bandit):
    torch.set_num_threads(1)  # module-scoped: runs before the function-scoped one_thread
    return {tau: train_iql(bandit, steps=1500, expectile=tau, **IQL_FAST)[0]
            for tau in (0.5, 0.9)}


def grid(n: int = 41) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, a) on an n × n grid of [−1, 1]², each [n·n, 1]: row i·n + j is (s_i, a_j)."""
    x = torch.linspace(-1, 1, n)
    s, a = torch.meshgrid(x, x, indexing="ij")
    return s.reshape(-1, 1), a.reshape(-1, 1)


def test_iql_q_fits_a_one_step_bandit_and_v_is_an_expectile(bandit_critics):
    n = 41
    s, a = grid(n)
    r = -((a - s) ** 2).squeeze(-1)
    for critic in bandit_critics.values():
        q = critic.q(s, a)
        assert np.corrcoef(q.numpy(), r.numpy())[0, 1] > 0.95
        assert (q - r).abs().mean() < 0.1
        assert not q.requires_grad and not critic.training

    states = s.reshape(n, n)[:, 0:1]
    q_grid = {tau: c.q(s, a).reshape(n, n) for tau, c in bandit_critics.items()}
    v = {tau: c.value(states) for tau, c in bandit_critics.items()}
    # the expectile 0.5 is the mean over the data's (uniform) actions
    assert (v[0.5] - q_grid[0.5].mean(1)).abs().mean() < 0.1
    # a higher expectile lies above it, but below the max
    assert (v[0.9] - v[0.5]).mean() > 0.2
    assert (v[0.9] > q_grid[0.9].mean(1)).float().mean() > 0.9
    assert (v[0.9] < q_grid[0.9].max(1).values + 0.05).all()


def test_iql_bootstraps_through_timeouts_but_not_terminals():
    """Reward 1 everywhere, γ = 0.5, next states in (0, 1]: a terminal step (s < 0) is worth 1,
    a timeout step (s > 0) 1 + γ·V(s') = 2."""
    rng = np.random.default_rng(1)
    n = 2048
    obs = rng.uniform(-1, 1, size=(n, 1))
    data = check_d4rl("chain", {
        "observations": obs, "actions": rng.uniform(-1, 1, size=(n, 1)),
        "rewards": np.ones(n), "next_observations": rng.uniform(0, 1, size=(n, 1)),
        "terminals": obs[:, 0] < 0, "timeouts": obs[:, 0] >= 0})
    critic, stats = train_iql(data, steps=800, gamma=0.5, **IQL_FAST)
    assert set(stats) == {"q_loss", "v_loss", "seconds"} and stats["q_loss"] < 0.05
    s = torch.tensor([[-0.8], [-0.5], [-0.3], [0.3], [0.5], [0.8]])
    q = critic.q(s, torch.zeros(6, 1))
    torch.testing.assert_close(q[:3], torch.ones(3), atol=0.1, rtol=0)
    torch.testing.assert_close(q[3:], torch.full((3,), 2.0), atol=0.1, rtol=0)
    torch.testing.assert_close(critic.value(s), q, atol=0.1, rtol=0)


def test_iql_reward_scale_scales_q():
    data = bandit_data(n=1024)
    data["terminals"][:] = True
    critic, _ = train_iql(data, steps=400, reward_scale=10.0, **IQL_FAST)
    s, a = grid(11)
    r = -((a - s) ** 2).squeeze(-1)
    assert (critic.q(s, a) - 10 * r).abs().mean() < 1.0


def test_iql_is_deterministic_per_seed_and_leaves_the_global_rng_alone():
    data = bandit_data(n=512)
    rng_before = torch.get_rng_state()
    kwargs = dict(steps=30, hidden=16, depth=1, progress=False)
    first, _ = train_iql(data, seed=3, **kwargs)
    second, _ = train_iql(data, seed=3, **kwargs)
    other, _ = train_iql(data, seed=4, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())


# -- policies ----------------------------------------------------------------------------------
def test_bc_recovers_a_state_dependent_mean():
    rng = np.random.default_rng(2)
    n = 4096
    obs = rng.uniform(-1, 1, size=(n, 1))
    act = 0.5 * obs + 0.05 * rng.normal(size=(n, 1))
    data = check_d4rl("bc", {
        "observations": obs, "actions": act, "rewards": np.zeros(n),
        "next_observations": obs, "terminals": np.ones(n, bool), "timeouts": np.zeros(n, bool)})
    policy = train_bc(data, steps=800, lr=1e-3, **SMALL)
    s = torch.linspace(-0.9, 0.9, 19).unsqueeze(-1)
    mean = policy.act(s)
    assert (mean - 0.5 * s).abs().max() < 0.1
    _, log_std = policy.mean_log_std(s)
    assert log_std.exp().mean() < 0.2  # the noise is 0.05: the spread shrank from ~1


def test_awr_moves_the_mean_towards_the_best_action(bandit, bandit_critics):
    s = torch.linspace(-0.6, 0.6, 13).unsqueeze(-1)
    bc = train_bc(bandit, steps=600, lr=1e-3, action_bound=1.0, **SMALL)
    awr = train_awr(bandit, bandit_critics[0.9], steps=600, inverse_temperature=10.0, lr=1e-3,
                    action_bound=1.0, **SMALL)
    bc_error = (bc.act(s) - s).abs().mean()
    awr_error = (awr.act(s) - s).abs().mean()
    assert bc.act(s).abs().max() < 0.2  # uniform actions: BC's mean is near 0
    assert awr_error < 0.15 and awr_error < 0.5 * bc_error


def test_bounded_policy_log_prob_is_finite_on_the_bound_and_actions_stay_inside():
    policy = GaussianPolicy(2, 3, hidden=16, depth=1, action_bound=0.5)
    with torch.no_grad():
        policy.net[-1].bias.copy_(torch.tensor([50.0, -50.0, 0.0, 2.0, 2.0, 2.0]))
    obs = torch.zeros(4, 2)
    on_bound = torch.tensor([[0.5, -0.5, 0.5]]).expand(4, 3)
    log_prob = policy.log_prob(obs, on_bound)
    assert torch.isfinite(log_prob).all()
    mean = policy.act(obs)
    assert (mean.abs() <= 0.5).all() and mean[0, 0] > 0.49
    gen = torch.Generator().manual_seed(0)
    sample = policy.act(obs, deterministic=False, generator=gen)
    assert (sample.abs() <= 0.5).all() and not torch.equal(sample, mean)
    again = policy.act(obs, deterministic=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample, again)


# -- Minari datasets ---------------------------------------------------------------------------
MINARI_STEPS = {"episode_0": 4, "episode_2": 2, "episode_10": 5}  # 2 before 10: numeric order


def minari_episodes(obs_dim: int = 3, action_dim: int = 2, seed: int = 0) -> dict:
    """Minari-style episodes, keyed by group name, each observation row unique."""
    rng = np.random.default_rng(seed)
    episodes = {}
    for name, steps in MINARI_STEPS.items():
        terminations = np.zeros(steps, bool)
        truncations = np.zeros(steps, bool)
        (terminations if name == "episode_2" else truncations)[-1] = True
        episodes[name] = {
            "observations": rng.normal(size=(steps + 1, obs_dim)),
            "actions": rng.uniform(-1, 1, size=(steps, action_dim)).astype(np.float32),
            "rewards": rng.normal(size=steps),
            "terminations": terminations,
            "truncations": truncations,
        }
    return episodes


def write_minari(path, episodes: dict, *, observations_as_group: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5.attrs["total_steps"] = sum(len(e["actions"]) for e in episodes.values())
        for name, arrays in reversed(list(episodes.items())):  # stored order is not step order
            group = h5.create_group(name)
            group.attrs["id"] = int(name.split("_")[1])
            for key, value in arrays.items():
                group.create_dataset(key, data=value)
            group.create_dataset("infos/success", data=np.zeros(len(arrays["actions"]), bool))
        if observations_as_group is not None:
            episode = h5[observations_as_group]
            del episode["observations"]
            episode.create_dataset("observations/position", data=np.zeros((3, 2)))


def test_read_minari_hdf5_concatenates_episodes_in_numeric_order(tmp_path):
    episodes = minari_episodes()
    directory = tmp_path / "pendulum" / "expert-v0"
    file = directory / "data" / "main_data.hdf5"
    write_minari(file, episodes)
    (directory / "data" / "metadata.json").write_text("{}")

    order = ["episode_0", "episode_2", "episode_10"]
    expected = {
        "observations": np.concatenate([episodes[n]["observations"][:-1] for n in order]),
        "next_observations": np.concatenate([episodes[n]["observations"][1:] for n in order]),
        "actions": np.concatenate([episodes[n]["actions"] for n in order]),
        "rewards": np.concatenate([episodes[n]["rewards"] for n in order]),
        "terminals": np.concatenate([episodes[n]["terminations"] for n in order]),
        "timeouts": np.concatenate([episodes[n]["truncations"] for n in order]),
    }
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    for path in (directory, file):
        out, digest = read_minari_hdf5(path, obs_dim=3, action_dim=2, action_bound=1.0)
        assert digest == sha
        assert set(out) == set(D4RL_KEYS)
        for key in D4RL_KEYS:
            assert out[key].shape[0] == 11, key
            np.testing.assert_array_equal(out[key], expected[key].astype(out[key].dtype),
                                          err_msg=key)
        # within an episode each next observation is the following row's observation; across
        # an episode's end it is that episode's final observation, not the next one's first
        np.testing.assert_array_equal(out["next_observations"][:3], out["observations"][1:4])
        np.testing.assert_array_equal(out["next_observations"][3],
                                      episodes["episode_0"]["observations"][4].astype(np.float32))
        np.testing.assert_array_equal(out["observations"][4],
                                      episodes["episode_2"]["observations"][0].astype(np.float32))
        assert np.flatnonzero(out["terminals"]).tolist() == [5]
        assert np.flatnonzero(out["timeouts"]).tolist() == [3, 10]

    # the checks run on the converted arrays too
    msg = one_line_error(f"dataset {file}", lambda: read_minari_hdf5(directory, obs_dim=4))
    assert "'observations'" in msg and "(N, 4)" in msg


def _drop(name, key):
    def change(episodes):
        del episodes[name][key]
    return change


def _rows(name, key, rows):
    def change(episodes):
        episodes[name][key] = episodes[name][key][:rows]
    return change


MINARI_BAD = [
    ("missing rewards", _drop("episode_2", "rewards"), None,
     ["episode 'episode_2'", "missing key 'rewards'", "infos/"]),
    ("missing truncations", _drop("episode_10", "truncations"), None,
     ["episode 'episode_10'", "'truncations'"]),
    ("dict observations", lambda e: None, "episode_2",
     ["episode 'episode_2'", "'observations'", "not supported"]),
    ("observations as many rows as actions", _rows("episode_10", "observations", 5), None,
     ["episode 'episode_10'", "'observations'", "5 rows", "expected 6"]),
    ("observations two rows more", lambda e: e["episode_0"].update(
        observations=np.zeros((6, 3))), None,
     ["episode 'episode_0'", "'observations'", "6 rows", "expected 5"]),
    ("rewards short", _rows("episode_0", "rewards", 3), None,
     ["episode 'episode_0'", "'rewards'", "3 rows", "'actions' has 4"]),
    ("widths disagree", lambda e: e["episode_10"].update(observations=np.zeros((6, 4))), None,
     ["episode 'episode_10'", "'observations'", "(6, 4)", "'episode_0'"]),
    ("no episodes", lambda e: e.clear(), None, ["no 'episode_*' groups"]),
]


@pytest.mark.parametrize("change, dict_obs, words", [case[1:] for case in MINARI_BAD],
                         ids=[case[0] for case in MINARI_BAD])
def test_read_minari_hdf5_refuses_bad_episodes_in_one_line(tmp_path, change, dict_obs, words):
    episodes = minari_episodes()
    change(episodes)
    file = tmp_path / "data" / "main_data.hdf5"
    write_minari(file, episodes, observations_as_group=dict_obs)
    for path in (tmp_path, file):
        msg = one_line_error(f"dataset {file}", lambda: read_minari_hdf5(path))
        for word in words:
            assert word in msg, msg


def test_read_minari_hdf5_refuses_a_directory_without_data_and_a_non_hdf5_file(tmp_path):
    msg = one_line_error(f"dataset {tmp_path}:", lambda: read_minari_hdf5(tmp_path))
    assert "data/main_data.hdf5" in msg

    not_hdf5 = tmp_path / "data" / "main_data.hdf5"
    not_hdf5.parent.mkdir()
    not_hdf5.write_bytes(b"this is not an HDF5 file\n" * 10)
    for path in (tmp_path, not_hdf5):
        msg = one_line_error(f"dataset {not_hdf5}", lambda: read_minari_hdf5(path))
        assert "HDF5" in msg
