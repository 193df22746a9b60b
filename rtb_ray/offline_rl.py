"""Offline RL for the control domain: D4RL-style transition data (read from a D4RL .hdf5 file, an
.npz file of the same keys, or a local Minari dataset), an IQL critic, and Gaussian behaviour
(BC) and advantage-weighted (AWR) policies.

The control tasks fine-tune a state-conditioned diffusion prior μ(a|s) towards
π(a|s) ∝ μ(a|s)·exp(β·Q(s,a)); Q comes from Implicit Q-Learning (Kostrikov et al. 2021), and BC
and AWR are the Gaussian baselines it is compared with.
"""

from __future__ import annotations

import copy
import hashlib
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rtb_ray.datasets import read_npz
from rtb_ray.pretrain import atomic_write, progress_bar

D4RL_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
_PER_STEP_KEYS = ("rewards", "terminals", "timeouts")  # [N] or [N, 1]
_FLAG_KEYS = ("terminals", "timeouts")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MINARI_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")
_MINARI_EPISODE = re.compile(r"episode_(\d+)")


# -- data --------------------------------------------------------------------------------------
def _first_bad_row(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(1))[0])


def check_d4rl(where: str, data: Mapping[str, np.ndarray], obs_dim: int | None = None,
               action_dim: int | None = None,
               action_bound: float | None = None) -> dict[str, np.ndarray]:
    """D4RL transitions, checked and copied: float32 observations [N, obs_dim], actions
    [N, action_dim], rewards [N], next_observations [N, obs_dim]; bool terminals [N] and
    timeouts [N]. A bad input is a one-line ValueError starting with ``where`` that names the key
    and, for a bad value, its first bad row. ``obs_dim``/``action_dim`` None: the data's own;
    ``action_bound``: actions must lie in [−bound, bound]."""
    raw = _numeric_arrays(where, data)
    rows = _check_shapes(where, raw, obs_dim, action_dim)
    out = {key: _checked_values(where, key, raw[key], rows) for key in D4RL_KEYS}
    if action_bound is not None:
        bad = np.abs(out["actions"]) > action_bound
        if bad.any():
            row = _first_bad_row(bad)
            raise ValueError(f"{where}: key 'actions', row {row}: {out['actions'][row].tolist()} "
                             f"is outside [-{action_bound}, {action_bound}]")
    return out


