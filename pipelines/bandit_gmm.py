"""Control, exact tier: a contextual bandit whose behaviour policy is a Gaussian mixture (issue
#17, Tier A).

States s ∈ [−1, 1]^D (D = ``state_dim``, 2 by default), actions a ∈ ℝ². The behaviour policy
μ(a | s) is a mixture of K isotropic Gaussians (K = 3 by default) whose means rotate and shift
smoothly with s and whose weights are a softmax of the base weights' logs plus a linear function
of s. The critic is Q(s, a) = −‖a − g(s)‖² / (2ℓ²) with the goal g(s) beside the component of
lowest base weight, so the posterior moves most of its mass to the rarest behaviour.

The posterior π*(a | s) ∝ μ(a | s)·exp(β·Q(s, a)) is again a mixture, in closed form: with
λ² = ℓ²/β, component k (weight w_k, mean m_k, variance σ_k²) becomes

    σ'_k² = σ_k² λ² / (σ_k² + λ²),   m'_k = (λ² m_k + σ_k² g) / (σ_k² + λ²),
    c_k   = λ² / (σ_k² + λ²) · exp(−‖g − m_k‖² / (2 (σ_k² + λ²)))   (in ℝ²),
    π_k   = w_k c_k / Z(s),          Z(s) = Σ_k w_k c_k = E_μ[exp(β Q)].

- Prior p_θ(a | s): ``DDPMGaussian(2, T, learn_variance=True)`` over a state-conditioned
  ``TimeMLP``, behaviour-cloned (ε-matching) on ``num_data`` (s, a) pairs drawn from μ, or on the
  pairs of an .npz file (``dataset``: keys ``states`` [N, D] and ``actions`` [N, 2]; checked when
  the config is loaded: one line naming the key and first bad row).
- Reward: log r(a; s) = Q(s, a); the run's β is ``train.objective.beta``.
- Target: p_θ(a | s)·e^{βQ} / Z_θ(s). At pretraining, ``stats_samples`` prior samples are drawn
  for each of the ``num_eval_states`` fixed evaluation states and stored with the prior; the
  target at any β is these samples weighted by e^{βQ} (its mode weights, E[Q] and
  log Z_θ(s) = log mean e^{βQ}). The figures for β = 1 are recorded in the checkpoint's stats.
- Mode weights of a sample set: its mean responsibility vector under the analytic π*(· | s)
  (under π* itself that is exactly π_k; a hard nearest-component rule would not be).

``bounded``: actions lie in (−1, 1)²; the diffusion, μ, Q and π* live on u = arctanh(a), so
everything above holds for u (Q(s, a) = −‖arctanh a − g(s)‖² / (2ℓ²)) and an action is tanh of a
sample. A dataset's actions must then lie strictly inside (−1, 1).

The condition is the state itself, float32 [D]; training draws states uniformly from
[−1, 1]^D (an unlimited stream), evaluation reports on the fixed ones.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from torch import Tensor, nn

from rtb_ray.datasets import read_npz
from rtb_ray.networks import TimeMLP
from rtb_ray.pretrain import (PriorCheckpointConfig, load_or_pretrain, pretrain_prior,
                              read_checkpoint, save_prior, uniform_rows)
from rtb_ray.tasks import EvalContext
from rtb_ray.transitions import DDPMGaussian

ACTION_DIM = 2
DATA_KEYS = ("states", "actions")


# -- the behaviour policy, the critic and the exact posterior --------------------------------------
@dataclass
class GaussianMixture:
    """Per row, a mixture of K isotropic Gaussians in ℝ²: ``log_weights [n, K]``,
    ``means [n, K, 2]``, ``variances [n, K]`` (float64)."""

    log_weights: Tensor
    means: Tensor
    variances: Tensor

    def component_log_probs(self, x: Tensor) -> Tensor:
        """log w_k + log N(x; m_k, σ_k² I) per row and component, ``[n, K]``."""
        sq = (x.double()[:, None, :] - self.means).square().sum(-1)
        return self.log_weights - 0.5 * (sq / self.variances
                                         + ACTION_DIM * torch.log(2 * math.pi * self.variances))

    def log_prob(self, x: Tensor) -> Tensor:
        return self.component_log_probs(x).logsumexp(-1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """p(component k | x) per row, ``[n, K]``."""
        return self.component_log_probs(x).softmax(-1)

    def sample(self, generator: torch.Generator) -> Tensor:
        """One draw per row, ``[n, 2]`` float64."""
        n = self.means.shape[0]
        k = torch.multinomial(self.log_weights.exp(), 1, generator=generator)[:, 0]
        rows = torch.arange(n)
        noise = torch.randn(n, ACTION_DIM, generator=generator, dtype=torch.float64)
        return self.means[rows, k] + self.variances[rows, k, None].sqrt() * noise

    def expected_quadratic(self, centre: Tensor) -> Tensor:
        """E‖x − centre‖² per row (centre ``[n, 2]``): Σ_k π_k (‖m_k − c‖² + 2σ_k²)."""
        per = (self.means - centre.double()[:, None, :]).square().sum(-1) + ACTION_DIM * \
            self.variances
        return (self.log_weights.exp() * per).sum(-1)


class Bandit:
    """μ(a | s), g(s), Q(s, a) and the exact π*(a | s) of one task configuration. The state
    dependence is drawn once from ``seed``: a rotation angle α(s) = r·s of the component means,
    a shift c(s) = C s of their centre, and weight logits log w + W s (all of order 0.3–0.6 on
    [−1, 1]^D: the components never cross)."""

    def __init__(self, state_dim: int, weights: list[float], stds: list[float], radius: float,
                 q_length: float, goal_offset: float, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        scale = 1 / math.sqrt(state_dim)
        k = len(weights)
        self.state_dim, self.num_components = state_dim, k
        self.rotate = 0.6 * scale * torch.randn(state_dim, generator=gen, dtype=torch.float64)
        self.shift = 0.3 * scale * torch.randn(ACTION_DIM, state_dim, generator=gen,
                                               dtype=torch.float64)
        self.tilt = 0.5 * scale * torch.randn(k, state_dim, generator=gen, dtype=torch.float64)
        w = torch.tensor(weights, dtype=torch.float64)
        self.log_base = (w / w.sum()).log()
        self.variances = torch.tensor(stds, dtype=torch.float64).square()
        self.angles = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
        self.radius, self.q_length, self.goal_offset = radius, q_length, goal_offset
        self.rarest = int(w.argmin())

    def _angles(self, s: Tensor) -> Tensor:
        return self.angles + (s.double() @ self.rotate)[:, None]  # [n, K]

    def behaviour(self, s: Tensor) -> GaussianMixture:
        """μ(· | s) per row of ``s [n, D]``."""
        s = s.double()
        theta = self._angles(s)
        centre = s @ self.shift.T  # [n, 2]
        means = centre[:, None, :] + self.radius * torch.stack([theta.cos(), theta.sin()], -1)
        log_w = (self.log_base + s @ self.tilt.T).log_softmax(-1)
        return GaussianMixture(log_w, means, self.variances.expand(s.shape[0], -1))

    def goal(self, s: Tensor) -> Tensor:
        """g(s): the rarest component's mean, moved ``goal_offset`` along its circle."""
        s = s.double()
        theta = self._angles(s)[:, self.rarest]
        mean = self.behaviour(s).means[:, self.rarest]
        return mean + self.goal_offset * torch.stack([-theta.sin(), theta.cos()], -1)

    def q(self, s: Tensor, a: Tensor) -> Tensor:
        """Q(s, a) = −‖a − g(s)‖² / (2ℓ²) per row, float64."""
        return -(a.double() - self.goal(s)).square().sum(-1) / (2 * self.q_length**2)

    def posterior(self, s: Tensor, beta: float = 1.0) -> tuple[GaussianMixture, Tensor]:
        """π*(· | s) ∝ μ(· | s)·exp(β Q(s, ·)) and log Z(s) = log E_μ[exp(β Q)], per row."""
        mu, g = self.behaviour(s), self.goal(s)
        lam2 = self.q_length**2 / beta
        total = mu.variances + lam2  # σ_k² + λ²
        means = (lam2 * mu.means + mu.variances[..., None] * g[:, None, :]) / total[..., None]
        variances = mu.variances * lam2 / total
        log_c = 0.5 * ACTION_DIM * torch.log(lam2 / total) \
            - (g[:, None, :] - mu.means).square().sum(-1) / (2 * total)
        joint = mu.log_weights + log_c
        log_z = joint.logsumexp(-1)
        return GaussianMixture(joint - log_z[:, None], means, variances), log_z

    def expected_q(self, mixture: GaussianMixture, s: Tensor) -> Tensor:
        """E[Q(s, a)] per row under a mixture over a (closed form)."""
        return -mixture.expected_quadratic(self.goal(s)) / (2 * self.q_length**2)


