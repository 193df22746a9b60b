"""A complete task in one file: a ring reward under a 2-D Brownian prior.

Prior: the pinned Brownian motion itself (x_1 ~ N(0, σ² I)): nothing to pretrain. Reward:
log r(x) = −(|x| − radius)² / (2 width²). The radius of x has a 1-D density, whose integrals give
the exact log Z and posterior mean radius. Use: ``task: {name: docs/examples/ring_task.py}``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from rtb_ray.networks import TimeMLP
from rtb_ray.transitions import PinnedBrownian


class Config(BaseModel):
    """The ``task:`` section of a run config: ``name`` plus the task's own settings."""

    model_config = ConfigDict(extra="forbid")  # a mistyped key is an error, not a default
    name: str
    radius: float = Field(3.0, gt=0)
    width: float = Field(0.3, gt=0)
    sigma: float = Field(2.0, gt=0, description="prior std of x_1")
    num_steps: int = Field(50, ge=1)
    hidden: int = Field(64, ge=1)


class RingTask:
    name = "ring"
    progress_metrics = ("radius_error", "angle_tv")  # printed in progress lines
    baseline_metric = "radius_error"  # a baseline sweep keeps the setting with the lowest

    def __init__(self, config: Config) -> None:
        self.config = config
        # learned step variances: the exact posterior process is then in the family
        self.family = PinnedBrownian(2, config.num_steps, config.sigma, learn_variance=True)
        # |x_1| under the prior is Rayleigh: its log-density on a grid, for exact integrals
        self.rho = torch.linspace(1e-9, config.radius + 10 * config.sigma, 20_001,
                                  dtype=torch.float64)
        self.log_p_rho = self.rho.log() - 2 * math.log(config.sigma) \
            - self.rho.square() / (2 * config.sigma**2)

    def prior(self) -> TimeMLP:
        # a fresh TimeMLP outputs zeros: zero drift and unscaled variance, the prior itself
        net = TimeMLP(2, self.config.num_steps, hidden=self.config.hidden,
                      out_dim=self.family.net_out_dim)
        return net.requires_grad_(False).eval()

    def prior_path(self) -> None:  # no checkpoint file: nothing to pretrain or ship to nodes
        return None

    def pretrain(self, progress: bool = True) -> dict[str, float]:
        return {}

    def _log_r(self, radius: Tensor) -> Tensor:
        return -(radius - self.config.radius).square() / (2 * self.config.width**2)

    def log_reward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        return self._log_r(x.norm(dim=-1))

    def conditions(self, n: int) -> None:
        return None  # unconditional

    def _log_integral(self, log_f: Tensor) -> float:
        """log ∫ exp(log_f(ρ)) dρ over the grid."""
        return (torch.logsumexp(log_f, 0) + (self.rho[1] - self.rho[0]).log()).item()

    def reference_log_z(self, beta: float = 1.0) -> float:
        """log E_prior[r^β], exact up to the quadrature."""
        return self._log_integral(self.log_p_rho + beta * self._log_r(self.rho))

    def evaluate(self, x: Tensor) -> dict[str, float]:
        log_post = self.log_p_rho + self._log_r(self.rho)  # of the radius, unnormalised
        exact = math.exp(self._log_integral(log_post + self.rho.log())
                         - self._log_integral(log_post))
        radius = x.norm(dim=-1).mean().item()
        # the posterior is rotationally symmetric: its angles fill 8 sectors equally
        shares = torch.histc(torch.atan2(x[:, 1], x[:, 0]), bins=8, min=-math.pi, max=math.pi)
        return {"mean_radius": radius, "radius_error": abs(radius - exact),
                "angle_tv": 0.5 * (shares / x.shape[0] - 1 / 8).abs().sum().item()}

    def plot(self, x: Tensor, path: Path, title: str = "") -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(*x[:3000].T.numpy(), s=2, alpha=0.3)
        ax.add_patch(plt.Circle((0, 0), self.config.radius, fill=False, color="tab:red"))
        ax.set(aspect="equal", title=title)
        fig.savefig(path)
        plt.close(fig)


def make_task(config: Config) -> RingTask:
    return RingTask(config)
