"""Conditional Gaussian posteriors: the conditional task whose answer is known exactly.

Prior: the pinned Brownian motion, x_1 ~ N(0, σ² I), whatever the condition (a fresh network is
its zero drift: nothing to pretrain). Condition: one of ``y_values`` (as the value itself, a
float vector, or as its id, for a table log Z). Reward: the likelihood of y given x,
log r(x, y) = log N(y; x, s² I). With r^β = N(y; x, s²/β)·c_β the posterior and normaliser are
closed forms, for every y:

    p(x | y) = N(σ²y / (σ² + s²/β), σ²(s²/β) / (σ² + s²/β) I)
    log Z(y) = log N(y; 0, (σ² + s²/β) I) + D/2·log(2πs²/β) − Dβ/2·log(2πs²)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from rtb_ray.networks import TimeMLP
from rtb_ray.tasks import EvalContext
from rtb_ray.transitions import PinnedBrownian


class Config(BaseModel):
    """The ``task:`` section of a run config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: Literal["gauss_cond"] = "gauss_cond"
    dim: int = Field(1, ge=1, le=64, description="D: x and y are D-vectors (y = value·1)")
    num_steps: int = Field(50, ge=1, le=10_000, description="T, steps of the diffusion")
    sigma: float = Field(1.0, gt=0, description="prior std of x_1 (step variance σ²/T)")
    noise_std: float = Field(0.5, gt=0, description="s: y = x + s·ε")
    y_values: list[float] = Field(
        default_factory=lambda: [round(-2.5 + 5 * i / 7, 6) for i in range(8)], min_length=1,
        description="the conditions: rollouts draw one uniformly; evaluation reports on each")
    cond: Literal["values", "ids"] = Field(
        "values", description="what cond holds: y itself (float [D]) or its index (int64)")
    hidden: int = Field(64, ge=1)
    depth: int = Field(2, ge=0)

    @field_validator("y_values")
    @classmethod
    def _distinct(cls, v: list[float]) -> list[float]:
        if len(set(v)) != len(v):
            raise ValueError("must be distinct (each is one condition)")
        return v


class ConditionedMLP(nn.Module):
    """``TimeMLP`` of (x, t, y): with ``cond`` ids, y is looked up in the task's values."""

    def __init__(self, mlp: TimeMLP, y_table: Tensor | None) -> None:
        super().__init__()
        self.mlp = mlp
        self.register_buffer("y_table", y_table if y_table is not None else torch.empty(0))
        self.ids = y_table is not None

    def forward(self, x: Tensor, t_index: Tensor | int, cond: Tensor | None = None) -> Tensor:
        if cond is not None and self.ids:
            cond = self.y_table[cond.long().reshape(-1)]
        return self.mlp(x, t_index, cond)