# -- data ------------------------------------------------------------------------------------------
def _first_bad_row(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(1))[0])


def check_dataset(where: str, data: Mapping[str, np.ndarray], state_dim: int,
                  bounded: bool) -> tuple[np.ndarray, np.ndarray]:
    """The (states [N, D], actions [N, 2]) float64 arrays of behaviour data, or a one-line
    ValueError starting with ``where`` that names the key and, for a bad value, its first row: a
    missing key, a shape mismatch, a value that is not a finite number, a state outside
    [−1, 1], an action outside (−1, 1) when ``bounded``."""
    missing = [k for k in DATA_KEYS if k not in data]
    if missing:
        has = ", ".join(sorted(data)) or "nothing"
        raise ValueError(f"{where}: missing key {missing[0]!r} (it has: {has})")
    arrays = {}
    for key, width in (("states", state_dim), ("actions", ACTION_DIM)):
        try:
            v = np.asarray(data[key])
        except ValueError as err:  # e.g. an object array, which we never unpickle
            raise ValueError(f"{where}: key {key!r}: {str(err).splitlines()[0]}") from None
        if v.dtype.kind not in "fiub":
            raise ValueError(f"{where}: key {key!r}: dtype {v.dtype} is not numeric")
        if v.ndim != 2 or v.shape[1] != width:
            what = "task.state_dim" if key == "states" else "actions in ℝ²"
            raise ValueError(f"{where}: key {key!r}: shape {tuple(v.shape)}, expected "
                             f"(N, {width}) ({what})")
        arrays[key] = v.astype(np.float64)
    states, actions = arrays["states"], arrays["actions"]
    if states.shape[0] != actions.shape[0]:
        raise ValueError(f"{where}: key 'actions': {actions.shape[0]} rows, but 'states' has "
                         f"{states.shape[0]}")
    if states.shape[0] == 0:
        raise ValueError(f"{where}: key 'states': no rows")
    for key, v in arrays.items():
        bad = ~np.isfinite(v)
        if bad.any():
            row = _first_bad_row(bad)
            raise ValueError(f"{where}: key {key!r}, row {row}: {v[row].tolist()} holds a "
                             f"value that is not a finite number")
    bad = np.abs(states) > 1
    if bad.any():
        row = _first_bad_row(bad)
        raise ValueError(f"{where}: key 'states', row {row}: {states[row].tolist()} is outside "
                         f"[-1, 1]^{state_dim}")
    if bounded:
        bad = np.abs(actions) >= 1
        if bad.any():
            row = _first_bad_row(bad)
            raise ValueError(f"{where}: key 'actions', row {row}: {actions[row].tolist()} is "
                             f"outside (-1, 1)² (task.bounded: actions are tanh of the prior's "
                             f"samples)")
    return states, actions


