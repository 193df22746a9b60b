"""Text-to-image, exact tier: prompt-conditioned Gaussian "images" under DDIM (issue #18, Tier A).

Each of ``num_prompts`` prompts c has images x ∈ ℝ^{C×H×W} (D = C·H·W; 3×8×8 by default) drawn
from N(μ_c, Σ_c), Σ_c = σ²I + U_c diag(λ) U_cᵀ (U_c: ``rank`` orthonormal directions). The prior
is the DDIM sampler (η = 1, ``DDIMGaussian`` on a diffusers ``DDIMScheduler``) driven by the exact
ε-predictor of that data, ε(x_t, t, c) = √(1−ā)·(āΣ_c + (1−ā)I)⁻¹(x_t − √ā·μ_c): nothing is
trained, and every quantity below is a closed form (float64, ``chain_moments``).

- Each DDIM step is linear-Gaussian in x, so the prior's terminal marginal is N(m_c, S_c), by
  propagating mean and covariance from x_{t_0} ~ N(0, I) through the steps. (m_c, S_c are the
  *sampler's* marginal: close to, not equal to, the data's N(μ_c, Σ_c).)
- Reward log r(x, c) = ⟨a_c, x⟩. Target N(m_c + β S_c a_c, S_c), log Z_c = β⟨a_c, m_c⟩ +
  β²/2·a_cᵀS_c a_c. A linear tilt moves each step's mean and keeps its variance, so the exact
  posterior is in the family with the prior's variances.
- The floor. Every process starts at the same x_{t_0} ~ N(0, I); the target's start is that
  tilted by h(x_{t_0}) = E[r^β | x_{t_0}], which no posterior can reach. With G the linear map
  x_{t_0} ↦ E[x_0 | x_{t_0}] under the prior, the best posterior with the fixed start has
  log Z − ELBO = log Z − log Z_φ* = β²/2·‖Gᵀa_c‖² (``log_z_floor``), and ends in
  N(m_c + β(S_c − GGᵀ)a_c, S_c − ...). ``reference_log_z`` is that attainable log Z_c − floor_c,
  so log Z errors and ELBO gaps are measured against what can be reached; the floor itself is
  reported (keep it ≤ 0.01 by the spacing: ā at the first timestep must be ~0).
- Posterior network (``posterior_network``): the frozen exact prior plus a zero-initialised
  ``TimeMLP`` correction of ε reading (x, t, prompt one-hot), a UNet-free stand-in for LoRA.
- Metrics per prompt (``evaluate``): ``mean_error_ratio`` = ‖mean − exact target mean‖ /
  ‖β S_c a_c‖ (the prior-to-target shift), ``cov_rel_error`` = the worst relative error of the
  variance along U_c's directions, along a_c, and of the mean variance in the rest.

Conditions are prompt ids (int64 [1]): a table log Z(c) is the natural choice.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from rtb_ray.config import AdapterConfig, ConfigError
from rtb_ray.networks import TimeMLP
from rtb_ray.tasks import EvalContext
from rtb_ray.transitions import DDIMGaussian


class Config(BaseModel):
    """The ``task:`` section of a run config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: Literal["t2i_gauss"] = "t2i_gauss"
    channels: int = Field(3, ge=1, le=8)
    size: int = Field(8, ge=1, le=32, description="images are channels × size × size")
    num_prompts: int = Field(4, ge=1, le=64)
    rank: int = Field(4, ge=0, le=16, description="directions of extra variance per prompt")
    component_stds: list[float] = Field(
        default_factory=lambda: [1.0, 0.7, 0.5, 0.35],
        description="std along each of the rank directions (a list of rank numbers)")
    pixel_std: float = Field(0.3, gt=0, description="σ, the isotropic std of every pixel")
    mean_std: float = Field(0.5, ge=0, description="each prompt's mean image: N(0, mean_std²)")
    reward_norm: float = Field(2.5, gt=0, description="‖a_c‖ of log r = ⟨a_c, x⟩")
    data_seed: int = Field(0, description="draws μ_c, U_c and a_c")
    num_steps: int = Field(20, ge=1, le=1000, description="T, DDIM steps")
    timestep_spacing: Literal["leading", "trailing"] = "trailing"
    num_train_timesteps: int = Field(1000, ge=2, le=10_000)
    min_std: float = Field(0.02, gt=0, description="floor of a step's std (the last one's is 0)")
    hidden: int = Field(128, ge=1, description="width of the posterior's ε correction")
    depth: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _sizes(self) -> "Config":
        if len(self.component_stds) != self.rank:
            raise ValueError(f"component_stds: {len(self.component_stds)} numbers for rank "
                             f"{self.rank}")
        if self.rank >= self.channels * self.size**2:
            raise ValueError(f"rank ({self.rank}) must be below the image's size "
                             f"({self.channels * self.size**2})")
        return self