class GaussCondTask:
    name = "gauss_cond"
    progress_metrics = ("log_z_error_max", "mean_error_max", "std_rel_error_max")
    baseline_metric = "mean_error_max"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.family = PinnedBrownian(config.dim, config.num_steps, config.sigma,
                                     learn_variance=True)  # the tilted process is in the family
        self.y = torch.tensor(config.y_values, dtype=torch.float32)[:, None].expand(
            -1, config.dim).contiguous()  # [K, D]

    # -- the prior ---------------------------------------------------------------------------
    def prior(self) -> ConditionedMLP:
        c = self.config
        mlp = TimeMLP(c.dim, c.num_steps, hidden=c.hidden, depth=c.depth,
                      out_dim=self.family.net_out_dim, cond_dim=c.dim)
        net = ConditionedMLP(mlp, self.y if c.cond == "ids" else None)
        return net.requires_grad_(False).eval()  # zero last layer: exactly the zero drift

    def prior_path(self) -> None:  # the exact prior is built, not trained: no file
        return None

    def pretrain(self, progress: bool = True) -> dict[str, float]:
        return {}

    # -- conditions ----------------------------------------------------------------------------
    def _cond_of(self, ids: Tensor) -> Tensor:
        return ids if self.config.cond == "ids" else self.y[ids]

    def ids_of(self, cond: Tensor) -> Tensor:
        """The index in ``y_values`` of each row's condition."""
        if self.config.cond == "ids":
            return cond.long().reshape(-1)
        return torch.cdist(cond.float().reshape(-1, self.config.dim), self.y.to(cond.device)
                           ).argmin(1)

    def conditions(self, n: int, generator: torch.Generator) -> Tensor:
        return self._cond_of(torch.randint(0, self.y.shape[0], (n,), generator=generator))

    def eval_conditions(self) -> Tensor:
        return self._cond_of(torch.arange(self.y.shape[0]))

    def _y(self, cond: Tensor) -> Tensor:
        return self.y.to(cond.device)[self.ids_of(cond)]

    # -- reward and the exact answer ---------------------------------------------------------------
    def log_reward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError("gauss_cond is conditional: log_reward needs cond")
        s2, d = self.config.noise_std**2, self.config.dim
        return -0.5 * ((x - self._y(cond)).square().sum(-1) / s2 + d * math.log(2 * math.pi * s2))

    def exact_posterior(self, cond: Tensor, beta: float = 1.0) -> tuple[Tensor, float]:
        """Mean ``[n, D]`` and per-coordinate std of p(x | y) ∝ p_prior(x)·r(x, y)^β."""
        sigma2, s2 = self.config.sigma**2, self.config.noise_std**2 / beta
        return sigma2 * self._y(cond) / (sigma2 + s2), math.sqrt(sigma2 * s2 / (sigma2 + s2))

    def reference_log_z(self, beta: float = 1.0, cond: Tensor | None = None) -> Tensor:
        c = self.eval_conditions() if cond is None else cond
        sigma2, s2, d = self.config.sigma**2, self.config.noise_std**2, self.config.dim
        total = sigma2 + s2 / beta
        log_n = -0.5 * (self._y(c).double().square().sum(-1) / total
                        + d * math.log(2 * math.pi * total))
        return log_n + 0.5 * d * math.log(2 * math.pi * s2 / beta) \
            - 0.5 * d * beta * math.log(2 * math.pi * s2)

    def known_terminals(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Exact posterior samples of uniformly drawn conditions: supervised (y, x) pairs, the
        data of the ``dataset`` source."""
        ids = torch.randint(0, self.y.shape[0], (n,), generator=generator)
        mean, std = self.exact_posterior(self._cond_of(ids))
        return mean + std * torch.randn(mean.shape, generator=generator), self._cond_of(ids)

    def evaluate(self, x: Tensor, cond: Tensor | None = None,
                 ctx: EvalContext | None = None) -> dict[str, float]:
        """Per condition: |mean − exact mean| / σ (the norm over D) and |std / exact std − 1|
        (std averaged over coordinates); their mean over conditions and the worst one."""
        assert cond is not None
        ids = self.ids_of(cond)
        mean_err, std_err = [], []
        for k in ids.unique().tolist():
            xs = x[ids == k].double()
            exact_mean, exact_std = self.exact_posterior(self._cond_of(torch.tensor([k])))
            mean_err.append((xs.mean(0) - exact_mean[0]).norm().item() / self.config.sigma)
            std_err.append(abs(xs.std(0).mean().item() / exact_std - 1))
        return {"mean_error": sum(mean_err) / len(mean_err), "mean_error_max": max(mean_err),
                "std_rel_error": sum(std_err) / len(std_err), "std_rel_error_max": max(std_err)}

    def plot(self, x: Tensor, path: Path, title: str = "", cond: Tensor | None = None) -> None:
        """Per condition, a histogram of the samples' first coordinate over the exact density."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        assert cond is not None
        ids = self.ids_of(cond)
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        grid = torch.linspace(-4 * self.config.sigma, 4 * self.config.sigma, 400)
        for k in ids.unique().tolist():
            color = plt.cm.viridis(k / max(self.y.shape[0] - 1, 1))
            ax.hist(x[ids == k][:, 0].numpy(), bins=60, density=True, alpha=0.35, color=color)
            mean, std = self.exact_posterior(self._cond_of(torch.tensor([k])))
            density = torch.exp(-0.5 * ((grid - mean[0, 0]) / std).square()) / (
                std * math.sqrt(2 * math.pi))
            ax.plot(grid.numpy(), density.numpy(), color=color, lw=1)
        ax.set(xlabel="x[0]", title=f"{title}  (lines: exact p(x | y) per y)")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def make_task(config: Config) -> GaussCondTask:
    return GaussCondTask(config)