def read_dataset(path: Path, state_dim: int, bounded: bool) -> tuple[np.ndarray, np.ndarray,
                                                                        str]:
    """An .npz file of behaviour data, checked (``check_dataset``), and its sha256. Arrays are
    read without pickle: an object array is refused, never unpickled."""
    data, digest = read_npz(path, DATA_KEYS)
    states, actions = check_dataset(f"dataset {path}", data, state_dim, bounded)
    return states, actions, digest


# -- config ----------------------------------------------------------------------------------------
class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(4000, ge=1)
    batch_size: int = Field(1024, ge=1)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0
    # per evaluation state: log Z_θ(s) to about ±0.02 and the target's mode weights to about
    # ±0.01 (the importance weights keep ~15 % of the samples)
    stats_samples: int = Field(16_384, ge=100, le=1_000_000,
                               description="prior samples per evaluation state, stored")


class Config(PriorCheckpointConfig):
    """Settings of the Gaussian-mixture bandit (the ``task:`` section of a run config)."""

    name: Literal["bandit_gmm"] = "bandit_gmm"
    state_dim: int = Field(2, ge=1, le=64, description="D: states in [-1, 1]^D")
    bounded: bool = Field(False, description="actions in (-1, 1)²: the prior is over arctanh(a)")
    mode_weights: list[float] = Field(
        default_factory=lambda: [0.5, 0.35, 0.15], min_length=2, max_length=16,
        description="the behaviour's component weights at s = 0 (normalised)")
    mode_stds: list[float] = Field(default_factory=lambda: [0.3, 0.25, 0.2], min_length=2,
                                   max_length=16, description="each component's std")
    radius: float = Field(1.5, gt=0, description="component means lie on this circle")
    behaviour_seed: int = Field(0, description="draws the state dependence of μ")
    q_length: float = Field(1.0, gt=0, description="ℓ: Q = −‖a − g(s)‖² / (2ℓ²)")
    goal_offset: float = Field(0.25, ge=0, description="g(s): this far from the rarest mean")
    dataset: str | None = Field(None, description="an .npz of states [N, D] and actions [N, 2] "
                                                  "(default: num_data pairs drawn from μ)")
    num_data: int = Field(50_000, ge=1, le=10_000_000, description="pairs drawn from μ")
    data_seed: int = 0
    num_eval_states: int = Field(16, ge=1, le=256)
    eval_seed: int = Field(1, description="draws the evaluation states")
    num_steps: int = Field(64, ge=1, le=1000, description="T, DDPM steps")
    min_std: float = Field(1e-3, gt=0, description="floor on each reverse step's std")
    hidden: int = Field(128, ge=1)
    depth: int = Field(2, ge=0)
    pretrain: PretrainConfig = PretrainConfig()
    _dataset_sha256: str | None = PrivateAttr(None)

    @field_validator("mode_weights", "mode_stds")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not all(x > 0 for x in v):
            raise ValueError(f"must all be > 0 (got {v})")
        return v

    @field_validator("dataset")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        # absolute: a resumed run, `rtb-ray sample` and every Ray node read the same file
        return None if v is None else str(Path(v).expanduser().resolve())

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if len(self.mode_stds) != len(self.mode_weights):
            raise ValueError(f"mode_stds: {len(self.mode_stds)} stds for "
                             f"{len(self.mode_weights)} mode_weights")
        if self.dataset is not None:
            # read and checked here, when the config is loaded: bad data is one line before
            # anything is pretrained, cached or started; its digest names the prior
            *_, self._dataset_sha256 = read_dataset(Path(self.dataset), self.state_dim,
                                                    self.bounded)
        return self

    def spec(self) -> dict:
        """Everything the prior checkpoint depends on: μ and the data, the network, the
        evaluation states and Q (the stored target figures are under this Q)."""
        data = ({"dataset_sha256": self._dataset_sha256} if self.dataset is not None
                else {"num_data": self.num_data, "data_seed": self.data_seed})
        return {"family": "ddpm-linear", "state_dim": self.state_dim, "bounded": self.bounded,
                "mode_weights": self.mode_weights, "mode_stds": self.mode_stds,
                "radius": self.radius, "behaviour_seed": self.behaviour_seed,
                "q_length": self.q_length, "goal_offset": self.goal_offset, **data,
                "num_eval_states": self.num_eval_states, "eval_seed": self.eval_seed,
                "num_steps": self.num_steps, "min_std": self.min_std, "hidden": self.hidden,
                "depth": self.depth, "pretrain": self.pretrain.model_dump()}