def _numeric_arrays(where: str, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every D4RL key, as a numeric array (object arrays included: never unpickled or trusted)."""
    missing = [k for k in D4RL_KEYS if k not in data]
    if missing:
        has = ", ".join(sorted(data)) or "nothing"
        raise ValueError(f"{where}: missing key {missing[0]!r} (it has: {has})")
    raw: dict[str, np.ndarray] = {}
    for key in D4RL_KEYS:
        try:
            v = np.asarray(data[key])
        except ValueError as err:  # e.g. a ragged list
            raise ValueError(f"{where}: key {key!r}: {str(err).splitlines()[0]}") from None
        if v.dtype.kind not in "fiub":
            raise ValueError(f"{where}: key {key!r}: dtype {v.dtype} is not numeric")
        raw[key] = v
    return raw


def _check_shapes(where: str, raw: dict[str, np.ndarray], obs_dim: int | None,
                  action_dim: int | None) -> int:
    """Widths and row counts agree (and with ``obs_dim``/``action_dim``); returns the rows."""
    widths = {"observations": obs_dim, "actions": action_dim}
    for key in ("observations", "actions"):
        v, width = raw[key], widths[key]
        if v.ndim != 2 or (width is not None and v.shape[1] != width):
            want = f"(N, {width})" if width is not None else "(N, width)"
            raise ValueError(f"{where}: key {key!r}: shape {tuple(v.shape)}, expected {want}")
    obs_width = raw["observations"].shape[1]
    next_obs = raw["next_observations"]
    if next_obs.ndim != 2 or next_obs.shape[1] != obs_width:
        raise ValueError(f"{where}: key 'next_observations': shape {tuple(next_obs.shape)}, "
                         f"expected (N, {obs_width}) like 'observations'")
    for key in _PER_STEP_KEYS:
        v = raw[key]
        if not (v.ndim == 1 or (v.ndim == 2 and v.shape[1] == 1)):
            raise ValueError(f"{where}: key {key!r}: shape {tuple(v.shape)}, expected (N,) or "
                             f"(N, 1)")
    rows = raw["observations"].shape[0]
    for key in D4RL_KEYS[1:]:
        if raw[key].shape[0] != rows:
            raise ValueError(f"{where}: key {key!r}: {raw[key].shape[0]} rows, but "
                             f"'observations' has {rows}")
    if rows == 0:
        raise ValueError(f"{where}: key 'observations': no rows")
    return rows


def _checked_values(where: str, key: str, v: np.ndarray, rows: int) -> np.ndarray:
    """A float32 copy of ``v`` (the caller's array is never touched), or bool for a flag key;
    checked after the cast: a float64 beyond float32's range would become inf in training."""
    if key in _PER_STEP_KEYS:
        v = v.reshape(rows)
    with np.errstate(over="ignore"):
        as_float = v.astype(np.float32)
    bad = ~np.isfinite(as_float)
    if bad.any():
        row = _first_bad_row(bad)
        raise ValueError(f"{where}: key {key!r}, row {row}: {v[row].tolist()} holds a value "
                         f"that is not a finite (float32) number")
    if key not in _FLAG_KEYS:
        return as_float
    bad = (as_float != 0) & (as_float != 1)
    if bad.any():
        row = _first_bad_row(bad)
        raise ValueError(f"{where}: key {key!r}, row {row}: {v[row].tolist()} is not 0 or 1")
    return as_float == 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_hdf5(path: Path, where: str, read: Callable) -> tuple[dict[str, np.ndarray], str]:
    """``read(h5py, file)``'s arrays from the HDF5 file at ``path``, and the file's sha256. A
    file that is absent or not HDF5 is a one-line ValueError starting with ``where``."""
    try:
        import h5py
    except ImportError:
        raise ImportError("reading D4RL or Minari .hdf5 files needs h5py: pip install h5py (or "
                          "the rtb-ray[d4rl] extra)") from None
    try:
        with path.open("rb") as f:
            head = f.read(len(_HDF5_SIGNATURE))
        # HDF5 may sit after a user block (512, 1024, ... bytes): h5py knows where to look
        if head != _HDF5_SIGNATURE and not h5py.is_hdf5(str(path)):
            raise ValueError(f"{where}: not an HDF5 file")
        digest = _sha256(path)
        with h5py.File(path, "r") as h5:
            data = read(h5py, h5)
    except OSError as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{where}: cannot be read as an HDF5 file ({type(err).__name__}: "
                         f"{first})") from None
    return data, digest


def _members(h5py, group) -> str:
    """A group's members, sub-groups ending in '/', for an error message."""
    return ", ".join(sorted(f"{k}/" if isinstance(group[k], h5py.Group) else k
                            for k in group.keys())) or "nothing"


def read_d4rl_hdf5(path: Path, obs_dim: int | None = None, action_dim: int | None = None,
                   action_bound: float | None = None) -> tuple[dict[str, np.ndarray], str]:
    """A D4RL .hdf5 file's transitions (its top-level datasets named by ``D4RL_KEYS``; groups
    such as ``infos/`` and ``metadata/`` are ignored), checked (``check_d4rl``), and the file's
    sha256."""
    where = f"dataset {path}"

    def read(h5py, h5) -> dict[str, np.ndarray]:
        data = {}
        for key in D4RL_KEYS:
            if key not in h5:
                raise ValueError(f"{where}: missing key {key!r} (it has: {_members(h5py, h5)})")
            if not isinstance(h5[key], h5py.Dataset):
                raise ValueError(f"{where}: key {key!r} is a group, not a dataset")
            data[key] = h5[key][()]
        return data

    data, digest = _read_hdf5(path, where, read)
    return check_d4rl(where, data, obs_dim, action_dim, action_bound), digest


def _minari_episode(h5py: Any, episode: Any, where: str) -> dict[str, np.ndarray]:
    """One Minari episode group's arrays (``_MINARI_KEYS``), its row counts checked: one more
    observation than actions (the last is the final observation), one reward and flag per step.
    ``where`` names the episode in a ValueError."""
    if not isinstance(episode, h5py.Group):
        raise ValueError(f"{where} is a dataset, not an episode group")
    arrays = {}
    for key in _MINARI_KEYS:
        if key not in episode:
            raise ValueError(f"{where}: missing key {key!r} (it has: {_members(h5py, episode)})")
        if not isinstance(episode[key], h5py.Dataset):
            if key == "observations":
                raise ValueError(f"{where}: key 'observations' is a group (a Dict observation "
                                 f"space), which is not supported")
            raise ValueError(f"{where}: key {key!r} is a group, not a dataset")
        value = episode[key][()]
        if value.ndim == 0:
            raise ValueError(f"{where}: key {key!r}: a scalar, expected one row per step")
        arrays[key] = value
    steps = arrays["actions"].shape[0]
    if arrays["observations"].shape[0] != steps + 1:
        raise ValueError(f"{where}: key 'observations': {arrays['observations'].shape[0]} rows, "
                         f"expected {steps + 1} (one more than the {steps} of 'actions': the "
                         f"last is the final observation)")
    for key in ("rewards", "terminations", "truncations"):
        if arrays[key].shape[0] != steps:
            raise ValueError(f"{where}: key {key!r}: {arrays[key].shape[0]} rows, but 'actions' "
                             f"has {steps}")
    return arrays


def read_minari_hdf5(path: Path, obs_dim: int | None = None, action_dim: int | None = None,
                     action_bound: float | None = None) -> tuple[dict[str, np.ndarray], str]:
    """A local Minari dataset's transitions as D4RL arrays, checked (``check_d4rl``), and the
    sha256 of its HDF5 file. ``path``: a Minari dataset directory (as Minari writes under
    ``~/.minari/datasets/<id>/``, holding ``data/main_data.hdf5``) or that file itself.

    Minari stores one group per episode, ``episode_0``, ``episode_1``, ... (taken in numeric
    order), each with ``observations`` [T+1, obs_dim] (the last row is the final observation),
    ``actions`` [T, action_dim], ``rewards``, ``terminations`` and ``truncations`` [T]; other
    members (``infos/``) are ignored. Episode by episode, observations are obs[:-1],
    next_observations obs[1:], terminals the terminations and timeouts the truncations; the
    episodes are concatenated in order. Dict observation spaces (``observations/`` a group) are
    not supported."""
    path = Path(path)
    if path.is_dir():
        file = path / "data" / "main_data.hdf5"
        if not file.is_file():
            raise ValueError(f"dataset {path}: no data/main_data.hdf5 in this directory (a "
                             f"Minari dataset directory holds one)")
    else:
        file = path
    where = f"dataset {file}"

    def read(h5py, h5) -> dict[str, np.ndarray]:
        numbered = []
        for name in h5.keys():
            match = _MINARI_EPISODE.fullmatch(name)
            if match:
                numbered.append((int(match.group(1)), name))
        if not numbered:
            raise ValueError(f"{where}: no 'episode_*' groups, so not a Minari dataset (it has: "
                             f"{_members(h5py, h5)})")
        parts: dict[str, list[np.ndarray]] = {key: [] for key in D4RL_KEYS}
        first: dict[str, tuple[str, tuple[int, ...]]] = {}  # key: (episode, shape[1:])
        for _, name in sorted(numbered):
            arrays = _minari_episode(h5py, h5[name], f"{where}: episode {name!r}")
            # episodes must agree on widths, or concatenating them would fail without naming one
            for key, value in arrays.items():
                seen, shape = first.setdefault(key, (name, value.shape[1:]))
                if value.shape[1:] != shape:
                    raise ValueError(f"{where}: episode {name!r}: key {key!r}: shape "
                                     f"{value.shape}, but episode {seen!r} has rows of shape "
                                     f"{shape}")
            obs = arrays["observations"]
            parts["observations"].append(obs[:-1])
            parts["next_observations"].append(obs[1:])
            parts["actions"].append(arrays["actions"])
            parts["rewards"].append(arrays["rewards"])
            parts["terminals"].append(arrays["terminations"])
            parts["timeouts"].append(arrays["truncations"])
        return {key: np.concatenate(values) for key, values in parts.items()}

    data, digest = _read_hdf5(file, where, read)
    return check_d4rl(where, data, obs_dim, action_dim, action_bound), digest


def read_d4rl_npz(path: Path, obs_dim: int | None = None, action_dim: int | None = None,
                  action_bound: float | None = None) -> tuple[dict[str, np.ndarray], str]:
    """An .npz file of D4RL transitions (``D4RL_KEYS``), checked (``check_d4rl``), and its
    sha256. Arrays are read without pickle: an object array is refused, never unpickled."""
    data, digest = read_npz(path, D4RL_KEYS)
    return check_d4rl(f"dataset {path}", data, obs_dim, action_dim, action_bound), digest


def write_d4rl_npz(path: Path, data: dict[str, np.ndarray]) -> None:
    """``data``'s arrays as an .npz file at exactly ``path``, written atomically: a crash never
    leaves a half-written file."""
    arrays = {key: np.asarray(v) for key, v in data.items()}
    for key, v in arrays.items():
        if v.dtype.hasobject:  # np.savez would pickle it, and read_d4rl_npz would refuse it
            raise ValueError(f"{path}: key {key!r}: dtype {v.dtype} is not numeric")
    atomic_write(path, lambda f: np.savez(f, **arrays))


# -- networks ----------------------------------------------------------------------------------
class MLP(nn.Sequential):
    """``depth`` hidden layers of ``hidden`` ReLU units."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, depth: int = 2) -> None:
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        super().__init__(*layers, nn.Linear(width, out_dim))


class IQLCritic(nn.Module):
    """Twin Q networks on (obs, action) and a value network on obs."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 256, depth: int = 2) -> None:
        super().__init__()
        self.q1 = MLP(obs_dim + action_dim, 1, hidden, depth)
        self.q2 = MLP(obs_dim + action_dim, 1, hidden, depth)
        self.v = MLP(obs_dim, 1, hidden, depth)

    def q_pair(self, obs: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
        """(Q1, Q2), each [n]."""
        x = torch.cat([obs, act], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def q(self, obs: Tensor, act: Tensor) -> Tensor:
        """min(Q1, Q2) [n]."""
        return torch.minimum(*self.q_pair(obs, act))

    def value(self, obs: Tensor) -> Tensor:
        """V(s) [n]."""
        return self.v(obs).squeeze(-1)


class GaussianPolicy(nn.Module):
    """A diagonal Gaussian π(a|s) with state-dependent mean and log-std. With ``action_bound``
    the mean is ``bound·tanh(·)`` (never outside the box) and samples are clipped to it; the
    Gaussian itself stays in the raw action space, so data actions at exactly ±bound have a
    finite log-likelihood."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 256, depth: int = 2,
                 action_bound: float | None = None) -> None:
        super().__init__()
        self.net = MLP(obs_dim, 2 * action_dim, hidden, depth)
        self.action_bound = action_bound

    def mean_log_std(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log-std), each [n, action_dim]."""
        mean, log_std = self.net(obs).chunk(2, -1)
        if self.action_bound is not None:
            mean = self.action_bound * torch.tanh(mean)
        return mean, log_std.clamp(-5.0, 2.0)

    def log_prob(self, obs: Tensor, act: Tensor) -> Tensor:
        """log π(a|s) [n]."""
        mean, log_std = self.mean_log_std(obs)
        return torch.distributions.Normal(mean, log_std.exp()).log_prob(act).sum(-1)

    def act(self, obs: Tensor, deterministic: bool = True,
            generator: torch.Generator | None = None) -> Tensor:
        """The mean action, or a sample, [n, action_dim] (within ±action_bound when given)."""
        mean, log_std = self.mean_log_std(obs)
        if deterministic:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device,
                            dtype=mean.dtype)
        action = mean + log_std.exp() * noise
        if self.action_bound is not None:
            action = action.clamp(-self.action_bound, self.action_bound)
        return action


# -- training ----------------------------------------------------------------------------------
def _as_tensors(data: Mapping[str, np.ndarray], keys: tuple[str, ...]) -> list[Tensor]:
    """float32 tensors, with rewards/terminals/timeouts as [N]."""
    tensors = []
    for key in keys:
        v = torch.as_tensor(np.asarray(data[key], dtype=np.float32))
        tensors.append(v.reshape(v.shape[0]) if key in _PER_STEP_KEYS else v)
    return tensors


def _seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``make()`` with weights drawn from ``seed``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _frozen(net: nn.Module) -> nn.Module:
    return net.eval().requires_grad_(False)


def train_iql(data: Mapping[str, np.ndarray], steps: int, batch_size: int = 256,
              lr: float = 3e-4, gamma: float = 0.99, expectile: float = 0.7,
              polyak: float = 0.005, hidden: int = 256, depth: int = 2, reward_scale: float = 1.0,
              seed: int = 0, progress: bool = True) -> tuple[IQLCritic, dict]:
    """Implicit Q-Learning's critic (Kostrikov et al. 2021) on D4RL transitions (``check_d4rl``'s
    output). V is an expectile of the target Q over the data's actions; Q regresses onto
    r·reward_scale + γ·(1 − terminal)·V(s'); timeouts are not terminals: Q bootstraps through
    them. Returns the frozen critic and {"q_loss", "v_loss"} (last step's) and "seconds"."""
    if not 0.0 < expectile < 1.0:
        raise ValueError(f"expectile must lie in (0, 1), not {expectile}")
    obs, act, rew, next_obs, terminal = _as_tensors(
        data, ("observations", "actions", "rewards", "next_observations", "terminals"))
    critic = _seeded(lambda: IQLCritic(obs.shape[1], act.shape[1], hidden, depth), seed)
    target_q = copy.deepcopy(nn.ModuleList([critic.q1, critic.q2])).requires_grad_(False)
    q_params = [*critic.q1.parameters(), *critic.q2.parameters()]
    q_opt = torch.optim.Adam(q_params, lr=lr)
    v_opt = torch.optim.Adam(critic.v.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    q_loss = v_loss = torch.tensor(float("nan"))
    bar = progress_bar(range(steps), "iql critic", progress)
    for step in bar:
        i = torch.randint(obs.shape[0], (batch_size,), generator=gen)
        s, a, r, s_next, done = obs[i], act[i], rew[i], next_obs[i], terminal[i]

        with torch.no_grad():
            sa = torch.cat([s, a], -1)
            q_t = torch.minimum(target_q[0](sa), target_q[1](sa)).squeeze(-1)
        u = q_t - critic.value(s)
        v_loss = ((expectile - (u < 0).float()).abs() * u**2).mean()
        v_opt.zero_grad(set_to_none=True)
        v_loss.backward()
        v_opt.step()

        with torch.no_grad():
            y = r * reward_scale + gamma * (1.0 - done) * critic.value(s_next)
        q1, q2 = critic.q_pair(s, a)
        q_loss = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
        q_opt.zero_grad(set_to_none=True)
        q_loss.backward()
        q_opt.step()

        with torch.no_grad():
            for p_t, p in zip(target_q.parameters(), q_params):
                p_t.lerp_(p, polyak)
        if step % 100 == 0:
            bar.set_postfix(q_loss=f"{q_loss.item():.3f}", v_loss=f"{v_loss.item():.3f}")
    stats = {"q_loss": q_loss.item(), "v_loss": v_loss.item(),
             "seconds": time.perf_counter() - start}
    return _frozen(critic), stats


def _fit_policy(data: Mapping[str, np.ndarray], weights: Tensor | None, steps: int,
                batch_size: int, lr: float, hidden: int, depth: int, action_bound: float | None,
                seed: int, progress: bool, desc: str) -> GaussianPolicy:
    """Maximise the (``weights``-weighted) log-likelihood of the data's actions."""
    obs, act = _as_tensors(data, ("observations", "actions"))
    policy = _seeded(lambda: GaussianPolicy(obs.shape[1], act.shape[1], hidden, depth,
                                            action_bound), seed)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    bar = progress_bar(range(steps), desc, progress)
    for step in bar:
        i = torch.randint(obs.shape[0], (batch_size,), generator=gen)
        log_prob = policy.log_prob(obs[i], act[i])
        loss = -(log_prob if weights is None else weights[i] * log_prob).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return _frozen(policy)


def train_bc(data: Mapping[str, np.ndarray], steps: int, batch_size: int = 256, lr: float = 3e-4,
             hidden: int = 256, depth: int = 2, action_bound: float | None = None, seed: int = 0,
             progress: bool = True) -> GaussianPolicy:
    """Behaviour cloning: the Gaussian policy of maximum likelihood on the data's actions."""
    return _fit_policy(data, None, steps, batch_size, lr, hidden, depth, action_bound, seed,
                       progress, "bc policy")


def train_awr(data: Mapping[str, np.ndarray], critic: IQLCritic, steps: int,
              inverse_temperature: float = 3.0, max_weight: float = 100.0,
              batch_size: int = 256, lr: float = 3e-4, hidden: int = 256, depth: int = 2,
              action_bound: float | None = None, seed: int = 0,
              progress: bool = True) -> GaussianPolicy:
    """IQL's policy extraction (advantage-weighted regression): the data's log-likelihood
    weighted by min(exp(inverse_temperature·(Q(s,a) − V(s))), max_weight). The advantage is in
    the critic's units (rewards × its reward_scale)."""
    obs, act = _as_tensors(data, ("observations", "actions"))
    # the critic is frozen: each transition's weight is computed once, in chunks
    with torch.no_grad():
        advantage = torch.cat([critic.q(o, a) - critic.value(o)
                               for o, a in zip(obs.split(65536), act.split(65536))])
    weights = torch.exp(inverse_temperature * advantage).clamp(max=max_weight)
    return _fit_policy(data, weights, steps, batch_size, lr, hidden, depth, action_bound, seed,
                       progress, "awr policy")