def ddim_scheduler(config: Config) -> object:
    """The diffusers scheduler the prior samples with (DDPM's linear β schedule)."""
    from diffusers import DDIMScheduler  # heavy; only where a family is built

    return DDIMScheduler(num_train_timesteps=config.num_train_timesteps, clip_sample=False,
                         timestep_spacing=config.timestep_spacing)


class GaussianDenoiser(nn.Module):
    """The exact ε-predictor of N(μ_c, σ²I + U_c diag(λ) U_cᵀ) data at diffusion timestep t."""

    def __init__(self, means: Tensor, directions: Tensor, variances: Tensor, pixel_var: float,
                 alphas_cumprod: Tensor, event_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("means", means.float())  # [K, D]
        self.register_buffer("directions", directions.float())  # [K, D, r]
        self.register_buffer("variances", variances.float())  # [r]
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.pixel_var, self.event_shape = pixel_var, event_shape

    def forward(self, x: Tensor, t: Tensor | int, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError("t2i_gauss is conditional: pass cond (prompt ids)")
        ids = cond.long().reshape(-1)
        a = self.alphas_cumprod[torch.as_tensor(t, device=x.device)].reshape(-1, 1)  # [n|1, 1]
        v = x.flatten(1) - a.sqrt() * self.means[ids]
        # (āΣ + (1−ā)I)⁻¹ v = (v − U diag(āλ / (d + āλ)) Uᵀ v) / d with d = āσ² + 1 − ā
        d = a * self.pixel_var + 1 - a
        shrink = a * self.variances / (d + a * self.variances)  # [n|1, r]
        # every prompt's projection, kept for the row's own prompt only: a gather of U per row
        # ([n, D, r]) would cost more memory traffic than these few extra products
        own = nn.functional.one_hot(ids, self.means.shape[0]).to(v.dtype)  # [n, K]
        proj = torch.einsum("nd,kdr->nkr", v, self.directions) * own[..., None]
        solved = (v - torch.einsum("nkr,kdr->nd", proj * shrink[:, None], self.directions)) / d
        return ((1 - a).sqrt() * solved).view(x.shape)


class CorrectedDenoiser(nn.Module):
    """The frozen prior's ε plus a correction that starts at exactly zero (the posterior)."""

    def __init__(self, prior: GaussianDenoiser, correction: TimeMLP, num_prompts: int) -> None:
        super().__init__()
        self.prior = prior.requires_grad_(False)
        self.correction = correction
        self.num_prompts = num_prompts

    def forward(self, x: Tensor, t: Tensor | int, cond: Tensor | None = None) -> Tensor:
        assert cond is not None
        prompt = nn.functional.one_hot(cond.long().reshape(-1), self.num_prompts).float()
        fix = self.correction(x.flatten(1), t, prompt).view(x.shape)
        return self.prior(x, t, cond) + fix


class T2IGaussTask:
    name = "t2i_gauss"
    progress_metrics = ("log_z_error_max", "mean_error_ratio_max", "cov_rel_error_max")
    baseline_metric = "mean_error_ratio_max"

    def __init__(self, config: Config) -> None:
        self.config = c = config
        self.event_shape = (c.channels, c.size, c.size)
        d = math.prod(self.event_shape)
        scheduler = ddim_scheduler(c)
        self.family = DDIMGaussian.from_scheduler(scheduler, c.num_steps, self.event_shape,
                                                  c.min_std)
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        gen = torch.Generator().manual_seed(c.data_seed)
        k = c.num_prompts
        self.means = c.mean_std * torch.randn(k, d, generator=gen, dtype=torch.float64)
        # U_c: the first rank columns of a random orthogonal matrix; a_c mostly along the top
        # two directions (where the tilt moves the mean far) and partly in the isotropic rest
        basis = torch.linalg.qr(torch.randn(k, d, c.rank + 1, generator=gen,
                                            dtype=torch.float64)).Q
        self.directions = basis[..., : c.rank]
        self.variances = torch.tensor(c.component_stds, dtype=torch.float64).square()
        mix = torch.zeros(c.rank + 1, dtype=torch.float64)
        mix[: min(c.rank, 2)] = torch.tensor([1.0, 0.5], dtype=torch.float64)[: min(c.rank, 2)]
        mix[-1] = 0.3
        a = torch.einsum("kdr,r->kd", basis, mix)
        self.reward_directions = c.reward_norm * a / a.norm(dim=1, keepdim=True)  # [K, D]
        self._exact = chain_moments(self)
        self._beta = 1.0

    # -- networks --------------------------------------------------------------------------------
    def prior(self) -> GaussianDenoiser:
        return GaussianDenoiser(self.means, self.directions, self.variances,
                                self.config.pixel_std**2, self.alphas_cumprod,
                                self.event_shape).eval()

    def prior_path(self) -> None:  # the exact prior is built, not trained: no file
        return None

    def pretrain(self, progress: bool = True) -> dict[str, float]:
        return {}

    def posterior_network(self, prior: nn.Module, adapter: AdapterConfig) -> CorrectedDenoiser:
        c = self.config
        if adapter.kind != "full":  # the prior has no layers to adapt
            raise ConfigError(f"train.adapter.kind: {adapter.kind} does not apply to t2i_gauss "
                              "(its posterior is the exact prior plus a correction network)")
        correction = TimeMLP(math.prod(self.event_shape), c.num_train_timesteps, hidden=c.hidden,
                             depth=c.depth, cond_dim=c.num_prompts)
        return CorrectedDenoiser(prior, correction, c.num_prompts)

    # -- conditions ------------------------------------------------------------------------------
    def ids_of(self, cond: Tensor) -> Tensor:
        ids = cond.long().reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.config.num_prompts)]
        if bad.numel():
            raise ValueError(f"t2i_gauss: prompt id {int(bad[0])} is not one of "
                             f"0..{self.config.num_prompts - 1} (task.num_prompts)")
        return ids

    def conditions(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.config.num_prompts, (n, 1), generator=generator)

    def eval_conditions(self) -> Tensor:
        return torch.arange(self.config.num_prompts)[:, None]

    # -- reward and the exact answer -------------------------------------------------------------
    def log_reward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError("t2i_gauss is conditional: log_reward needs cond (prompt ids)")
        a = self.reward_directions.to(x.device, x.dtype)[self.ids_of(cond)]
        return (x.flatten(1) * a).sum(-1)

    def exact(self, beta: float = 1.0) -> dict[str, Tensor]:
        """Per prompt (float64): the prior's terminal mean ``m`` [K, D] and covariance ``S``
        [K, D, D], the target's mean, log Z, and the fixed-start floor."""
        m, s, g = self._exact["mean"], self._exact["cov"], self._exact["start_map"]
        a = self.reward_directions
        shift = beta * torch.einsum("kij,kj->ki", s, a)
        ga = torch.einsum("kij,ki->kj", g, a)  # Gᵀa
        return {"prior_mean": m, "cov": s, "target_mean": m + shift, "shift": shift,
                "log_z": beta * (a * m).sum(-1) + 0.5 * beta * (a * shift).sum(-1),
                "floor": 0.5 * beta**2 * ga.square().sum(-1)}

    def reference_log_z(self, beta: float = 1.0, cond: Tensor | None = None) -> Tensor:
        """The attainable log Z_c: the exact one less the fixed-start floor (module docstring)."""
        self._beta = beta  # the evaluator asks this (with the run's β) before evaluate()
        ids = self.ids_of(self.eval_conditions() if cond is None else cond)
        e = self.exact(beta)
        return (e["log_z"] - e["floor"])[ids]

    def evaluate(self, x: Tensor, cond: Tensor | None = None,
                 ctx: EvalContext | None = None) -> dict[str, float]:
        """Per prompt: the mean's error relative to the prior-to-target shift, the worst relative
        error of the variance along each structured direction and in the rest; the mean over
        prompts and the worst. ``log_z_floor``: the largest floor (module docstring)."""
        assert cond is not None
        beta = self._beta
        e = self.exact(beta)
        ids = self.ids_of(cond)
        ratios, cov_errors = [], []
        for k in ids.unique().tolist():
            xs = x[ids == k].flatten(1).double()
            ratios.append(((xs.mean(0) - e["target_mean"][k]).norm()
                           / e["shift"][k].norm()).item())
            cov_errors.append(self._cov_error(xs, e["cov"][k], k))
        return {"mean_error_ratio": sum(ratios) / len(ratios), "mean_error_ratio_max": max(ratios),
                "cov_rel_error": sum(cov_errors) / len(cov_errors),
                "cov_rel_error_max": max(cov_errors), "log_z_floor": e["floor"].max().item()}

    def _cov_error(self, xs: Tensor, cov: Tensor, k: int) -> float:
        """Relative errors of the sample variance along U_k's directions and a_k, and of the
        mean variance over the orthogonal rest: the largest."""
        centred = xs - xs.mean(0)
        a = self.reward_directions[k]
        structured = torch.cat([self.directions[k], (a / a.norm())[:, None]], 1)  # [D, r+1]
        errors = []
        for e in structured.T:
            errors.append(abs((centred @ e).var().item() / (e @ cov @ e).item() - 1))
        q = torch.linalg.qr(structured).Q  # orthonormal basis of the structured span
        rest = centred - (centred @ q) @ q.T
        rest_dims = xs.shape[1] - q.shape[1]
        rest_exact = (torch.trace(cov) - torch.trace(q.T @ cov @ q)).item() / rest_dims
        rest_sample = rest.square().sum(1).mean().item() * xs.shape[0] / (xs.shape[0] - 1)
        errors.append(abs(rest_sample / rest_dims / rest_exact - 1))
        return max(errors)

    def plot(self, x: Tensor, path: Path, title: str = "", cond: Tensor | None = None) -> None:
        """Per prompt: samples projected on a_c (x axis) and on U_c's first direction made
        orthogonal to it (y axis), over the exact target's 1σ and 2σ ellipses (red) and the
        prior's (grey); below, a few samples as images."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        assert cond is not None
        ids = self.ids_of(cond)
        shown = ids.unique().tolist()[:4]
        e = self.exact(self._beta)
        fig, axes = plt.subplots(2, len(shown), figsize=(3.3 * len(shown), 6.2), dpi=100,
                                 squeeze=False)
        angle = torch.linspace(0, 2 * math.pi, 200, dtype=torch.float64)
        circle = torch.stack([angle.cos(), angle.sin()])
        for col, k in enumerate(shown):
            a = self.reward_directions[k] / self.reward_directions[k].norm()
            u = self.directions[k][:, 0] if self.config.rank else torch.roll(a, 1)
            u = u - (u @ a) * a
            basis = torch.stack([a, u / u.norm()], 1)  # [D, 2]
            ax = axes[0][col]
            proj = (x[ids == k].flatten(1).double() @ basis)[:1500]
            ax.scatter(proj[:, 0], proj[:, 1], s=2, alpha=0.3, color="tab:blue")
            cov2 = basis.T @ e["cov"][k] @ basis
            chol = torch.linalg.cholesky(cov2)
            for mean, color in ((e["prior_mean"][k], "grey"), (e["target_mean"][k], "tab:red")):
                centre = mean @ basis
                for r in (1.0, 2.0):
                    ring = centre[:, None] + r * chol @ circle
                    ax.plot(ring[0], ring[1], color=color, lw=0.8)
            ax.set(title=f"prompt {k}", xlabel="along a_c", ylabel="along u_c (orthogonal to a_c)")
            images = x[ids == k][:8]
            lo, hi = images.min(), images.max()
            grid = ((images - lo) / (hi - lo + 1e-12)).permute(0, 2, 3, 1)  # [n, H, W, C]
            if grid.shape[-1] not in (1, 3):
                grid = grid[..., :1]
            row = torch.cat(list(grid), 1).squeeze(-1).numpy()
            axes[1][col].imshow(row, cmap="gray" if row.ndim == 2 else None)
            axes[1][col].set_axis_off()
        fig.suptitle(f"{title}  (red: exact target, grey: prior; 1σ and 2σ)", fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def chain_moments(task: T2IGaussTask) -> dict[str, Tensor]:
    """The prior sampler's terminal moments per prompt, in float64: each DDIM step maps
    x ↦ A_k x + b_k + N(0, v_k I) with A_k = c_x I − c_ε √(1−ā) M⁻¹, b_k = c_ε √(ā(1−ā)) M⁻¹ μ,
    M = āΣ + (1−ā)I (the exact ε is linear in x). From x_{t_0} ~ N(0, I): ``mean`` [K, D] and
    ``cov`` [K, D, D]; ``start_map`` [K, D, D] = Π A_k, the map x_{t_0} ↦ E[x_0 | x_{t_0}]."""
    fam, c = task.family, task.config
    d = task.means.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    sigmas = c.pixel_std**2 * eye + torch.einsum(
        "kdr,r,ker->kde", task.directions, task.variances, task.directions)
    mean = torch.zeros_like(task.means)
    cov = eye.expand_as(sigmas).clone()
    start_map = eye.expand_as(sigmas).clone()
    for k in range(fam.num_steps):
        a = task.alphas_cumprod[int(fam.timesteps[k])].item()
        cx, ce, var = (float(v[k]) for v in (fam.coef_x, fam.coef_eps, fam.var))
        m_inv = torch.linalg.inv(a * sigmas + (1 - a) * eye)
        step = cx * eye - ce * math.sqrt(1 - a) * m_inv
        shift = ce * math.sqrt(a * (1 - a)) * torch.einsum("kij,kj->ki", m_inv, task.means)
        mean = torch.einsum("kij,kj->ki", step, mean) + shift
        cov = step @ cov @ step.transpose(1, 2) + var * eye
        start_map = step @ start_map
    return {"mean": mean, "cov": cov, "start_map": start_map}


def make_task(config: Config) -> T2IGaussTask:
    return T2IGaussTask(config)