def generate_data(config: Config) -> tuple[np.ndarray, np.ndarray]:
    """``num_data`` (s, a) pairs: s uniform on [−1, 1]^D, a ~ μ(· | s) (tanh of it when
    ``bounded``), drawn from ``data_seed`` alone: the same pairs for the same seed."""
    c = config
    bandit = make_bandit(c)
    gen = torch.Generator().manual_seed(c.data_seed)
    states = 2 * torch.rand(c.num_data, c.state_dim, generator=gen, dtype=torch.float64) - 1
    u = bandit.behaviour(states).sample(gen)
    actions = u.tanh() if c.bounded else u
    return states.numpy(), actions.numpy()


def make_bandit(config: Config) -> Bandit:
    return Bandit(config.state_dim, config.mode_weights, config.mode_stds, config.radius,
                  config.q_length, config.goal_offset, config.behaviour_seed)


# -- the task --------------------------------------------------------------------------------------
class BanditGMMTask:
    name = "bandit_gmm"
    progress_metrics = ("tv_target", "tv_analytic", "q_gap_ratio", "log_z_error_max")
    baseline_metric = "tv_target"

    def __init__(self, config: Config) -> None:
        self.config = c = config
        self.family = DDPMGaussian(ACTION_DIM, c.num_steps, c.min_std, learn_variance=True)
        self.bandit = make_bandit(c)
        gen = torch.Generator().manual_seed(c.eval_seed)
        self.eval_states = (2 * torch.rand(c.num_eval_states, c.state_dim, generator=gen) - 1
                            ).float()
        self._stats: dict | None = None
        self._data: tuple[Tensor, Tensor] | None = None
        self._targets: dict[float, dict[str, Tensor]] = {}
        self._beta = 1.0  # the evaluator asks reference_log_z (with the run's β) first

    # -- data --------------------------------------------------------------------------------------
    def data(self) -> tuple[Tensor, Tensor]:
        """The behaviour data as (states [N, D], x [N, 2]) float32, x the diffusion's variable
        (arctanh of the actions when ``bounded``), checked; read or drawn once."""
        if self._data is None:
            c = self.config
            if c.dataset is not None:
                states, actions, digest = read_dataset(Path(c.dataset), c.state_dim, c.bounded)
                if c._dataset_sha256 is not None and digest != c._dataset_sha256:
                    raise ValueError(f"dataset {c.dataset}: the file changed since the config "
                                     f"was loaded (sha256 {digest[:12]}, was "
                                     f"{c._dataset_sha256[:12]})")
            else:
                states, actions = check_dataset("generated data", dict(zip(
                    DATA_KEYS, generate_data(c))), c.state_dim, c.bounded)
            x = np.arctanh(actions) if c.bounded else actions
            self._data = (torch.from_numpy(states).float(), torch.from_numpy(x).float())
        return self._data

    def known_terminals(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` behaviour pairs (offline data, the ``dataset`` source): (x, state)."""
        states, x = self.data()
        rows = torch.randint(0, states.shape[0], (n,), generator=generator)
        return x[rows], states[rows]

    # -- conditions --------------------------------------------------------------------------------
    def conditions(self, n: int, generator: torch.Generator) -> Tensor:
        return 2 * torch.rand(n, self.config.state_dim, generator=generator) - 1

    def eval_conditions(self) -> Tensor:
        return self.eval_states.clone()

    def eval_index(self, cond: Tensor) -> Tensor | None:
        """Each row's index among the evaluation states, or None if a row is none of them."""
        rows = cond.float().cpu().reshape(-1, self.config.state_dim)
        # not torch.cdist: its matrix-product path is off by ~1e-3 even for equal points
        best, index = (rows[:, None, :] - self.eval_states).abs().amax(-1).min(1)
        return index if bool((best < 1e-5).all()) else None

    # -- the prior ---------------------------------------------------------------------------------
    def new_network(self) -> TimeMLP:
        c = self.config
        return TimeMLP(ACTION_DIM, c.num_steps, hidden=c.hidden, depth=c.depth,
                       out_dim=self.family.net_out_dim, cond_dim=c.state_dim)

    def prior_path(self) -> Path:
        return self.config.prior_path()

    def prior(self) -> TimeMLP:
        path = self.config.prior_path()
        if path.exists():
            self._check_state_dim(path)
        state, self._stats = load_or_pretrain(self.config, self.name, self.pretrain)
        net = self.new_network()
        net.load_state_dict(state)
        return net.requires_grad_(False).eval()

    def _check_state_dim(self, path: Path) -> None:
        """A prior of another state dimension is refused by name (its network reads other
        inputs), before its spec is compared."""
        ckpt = read_checkpoint(path, "an rtb-ray prior checkpoint")
        spec = ckpt.get("spec") if isinstance(ckpt, dict) else None
        theirs = spec.get("state_dim") if isinstance(spec, dict) else None
        if theirs is not None and theirs != self.config.state_dim:
            raise ValueError(f"prior_checkpoint {path}: a prior over states of dimension "
                             f"{theirs}; task.state_dim is {self.config.state_dim} (refused)")

    def pretrain(self, progress: bool = True) -> dict:
        """Behaviour cloning (ε-matching on the data), then ``stats_samples`` prior samples per
        evaluation state, stored with the prior: the learned-prior target's ingredients."""
        c, cfg = self.config, self.config.pretrain
        states, x = self.data()  # checked before any training: bad data never reaches the cache
        torch.manual_seed(cfg.seed)
        net = self.new_network()
        start = time.perf_counter()
        losses = pretrain_prior(self.family, net, uniform_rows(x, states), steps=cfg.steps,
                                batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                                progress=progress)
        train_seconds = time.perf_counter() - start
        samples = self._prior_samples(net.eval(), cfg.stats_samples, cfg.seed + 1)
        stats: dict = {"prior_samples": samples, "eval_states": self.eval_states.clone(),
                       "pretrain_seconds": train_seconds, "last_loss": losses[-1],
                       "stats_seconds": time.perf_counter() - start - train_seconds}
        self._stats = stats
        self._targets.clear()
        stats.update(self._summary(1.0))
        save_prior(c.prior_path(), self.name, c.spec(), net, stats)
        return stats

    @torch.no_grad()
    def _prior_samples(self, net: nn.Module, n: int, seed: int) -> Tensor:
        """``n`` prior terminal samples per evaluation state, ``[states, n, 2]`` float32."""
        gen = torch.Generator().manual_seed(seed)
        device = next(net.parameters()).device
        out = []
        for s in self.eval_states:
            chunks = []
            for i in range(0, n, 32_768):
                m = min(32_768, n - i)
                cond = s.expand(m, -1).to(device)
                chunks.append(self.family.sample(net, m, cond=cond, generator=gen)[0][:, -1].cpu())
            out.append(torch.cat(chunks))
        return torch.stack(out)

    @property
    def stats(self) -> dict:
        if self._stats is None:
            self.prior()
        assert self._stats is not None
        return self._stats

    # -- the target --------------------------------------------------------------------------------
    def target(self, beta: float = 1.0) -> dict[str, Tensor]:
        """Per evaluation state (float64 ``[S]`` or ``[S, K]``), from the stored prior samples
        and the closed forms: the learned-prior target's mode weights, E[Q] and log Z_θ; the
        prior's E[Q] and mode weights (under μ's responsibilities) and the analytic π*'s
        weights, E[Q] and log Z."""
        if beta not in self._targets:
            s = self.eval_states
            x = self.stats["prior_samples"]  # [S, n, 2]
            num, n = x.shape[0], x.shape[1]
            flat_s = s.repeat_interleave(n, 0)
            flat_x = x.reshape(-1, ACTION_DIM)
            q = self.bandit.q(flat_s, flat_x).view(num, n)
            exact, log_z = self.bandit.posterior(s, beta)
            resp = self.bandit.posterior(flat_s, beta)[0].responsibilities(flat_x).view(num, n, -1)
            w = (beta * q).softmax(1)
            behaviour_resp = self.bandit.behaviour(flat_s).responsibilities(flat_x).view(num, n,
                                                                                      -1)
            self._targets[beta] = {
                "weights": (w[..., None] * resp).sum(1),
                "q": (w * q).sum(1),
                "log_z": (beta * q).logsumexp(1) - math.log(n),
                "ess_fraction": 1 / w.square().sum(1) / n,
                "prior_q": q.mean(1),
                "prior_weights": behaviour_resp.mean(1),
                "exact_weights": exact.log_weights.exp(),
                "exact_q": self.bandit.expected_q(exact, s),
                "exact_log_z": log_z,
                "behaviour_weights": self.bandit.behaviour(s).log_weights.exp(),
                "behaviour_q": self.bandit.expected_q(self.bandit.behaviour(s), s),
            }
        return self._targets[beta]

    def _summary(self, beta: float) -> dict[str, float]:
        """Means over the evaluation states of how far the learned prior and its target are
        from μ and π* (the prior's own error, beside which the posterior's is read)."""
        t = self.target(beta)
        tv = lambda p, q: (0.5 * (p - q).abs().sum(-1)).mean().item()  # noqa: E731
        return {"target_tv_analytic": tv(t["weights"], t["exact_weights"]),
                "prior_tv_behaviour": tv(t["prior_weights"], t["behaviour_weights"]),
                "log_z_theta": t["log_z"].mean().item(),
                "log_z_theta_vs_exact": (t["log_z"] - t["exact_log_z"]).abs().mean().item(),
                "target_ess_fraction_min": t["ess_fraction"].min().item(),
                "prior_q_gap": (t["prior_q"] - t["q"]).abs().mean().item()}

    # -- reward and evaluation ---------------------------------------------------------------------
    def log_reward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Q(s, a) of actions ``x [n, 2]`` (arctanh of the action when bounded) in states
        ``cond [n, D]``."""
        if cond is None:
            raise ValueError("bandit_gmm is conditional: log_reward needs cond (the state)")
        if cond.shape[-1] != self.config.state_dim:
            raise ValueError(f"states of dimension {cond.shape[-1]}; task.state_dim is "
                             f"{self.config.state_dim}")
        return self.bandit.q(cond.cpu(), x.cpu()).float().to(x.device)

    def reference_log_z(self, beta: float = 1.0, cond: Tensor | None = None) -> Tensor | None:
        """log Z_θ(s) = log E_{p_θ}[e^{βQ}] per row, from the stored prior samples (known at
        the evaluation states only: None for any other)."""
        self._beta = beta
        index = self.eval_index(self.eval_states if cond is None else cond)
        return None if index is None else self.target(beta)["log_z"][index]

    def exact_log_z(self, cond: Tensor, beta: float = 1.0) -> Tensor:
        """log Z(s) = log E_μ[e^{βQ}] of the behaviour policy itself (closed form), any state."""
        return self.bandit.posterior(cond, beta)[1]

    def mode_weights(self, x: Tensor, state: Tensor, beta: float = 1.0) -> Tensor:
        """Mean responsibility vector of samples ``x [n, 2]`` under π*(· | state)."""
        exact, _ = self.bandit.posterior(state.reshape(1, -1).expand(x.shape[0], -1), beta)
        return exact.responsibilities(x).mean(0)

    @torch.no_grad()
    def evaluate(self, x: Tensor, cond: Tensor | None = None,
                 ctx: EvalContext | None = None) -> dict[str, float]:
        """Per evaluation state: TV of the samples' mode weights to the learned-prior target
        (``tv_target``) and to π* (``tv_analytic``), E[Q] against the target's; means over
        states, the worst, and ``q_gap_ratio`` = mean |E_π[Q] − E_target[Q]| / mean
        |E_μ[Q] − E_target[Q]| (E_μ under the behaviour-cloned prior: 1 at the start).
        ``tv_floor``: what exact π* samples, as many per state, score against π* (noise)."""
        if cond is None:
            raise ValueError("bandit_gmm is conditional: evaluate needs cond (the states)")
        index = self.eval_index(cond)
        if index is None:
            raise ValueError("bandit_gmm evaluates at its evaluation states only")
        beta = self._beta
        t = self.target(beta)
        gen = torch.Generator().manual_seed(0)
        per: dict[str, list[float]] = {k: [] for k in (
            "tv_target", "tv_analytic", "q_gap", "prior_q_gap", "q_analytic_gap", "tv_floor")}
        for i in index.unique().tolist():
            xs = x[index == i]
            s = self.eval_states[i]
            w = self.mode_weights(xs, s, beta)
            q = self.bandit.q(s.expand(xs.shape[0], -1), xs).mean()
            per["tv_target"].append(0.5 * (w - t["weights"][i]).abs().sum().item())
            per["tv_analytic"].append(0.5 * (w - t["exact_weights"][i]).abs().sum().item())
            per["q_gap"].append(abs(q - t["q"][i]).item())
            per["prior_q_gap"].append(abs(t["prior_q"][i] - t["q"][i]).item())
            per["q_analytic_gap"].append(abs(q - t["exact_q"][i]).item())
            exact, _ = self.bandit.posterior(s[None].expand(xs.shape[0], -1), beta)
            w_exact = self.mode_weights(exact.sample(gen), s, beta)
            per["tv_floor"].append(0.5 * (w_exact - t["exact_weights"][i]).abs().sum().item())
        out = {k: sum(v) / len(v) for k, v in per.items()}
        out["tv_target_max"] = max(per["tv_target"])
        out["q_gap_ratio"] = out["q_gap"] / max(out["prior_q_gap"], 1e-12)
        out["q_gap_ratio_max"] = max(a / max(b, 1e-12) for a, b in zip(per["q_gap"],
                                                                       per["prior_q_gap"]))
        summary = self._summary(beta)
        out["target_tv_analytic"] = summary["target_tv_analytic"]
        out["prior_tv_behaviour"] = summary["prior_tv_behaviour"]
        out["log_z_theta_vs_exact"] = summary["log_z_theta_vs_exact"]
        return out

    # -- picture -----------------------------------------------------------------------------------
    def _spread(self, indices: list[int], k: int) -> list[int]:
        """Up to ``k`` of the evaluation states ``indices``, far apart (farthest-point order)."""
        chosen = indices[:1]
        while len(chosen) < min(k, len(indices)):
            rest = [i for i in indices if i not in chosen]
            dist = [min((self.eval_states[i] - self.eval_states[j]).norm().item()
                        for j in chosen) for i in rest]
            chosen.append(rest[dist.index(max(dist))])
        return chosen

    def plot(self, x: Tensor, path: Path, title: str = "", cond: Tensor | None = None) -> None:
        """For four evaluation states far apart: prior samples (grey), posterior samples (blue), the
        exact π*'s density contours (red) and the goal g(s) (star)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        assert cond is not None
        index = self.eval_index(cond)
        shown = [] if index is None else self._spread(index.unique().tolist(), 4)
        fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(3.4 * max(len(shown), 1), 3.6),
                                 dpi=100, squeeze=False)
        lim = self.config.radius + 1.5
        grid = torch.linspace(-lim, lim, 120, dtype=torch.float64)
        gx, gy = torch.meshgrid(grid, grid, indexing="xy")
        points = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
        prior = self.stats["prior_samples"]
        for ax, i in zip(axes[0], shown):
            s = self.eval_states[i]
            p = prior[i][:1500].numpy()
            ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.25, color="grey", label="prior")
            q = x[index == i][:1500].numpy()
            ax.scatter(q[:, 0], q[:, 1], s=2, alpha=0.35, color="tab:blue", label="posterior")
            exact, _ = self.bandit.posterior(s[None].expand(points.shape[0], -1), self._beta)
            log_density = exact.log_prob(points).view(gx.shape)
            # levels in log density: the small components are e^-3 below the large one's peak
            top = log_density.max().item()
            ax.contour(gx.numpy(), gy.numpy(), log_density.numpy(),
                       levels=[top - d for d in (6.0, 4.5, 3.0, 1.5, 0.5)], colors="tab:red",
                       linewidths=0.7, linestyles="solid")  # negative levels: not dashed
            g = self.bandit.goal(s[None])[0].numpy()
            ax.scatter([g[0]], [g[1]], marker="*", s=80, color="black", label="g(s)")
            state = ", ".join(f"{v:.2f}" for v in s.tolist()[:3])
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal",
                   title=f"s = ({state}{', …' if s.numel() > 3 else ''})")
            if self.config.bounded:
                ax.set(xlabel="arctanh a[0]", ylabel="arctanh a[1]")
        axes[0][0].legend(loc="upper left", fontsize=6)
        fig.suptitle(f"{title}  (red: exact π*)", fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def make_task(config: Config) -> BanditGMMTask:
    return BanditGMMTask(config)
