"""Control, realistic tier: offline RL on gymnasium's ``Pendulum-v1`` (issue #17, Tier B), and
on D4RL's MuJoCo locomotion data behind flags (Tier C).

The policy is π(a | s) ∝ μ(a | s)·exp(β·Q(s, a)): μ a state-conditioned diffusion model
behaviour-cloned on a dataset (the prior, "diffusion-BC"), Q an IQL critic trained on the same
dataset (``rtb_ray.offline_rl``), and RTB fine-tunes the prior towards the tilted policy.

- Data: seeded scripted policies in the environment make D4RL-style datasets with D4RL's keys
  (``observations, actions, rewards, next_observations, terminals, timeouts``), rebuilt from the
  seed in seconds into the cache (never committed): ``medium`` (a weak, noisy energy-pumping
  controller), ``medium-replay`` (episodes whose policy improves from near-random to medium, as
  a learner's replay buffer), ``medium-expert`` (medium and expert episodes), ``bimodal`` (the
  medium controller that kicks off left or right by a per-episode coin: two action modes in the
  low-energy states), ``expert``, ``random``. ``task.dataset`` may instead be a D4RL-keyed
  ``.npz`` or ``.hdf5`` file (checked when the config is loaded: one line naming the key and the
  first bad row).
- Actions: torques in [−2, 2]. Scripted policies act a = 2·tanh(z); the diffusion variable is
  x = arctanh(a / 2) (clipped to ±``X_MAX``: a torque of exactly ±2 is in bounds) and the
  policy acts 2·tanh(x).
- The prior checkpoint holds the diffusion-BC prior and the IQL critic (twin Q, expectile V),
  and the prior's figures: ``stats_samples`` prior actions at each of the ``num_eval_states``
  evaluation states (dataset states) and the prior's own score in the environment.
- Reward: log r(x; s) = Q(s, 2·tanh x) in the critic's units (rewards × ``reward_scale``).
- Target: the prior tilted by e^{βQ}; at the evaluation states its E[Q] and log Z_θ(s) come from
  the stored prior samples (self-normalised importance weights), as in ``bandit_gmm``.
- Score: 100·(R − R_random)/(R_expert − R_random), R the undiscounted return of a 200-step
  episode; the references are measured once (``reference_returns``) and frozen below.
  Evaluation rolls the posterior out on ``eval_episodes`` episodes at once; an episode whose
  state or reward stops being finite counts as failed and is never averaged in.

Tier C (``task.env``: ``hopper``, ``halfcheetah``, ``walker2d``; needs ``pip install mujoco``):
the same task over gymnasium's v5 MuJoCo environments (D4RL's v2 observations), trained on a
local D4RL file (``task.dataset: d4rl:<file.hdf5>``) or a local Minari dataset
(``minari:<dataset directory>``), scored with D4RL's reference returns; an episode ends early
when the environment terminates it (a fallen hopper). ``pipelines/configs/d4rl.yaml``: the
paper's settings.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from torch import Tensor, nn

from rtb_ray.networks import TimeMLP
from rtb_ray.offline_rl import (D4RL_KEYS, IQLCritic, read_d4rl_hdf5, read_d4rl_npz,
                                read_minari_hdf5, train_iql, write_d4rl_npz)
from rtb_ray.pretrain import (PriorCheckpointConfig, cache_root, load_frozen_bundle,
                              pretrain_prior, read_checkpoint, save_prior, uniform_rows)
from rtb_ray.tasks import EvalContext
from rtb_ray.transitions import DDPMGaussian

OBS_DIM, ACTION_DIM = 3, 1  # Pendulum's
MAX_TORQUE = 2.0
EPISODE_STEPS = 200  # Pendulum-v1's time limit
X_MAX = 4.0  # |arctanh(a / max)| ≤ 4: |a| ≤ 0.99933·max
DATA_VERSION = 1  # bump when generation changes: it names the cached files
DATASETS = ("medium", "medium-replay", "medium-expert", "bimodal", "expert", "random")

# Undiscounted returns of the uniform-random policy and of the scripted expert, 1000 episodes
# each from reset seed 12345 (``reference_returns()``; tests/test_pendulum.py re-measures them)
RANDOM_RETURN = -1227.78
EXPERT_RETURN = -160.75



@dataclass(frozen=True)
class Environment:
    """A gymnasium environment as the task sees it: actions in [−max_action, max_action]^d,
    episodes of at most ``max_steps``, scores 0 at ``random_return`` and 100 at
    ``expert_return``."""

    gym_id: str
    obs_dim: int
    action_dim: int
    max_action: float
    max_steps: int
    random_return: float
    expert_return: float

    def normalized_score(self, returns: np.ndarray) -> np.ndarray:
        """100·(R − R_random)/(R_expert − R_random) (D4RL's normalisation)."""
        return 100 * (np.asarray(returns) - self.random_return) / (self.expert_return -
                                                                   self.random_return)

    @property
    def needs_mujoco(self) -> bool:
        return self.gym_id != "Pendulum-v1"


ENVIRONMENTS = {
    "pendulum": Environment("Pendulum-v1", OBS_DIM, ACTION_DIM, MAX_TORQUE, EPISODE_STEPS,
                            RANDOM_RETURN, EXPERT_RETURN),
    # D4RL's reference returns (REF_MIN_SCORE, REF_MAX_SCORE of d4rl/infos.py)
    "hopper": Environment("Hopper-v5", 11, 3, 1.0, 1000, -20.272305, 3234.3),
    "halfcheetah": Environment("HalfCheetah-v5", 17, 6, 1.0, 1000, -280.178953, 12135.0),
    "walker2d": Environment("Walker2d-v5", 17, 6, 1.0, 1000, 1.629008, 4592.3),
}
PENDULUM = ENVIRONMENTS["pendulum"]


# -- the environment and the scripted policies -----------------------------------------------------
def make_env(num_envs: int, env: Environment = PENDULUM):
    """``num_envs`` environments stepped together (gymnasium's sync vector env)."""
    import gymnasium as gym

    if env.needs_mujoco and importlib.util.find_spec("mujoco") is None:
        raise ImportError(f"{env.gym_id} needs MuJoCo: pip install mujoco")
    return gym.make_vec(env.gym_id, num_envs=num_envs, vectorization_mode="sync")


def controller_torque(obs: np.ndarray, kick: np.ndarray | None = None) -> np.ndarray:
    """The expert's torque command per row of ``obs [n, 3]`` (cos θ, sin θ, θ̇; θ = 0 upright):
    a PD balancer near the top, energy pumping elsewhere. The dynamics are θ̈ = 15 sin θ + 3u, so
    E = θ̇²/2 + 15 cos θ is conserved without torque and is 15 upright at rest. ``kick`` (±1 per
    row): in low-energy, slow states push that way (the bimodal policy's coin)."""
    cos, sin, vel = obs[:, 0], obs[:, 1], obs[:, 2]
    theta = np.arctan2(sin, cos)
    energy = 0.5 * vel**2 + 15 * cos
    near_top = (cos > 0.85) & (np.abs(vel) < 5)
    u = np.where(near_top, -(10 * theta + 2 * vel), 0.5 * (15 - energy) * np.sign(vel + 1e-9))
    if kick is not None:
        u = np.where((energy < -10) & (np.abs(vel) < 1.0), 2 * MAX_TORQUE * kick, u)
    return u


@dataclass
class ScriptedPolicy:
    """a = 2·tanh(gain·clip(u/2, ±3) + noise·ε) per episode (row): ``gain``, ``noise`` and the
    bimodal ``kick`` (or None) are per-row arrays; ``uniform`` acts uniformly at random."""

    gain: np.ndarray
    noise: np.ndarray
    kick: np.ndarray | None = None
    uniform: bool = False

    def __call__(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = obs.shape[0]
        if self.uniform:
            return rng.uniform(-MAX_TORQUE, MAX_TORQUE, (n, ACTION_DIM))
        z = self.gain * np.clip(controller_torque(obs, self.kick) / 2, -3, 3) \
            + self.noise * rng.standard_normal(n)
        return (MAX_TORQUE * np.tanh(z))[:, None]


def scripted_policy(kind: str, episodes: int, rng: np.random.Generator) -> ScriptedPolicy:
    """The behaviour of one dataset kind over ``episodes`` episodes (rows)."""
    full = lambda v: np.full(episodes, float(v))  # noqa: E731
    if kind == "random":
        return ScriptedPolicy(full(0), full(0), uniform=True)
    if kind == "expert":
        return ScriptedPolicy(full(1.0), full(0.1))
    if kind == "medium":
        return ScriptedPolicy(full(0.35), full(0.5))
    if kind == "medium-replay":  # a learner's buffer: from near-random to medium
        progress = np.linspace(0, 1, episodes)
        return ScriptedPolicy(0.05 + 0.3 * progress, 1.0 - 0.5 * progress)
    if kind == "bimodal":
        return ScriptedPolicy(full(0.35), full(0.5), kick=rng.choice([-1.0, 1.0], episodes))
    raise ValueError(f"unknown scripted policy {kind!r} (one of {', '.join(DATASETS)})")


@dataclass
class Episodes:
    """``returns [n]`` (undiscounted, up to each episode's end), ``failed [n]`` (a state or
    reward that was not finite), the first episode's ``observations`` and ``actions`` (NaN after
    it ended), and the transitions with D4RL's keys (``[n·max_steps, ...]``, episode-major) when
    recorded (episodes that never end early: Pendulum's)."""

    env: Environment
    returns: np.ndarray
    failed: np.ndarray
    observations: np.ndarray
    actions: np.ndarray
    transitions: dict[str, np.ndarray] | None = None

    def scores(self) -> np.ndarray:
        """The normalised scores of the episodes that did not fail."""
        return self.env.normalized_score(self.returns[~self.failed])


def run_episodes(policy: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int,
                 record: bool = False, env: Environment = PENDULUM) -> Episodes:
    """Roll ``policy`` (observations ``[n, obs_dim]`` -> actions ``[n, action_dim]``) out on
    ``episodes`` environments at once, reset from ``seed`` (episode i from seed + i)."""
    envs = make_env(episodes, env)
    returns, failed = np.zeros(episodes), np.zeros(episodes, dtype=bool)
    ended = np.zeros(episodes, dtype=bool)
    trace_obs = np.full((env.max_steps, env.obs_dim), np.nan)
    trace_action = np.full((env.max_steps, env.action_dim), np.nan)
    keep: dict[str, list[np.ndarray]] = {k: [] for k in D4RL_KEYS}
    try:
        obs, _ = envs.reset(seed=seed)
        for t in range(env.max_steps):
            live = ~(failed | ended)
            if not live.any():
                break
            # a finished or failed episode's state is not fed on: one NaN row must not poison
            # the batch (the vector env restarts an ended one: its steps are ignored)
            obs = np.where(live[:, None], obs, 0.0)
            action = np.asarray(policy(obs), dtype=np.float64).reshape(episodes, env.action_dim)
            next_obs, reward, terminated, truncated, _ = envs.step(action.astype(np.float32))
            failed |= live & (~np.isfinite(reward) | ~np.isfinite(next_obs).all(1))
            returns += np.where(live & ~failed, reward, 0.0)
            if live[0]:
                trace_obs[t], trace_action[t] = obs[0], action[0]
            if record:
                for key, value in zip(D4RL_KEYS, (obs, action, reward, next_obs, terminated,
                                                  truncated | (t == env.max_steps - 1))):
                    keep[key].append(np.asarray(value))
            ended |= live & (terminated | truncated)
            obs = next_obs
    finally:
        envs.close()
    transitions = None
    if record:  # [steps, n, ...] -> episode-major rows
        transitions = {k: np.stack(v, 1).reshape(-1, *v[0].shape[1:]) for k, v in keep.items()}
    return Episodes(env, returns, failed, trace_obs, trace_action, transitions)


def draw_episode(ax, episodes: Episodes) -> None:
    """The first episode over time on a matplotlib axis: Pendulum's angle and torque, or another
    environment's first observation and first action."""
    steps = np.arange(episodes.env.max_steps)
    if episodes.env is PENDULUM:
        first = np.arctan2(episodes.observations[:, 1], episodes.observations[:, 0])
        labels = ("angle θ (0: upright)", "torque")
        ax.set(ylim=(-math.pi - 0.2, math.pi + 0.2))
    else:
        first, labels = episodes.observations[:, 0], ("observation[0]", "action[0]")
    ax.plot(steps, first, color="tab:blue", label=labels[0])
    ax.plot(steps, episodes.actions[:, 0], color="tab:orange", lw=0.8, label=labels[1])
    ax.axhline(0, color="grey", lw=0.5)
    score = episodes.env.normalized_score(episodes.returns[:1])[0]
    ax.set(xlabel="step", title=f"episode 0: score {score:.0f}")
    ax.legend(fontsize=6, loc="lower right")


def normalized_score(returns: np.ndarray) -> np.ndarray:
    """Pendulum's normalised scores."""
    return PENDULUM.normalized_score(returns)


def episode_returns(data: dict[str, np.ndarray]) -> np.ndarray:
    """The undiscounted return of every complete episode of D4RL-keyed data (episodes end at a
    terminal or a timeout; a trailing incomplete one is left out)."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    sums = np.cumsum(data["rewards"], dtype=np.float64)[ends]
    return np.diff(np.concatenate([[0.0], sums]))


def reference_returns(episodes: int = 1000, seed: int = 12345) -> tuple[float, float]:
    """Mean returns of the uniform-random policy and of the scripted expert."""
    out = []
    for kind in ("random", "expert"):
        rng = np.random.default_rng(seed)
        policy = scripted_policy(kind, episodes, rng)
        out.append(float(run_episodes(lambda o: policy(o, rng), episodes, seed).returns.mean()))
    return out[0], out[1]


def generate_dataset(kind: str, episodes: int, seed: int) -> dict[str, np.ndarray]:
    """A D4RL-keyed dataset of ``episodes`` scripted episodes (``medium-expert``: that many of
    each), the same arrays for the same seed."""
    if kind == "medium-expert":
        parts = [generate_dataset(k, episodes, seed + i) for i, k in enumerate(("medium",
                                                                                 "expert"))]
        return {k: np.concatenate([p[k] for p in parts]) for k in D4RL_KEYS}
    rng = np.random.default_rng(seed)
    policy = scripted_policy(kind, episodes, rng)
    data = run_episodes(lambda o: policy(o, rng), episodes, seed, record=True).transitions
    assert data is not None
    return {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in data.items()}


# -- config ----------------------------------------------------------------------------------------
class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(512, ge=1)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0
    stats_samples: int = Field(4096, ge=100, le=1_000_000,
                               description="prior actions per evaluation state, stored")


class CriticConfig(BaseModel):
    """IQL (rtb_ray.offline_rl.train_iql)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(20_000, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(3e-4, gt=0)
    gamma: float = Field(0.99, gt=0, lt=1)
    expectile: float = Field(0.7, gt=0, lt=1)
    hidden: int = Field(256, ge=1)
    depth: int = Field(2, ge=1)
    reward_scale: float = Field(0.1, gt=0, description="Q is in units of reward × this")
    seed: int = 0


class Config(PriorCheckpointConfig):
    """Settings of the Pendulum task (the ``task:`` section of a run config)."""

    name: Literal["pendulum"] = "pendulum"
    env: Literal["pendulum", "hopper", "halfcheetah", "walker2d"] = Field(
        "pendulum", description="the environment; all but pendulum need MuJoCo and a data file")
    dataset: str = Field("medium-replay", description=f"one of {', '.join(DATASETS)} (generated "
                         f"from data_seed into the cache, pendulum only), a D4RL-keyed "
                         f".npz/.hdf5 file (d4rl:<file>) or a Minari dataset (minari:<dir>)")
    num_episodes: int = Field(200, ge=1, le=100_000,
                              description="episodes generated (medium-expert: of each)")
    data_seed: int = 0
    num_steps: int = Field(32, ge=1, le=1000, description="T, DDPM steps")
    min_std: float = Field(1e-3, gt=0)
    hidden: int = Field(128, ge=1)
    depth: int = Field(2, ge=0)
    pretrain: PretrainConfig = PretrainConfig()
    critic: CriticConfig = CriticConfig()
    num_eval_states: int = Field(16, ge=1, le=256)
    eval_seed: int = Field(1, description="draws the evaluation states from the dataset")
    eval_episodes: int = Field(10, ge=1, le=10_000, description="episodes per evaluation")
    episode_seed: int = Field(100, description="evaluation episode i resets from this + i "
                              "(the prior's stored score: those at pretraining)")
    _dataset_sha256: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        env = ENVIRONMENTS[self.env]
        if env.needs_mujoco and importlib.util.find_spec("mujoco") is None:
            raise ValueError(f"env: {self.env} ({env.gym_id}) needs MuJoCo: pip install mujoco")
        if self.dataset in DATASETS:
            if self.env != "pendulum":
                raise ValueError(f"dataset: {self.dataset!r} is generated for pendulum only; "
                                 f"env {self.env} needs d4rl:<file> or minari:<dir>")
            return self
        kind, path = dataset_source(self.dataset)
        if not (path.exists() if kind == "minari" else path.is_file()):
            what = "a Minari dataset" if kind == "minari" else "a file"
            raise ValueError(f"dataset: {self.dataset!r} is neither one of "
                             f"{', '.join(DATASETS)} nor {what}")
        # absolute: every Ray node and a resumed run read the same file; read and checked now,
        # so bad data is one line before anything is trained or cached
        self.dataset = f"{kind}:{path}" if kind == "minari" else str(path)
        self._dataset_sha256 = read_dataset_file(self.dataset, env)[1]
        return self

    def spec(self) -> dict:
        """Everything the prior checkpoint depends on."""
        data = ({"dataset_sha256": self._dataset_sha256} if self.dataset not in DATASETS else
                {"dataset": self.dataset, "num_episodes": self.num_episodes,
                 "data_seed": self.data_seed, "data_version": DATA_VERSION})
        return {"family": "ddpm-linear", "env": self.env,
                "obs_dim": ENVIRONMENTS[self.env].obs_dim, **data,
                "num_steps": self.num_steps, "min_std": self.min_std, "hidden": self.hidden,
                "depth": self.depth, "pretrain": self.pretrain.model_dump(),
                "critic": self.critic.model_dump(), "num_eval_states": self.num_eval_states,
                "eval_seed": self.eval_seed}


def dataset_source(dataset: str) -> tuple[str, Path]:
    """``minari:<dir>`` -> ("minari", dir); ``d4rl:<file>`` or a bare path -> ("d4rl", file)."""
    kind, _, rest = dataset.partition(":")
    if kind in ("d4rl", "minari") and rest:
        return kind, Path(rest).expanduser().resolve()
    return "d4rl", Path(dataset).expanduser().resolve()


def read_dataset_file(dataset: str, env: Environment = PENDULUM
                      ) -> tuple[dict[str, np.ndarray], str]:
    """A D4RL-keyed .hdf5/.h5 or .npz file, or a Minari dataset, checked for ``env`` (its
    observation and action widths, actions within its bounds), and its sha256."""
    kind, path = dataset_source(dataset)
    read = (read_minari_hdf5 if kind == "minari" else
            read_d4rl_hdf5 if path.suffix in (".hdf5", ".h5") else read_d4rl_npz)
    return read(path, obs_dim=env.obs_dim, action_dim=env.action_dim,
                action_bound=env.max_action)


def to_x(actions: np.ndarray | Tensor, max_action: float = MAX_TORQUE) -> Tensor:
    """Actions -> the diffusion variable arctanh(a / max), clipped to ±X_MAX."""
    a = torch.as_tensor(actions, dtype=torch.float64) / max_action
    return a.clamp(-math.tanh(X_MAX), math.tanh(X_MAX)).atanh().float()


def to_action(x: Tensor, max_action: float = MAX_TORQUE) -> Tensor:
    """The diffusion variable -> actions max·tanh(x)."""
    return max_action * x.tanh()


# -- the task --------------------------------------------------------------------------------------
class PendulumTask:
    name = "pendulum"
    progress_metrics = ("score", "q_gap_ratio", "log_z_error_max")
    baseline_metric = "neg_score"

    def __init__(self, config: Config) -> None:
        self.config = c = config
        self.env = ENVIRONMENTS[c.env]
        self.family = DDPMGaussian(self.env.action_dim, c.num_steps, c.min_std,
                                   learn_variance=True)
        self._data: dict[str, np.ndarray] | None = None
        self._tensors: tuple[Tensor, Tensor] | None = None
        self._models: tuple[TimeMLP, IQLCritic] | None = None
        self._stats: dict | None = None
        self._targets: dict[float, dict[str, Tensor]] = {}
        self._beta = 1.0  # the evaluator asks reference_log_z (with the run's β) first
        self._last_episodes: Episodes | None = None

    # -- data --------------------------------------------------------------------------------------
    def data(self) -> dict[str, np.ndarray]:
        """The dataset (D4RL keys), checked; a generated one is cached (written atomically)."""
        if self._data is None:
            c = self.config
            if c.dataset in DATASETS:
                path = (cache_root() / self.name / "data" /
                        f"{c.dataset}-e{c.num_episodes}-s{c.data_seed}-v{DATA_VERSION}.npz")
                if not path.exists():
                    write_d4rl_npz(path, generate_dataset(c.dataset, c.num_episodes,
                                                          c.data_seed))
                self._data = read_dataset_file(str(path))[0]
            else:
                data, digest = read_dataset_file(c.dataset, self.env)
                if digest != c._dataset_sha256:
                    raise ValueError(f"dataset {c.dataset}: the file changed since the config "
                                     f"was loaded (sha256 {digest[:12]})")
                self._data = data
        return self._data

    def _pairs(self) -> tuple[Tensor, Tensor]:
        """(observations [N, obs_dim], x [N, action_dim]) float32 tensors of the dataset."""
        if self._tensors is None:
            d = self.data()
            self._tensors = (torch.from_numpy(d["observations"]).float(),
                             to_x(d["actions"], self.env.max_action))
        return self._tensors

    def known_terminals(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` dataset (x, state) pairs: the ``dataset`` source (the paper's mixed updates)."""
        obs, x = self._pairs()
        rows = torch.randint(0, obs.shape[0], (n,), generator=generator)
        return x[rows], obs[rows]

    def conditions(self, n: int, generator: torch.Generator) -> Tensor:
        """Dataset states: the posterior is trained where the critic has data."""
        obs, _ = self._pairs()
        return obs[torch.randint(0, obs.shape[0], (n,), generator=generator)]

    def eval_conditions(self) -> Tensor:
        obs, _ = self._pairs()
        gen = torch.Generator().manual_seed(self.config.eval_seed)
        return obs[torch.randperm(obs.shape[0], generator=gen)[:self.config.num_eval_states]]

    def eval_index(self, cond: Tensor) -> Tensor | None:
        """Each row's index among the evaluation states, or None if a row is none of them."""
        states = self.eval_conditions()
        best, index = (cond.float().cpu()[:, None, :] - states).abs().amax(-1).min(1)
        return index if bool((best < 1e-5).all()) else None

    # -- networks ----------------------------------------------------------------------------------
    def new_network(self) -> TimeMLP:
        c = self.config
        return TimeMLP(self.env.action_dim, c.num_steps, hidden=c.hidden, depth=c.depth,
                       out_dim=self.family.net_out_dim, cond_dim=self.env.obs_dim)

    def new_critic(self) -> IQLCritic:
        return IQLCritic(self.env.obs_dim, self.env.action_dim, hidden=self.config.critic.hidden,
                         depth=self.config.critic.depth)

    def prior_path(self) -> Path:
        return self.config.prior_path()

    def _load(self) -> tuple[TimeMLP, IQLCritic]:
        if self._models is None:
            bundle = nn.ModuleDict({"prior": self.new_network(), "critic": self.new_critic()})
            bundle, self._stats = load_frozen_bundle(self.config, self.name, self.pretrain,
                                                     bundle, self._check_obs_dim)
            self._models = (bundle["prior"], bundle["critic"])
        return self._models

    def _check_obs_dim(self, path: Path) -> None:
        """A prior over other states is refused by name before its spec is compared."""
        ckpt = read_checkpoint(path, "an rtb-ray prior checkpoint")
        spec = ckpt.get("spec") if isinstance(ckpt, dict) else None
        theirs = spec.get("obs_dim", spec.get("state_dim")) if isinstance(spec, dict) else None
        if theirs is not None and theirs != self.env.obs_dim:
            raise ValueError(f"prior_checkpoint {path}: a prior over states of dimension "
                             f"{theirs}; {self.env.gym_id}'s are {self.env.obs_dim} (refused)")

    def prior(self) -> TimeMLP:
        return self._load()[0]

    def critic(self) -> IQLCritic:
        return self._load()[1]

    @property
    def stats(self) -> dict:
        if self._stats is None:
            self._load()
        assert self._stats is not None
        return self._stats

    def pretrain(self, progress: bool = True) -> dict:
        """The dataset, then diffusion-BC (ε-matching on its (state, action) pairs), then the
        IQL critic, then the prior's figures (actions at the evaluation states, its score in
        the environment); saves the prior and the critic in one checkpoint."""
        c, cfg, k = self.config, self.config.pretrain, self.config.critic
        start = time.perf_counter()
        data = self.data()  # checked before any training: bad data never reaches the cache
        obs, x = self._pairs()
        data_s = time.perf_counter() - start
        torch.manual_seed(cfg.seed)
        prior = self.new_network()
        t0 = time.perf_counter()
        losses = pretrain_prior(self.family, prior, uniform_rows(x, obs), steps=cfg.steps,
                                batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                                progress=progress)
        prior_s = time.perf_counter() - t0
        prior.eval().requires_grad_(False)
        critic, critic_stats = train_iql(
            data, steps=k.steps, batch_size=k.batch_size, lr=k.lr, gamma=k.gamma,
            expectile=k.expectile, hidden=k.hidden, depth=k.depth, reward_scale=k.reward_scale,
            seed=k.seed, progress=progress)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        samples = torch.stack([self._sample(prior, s.expand(cfg.stats_samples, -1), gen)
                               for s in self.eval_conditions()])
        episodes = run_episodes(self.policy_of(prior, gen), c.eval_episodes, c.episode_seed,
                                env=self.env)
        dataset_returns = episode_returns(data)
        stats: dict = {"prior_samples": samples, "data_seconds": data_s,
                       "prior_seconds": prior_s, "prior_last_loss": losses[-1],
                       "critic_seconds": critic_stats["seconds"],
                       "critic_q_loss": critic_stats["q_loss"],
                       "critic_v_loss": critic_stats["v_loss"],
                       "prior_score": float(episodes.scores().mean()),
                       "prior_score_std": float(episodes.scores().std()),
                       "prior_failed_episodes": int(episodes.failed.sum()),
                       "num_transitions": int(obs.shape[0]),
                       "stats_seconds": time.perf_counter() - t0}
        if dataset_returns.size:
            stats["dataset_score"] = float(self.env.normalized_score(dataset_returns).mean())
        self._models, self._targets = (prior, critic.eval().requires_grad_(False)), {}
        self._stats = stats
        stats.update({"log_z_theta": self.target(1.0)["log_z"].mean().item(),
                      "target_ess_fraction_min": self.target(1.0)["ess_fraction"].min().item()})
        stats["pretrain_seconds"] = time.perf_counter() - start
        save_prior(c.prior_path(), self.name, c.spec(),
                   nn.ModuleDict({"prior": prior, "critic": critic}), stats)
        self._models, self._stats = None, None  # loaded afresh, as any later process would
        return stats

    @torch.no_grad()
    def _sample(self, net: nn.Module, cond: Tensor, gen: torch.Generator) -> Tensor:
        """Terminal x of ``net`` for each row of ``cond``, ``[n, 1]`` (on the CPU)."""
        device = next(net.parameters()).device
        return self.family.sample(net, cond.shape[0], cond=cond.float().to(device),
                                  generator=gen)[0][:, -1].cpu()

    def policy_of(self, net: nn.Module, gen: torch.Generator
                  ) -> Callable[[np.ndarray], np.ndarray]:
        """The environment policy of a diffusion network: action max·tanh(x), x sampled."""
        return lambda obs: self.to_action(self._sample(net, torch.from_numpy(obs), gen)).numpy()

    def to_action(self, x: Tensor) -> Tensor:
        return to_action(x, self.env.max_action)

    # -- the target --------------------------------------------------------------------------------
    def target(self, beta: float = 1.0) -> dict[str, Tensor]:
        """Per evaluation state (float64 ``[S]``): the tilted prior's E[Q], log Z_θ and ESS
        fraction, and the prior's E[Q], from the stored prior samples."""
        if beta not in self._targets:
            x = self.stats["prior_samples"]  # [S, n, action_dim]
            num, n = x.shape[0], x.shape[1]
            states = self.eval_conditions().repeat_interleave(n, 0)
            q = self.critic().q(states, self.to_action(x.reshape(num * n, -1))).double() \
                .view(num, n)
            w = (beta * q).softmax(1)
            self._targets[beta] = {"q": (w * q).sum(1),
                                   "log_z": (beta * q).logsumexp(1) - math.log(n),
                                   "ess_fraction": 1 / w.square().sum(1) / n,
                                   "prior_q": q.mean(1)}
        return self._targets[beta]

    # -- reward and evaluation ---------------------------------------------------------------------
    def log_reward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Q(s, max·tanh x) of ``x [n, action_dim]`` in states ``cond [n, obs_dim]`` (critic
        units)."""
        if cond is None:
            raise ValueError("pendulum is conditional: log_reward needs cond (the state)")
        if cond.shape[-1] != self.env.obs_dim:
            raise ValueError(f"states of dimension {cond.shape[-1]}; {self.env.gym_id}'s are "
                             f"{self.env.obs_dim}")
        critic = self.critic()
        device = next(critic.parameters()).device
        with torch.no_grad():
            q = critic.q(cond.float().to(device), self.to_action(x.float()).to(device))
        return q.float().to(x.device)

    def reference_log_z(self, beta: float = 1.0, cond: Tensor | None = None) -> Tensor | None:
        """log Z_θ(s) = log E_{p_θ}[e^{βQ}] at the evaluation states (None for any other)."""
        self._beta = beta
        index = self.eval_index(self.eval_conditions() if cond is None else cond)
        return None if index is None else self.target(beta)["log_z"][index]

    @torch.no_grad()
    def evaluate(self, x: Tensor, cond: Tensor | None = None,
                 ctx: EvalContext | None = None) -> dict[str, float]:
        """E[Q] at the evaluation states against the target's (``q_gap_ratio``: mean
        |E_π[Q] − E_target[Q]| / mean |E_prior[Q] − E_target[Q]|, 1 at the start), and, with
        ``ctx``, the posterior's score over ``eval_episodes`` episodes (``score``, its std over
        episodes, ``failed_episodes``); ``neg_score`` orders baseline settings."""
        if cond is None:
            raise ValueError("pendulum is conditional: evaluate needs cond (the states)")
        index = self.eval_index(cond)
        if index is None:
            raise ValueError("pendulum evaluates at its evaluation states only")
        t = self.target(self._beta)
        q = self.log_reward(x, cond).double()
        gaps, prior_gaps = [], []
        for i in index.unique().tolist():
            gaps.append(abs(q[index == i].mean() - t["q"][i]).item())
            prior_gaps.append(abs(t["prior_q"][i] - t["q"][i]).item())
        out = {"q_gap": sum(gaps) / len(gaps), "prior_q_gap": sum(prior_gaps) / len(gaps),
               "mean_q": q.mean().item(), "prior_score": self.stats["prior_score"]}
        out["q_gap_ratio"] = out["q_gap"] / max(out["prior_q_gap"], 1e-12)
        if ctx is not None:
            device = next(ctx.posterior.parameters()).device
            episodes = run_episodes(
                lambda obs: self.to_action(ctx.sample(torch.from_numpy(obs).float().to(
                    device)).cpu()).numpy(),
                self.config.eval_episodes, self.config.episode_seed, env=self.env)
            self._last_episodes = episodes
            scores = episodes.scores()
            out.update({"score": float(scores.mean()) if scores.size else float("nan"),
                        "score_std": float(scores.std()) if scores.size else float("nan"),
                        "failed_episodes": float(episodes.failed.sum())})
            out["neg_score"] = -out["score"]
        return out

    # -- picture -----------------------------------------------------------------------------------
    def plot(self, x: Tensor, path: Path, title: str = "", cond: Tensor | None = None) -> None:
        """The last evaluation's first episode (angle and torque over time) and, at four
        evaluation states, histograms of the torques of the prior, the posterior and the
        target (prior samples weighted by e^{βQ})."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 5, figsize=(17, 3.2), dpi=100,
                                 gridspec_kw={"width_ratios": [2, 1, 1, 1, 1]})
        if self._last_episodes is not None:
            draw_episode(axes[0], self._last_episodes)
        index = None if cond is None else self.eval_index(cond)
        prior = self.stats["prior_samples"]
        bins = np.linspace(-self.env.max_action, self.env.max_action, 41)
        for j, ax in enumerate(axes[1:]):
            if index is None or j >= prior.shape[0]:
                ax.axis("off")
                continue
            p = self.to_action(prior[j])
            w = self.target(self._beta)  # computed once per β
            s = self.eval_conditions()[j]
            q = self.critic().q(s.expand(p.shape[0], -1), p).double()
            weights = (self._beta * q).softmax(0).numpy()
            ax.hist(p[:, 0].numpy(), bins, density=True, color="grey", alpha=0.4, label="prior")
            ax.hist(p[:, 0].numpy(), bins, weights=weights, density=True, histtype="step",
                    color="tab:red", label="target")
            ax.hist(self.to_action(x[index == j])[:, 0].numpy(), bins, density=True,
                    histtype="step", color="tab:blue", label="posterior")
            where = (f"θ={math.degrees(math.atan2(float(s[1]), float(s[0]))):.0f}°, "
                     f"θ̇={float(s[2]):.1f}" if self.env is PENDULUM else f"state {j}")
            ax.set(title=f"{where}  E[Q] tgt {w['q'][j]:.2f}",
                   xlabel="torque" if self.env is PENDULUM else "action[0]")
            ax.title.set_fontsize(8)
        axes[1].legend(fontsize=6)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def make_task(config: Config) -> PendulumTask:
    return PendulumTask(config)

