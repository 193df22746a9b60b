"""Transition families: how a policy network turns x_t into a distribution over x_{t+1}.

A family is the only place that knows the kernel. Everything above it (objectives, metrics,
trainer, replay) sees two things: trajectories ``[B, T+1, *event]`` and per-step
log-probabilities ``[B, T]``. A masked-categorical family for token sequences implements the
same three methods (``sample``, ``step_log_probs``, ``backward_sample``).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn


class TransitionFamily(Protocol):
    num_steps: int
    event_shape: tuple[int, ...]

    def sample(
        self,
        net: nn.Module,
        n: int,
        *,
        cond: Tensor | None = None,
        explore: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the chain forward. Returns ``states [n, T+1, *event]`` and the summed
        log-probability of each trajectory under the process that sampled it (with exploration
        ``explore`` > 0 that is the explored process, not the network's own)."""
        ...

    def step_log_probs(
        self,
        net: nn.Module,
        states: Tensor,
        *,
        cond: Tensor | None = None,
        steps: Tensor | None = None,
    ) -> Tensor:
        """``log p(x_{t+1} | x_t)`` for every trajectory and step ``t`` in ``steps`` (default:
        all), as ``[B, len(steps)]``, from one batched network pass over all (x_t, t) rows."""
        ...

    def backward_sample(
        self, x: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Noise terminal states ``x [n, *event]`` back to x_0 with the fixed noising process.
        Returns trajectories ``[n, T+1, *event]`` ending in ``x`` and the summed log-probability
        of each under that noising process."""
        ...


def _normal_log_prob(x: Tensor, mean: Tensor, var: Tensor | float) -> Tensor:
    """Diagonal Gaussian log-density, summed over the last axis (``var``: scalar or per entry)."""
    if isinstance(var, float):
        return -0.5 * ((x - mean).square().sum(-1) / var + x.shape[-1] * math.log(2 * math.pi * var))
    return -0.5 * ((x - mean).square() / var + torch.log(2 * math.pi * var)).sum(-1)


class PinnedBrownian:
    """The pinned Brownian motion of RTB.md: x_0 = 0, ``x_{t+1} ~ N(x_t + dt·u(x_t, t), σ² dt I)``.

    The network predicts the drift ``u``. With ``learn_variance`` it also predicts a log-scale
    ``s`` of the step variance, ``σ² dt · exp(s)`` (its output is ``[u, s]``, 2·dim wide): a
    reward-tilted Brownian motion has slightly smaller step variances than the prior, so only
    then is the exact posterior in the family. A zero-initialised network gives s = 0, the fixed
    variance. Exploration adds ``explore²`` to the per-step variance of the *sampling* process.
    """

    def __init__(self, dim: int, num_steps: int, sigma: float, learn_variance: bool = False) -> None:
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        self.dim = dim
        self.num_steps = num_steps
        self.event_shape = (dim,)
        self.sigma = sigma
        self.learn_variance = learn_variance
        self.net_out_dim = 2 * dim if learn_variance else dim
        self.dt = 1.0 / num_steps
        self.step_var = sigma**2 * self.dt

    def drift(self, net: nn.Module, x: Tensor, t: Tensor | int, cond: Tensor | None = None) -> Tensor:
        return net(x, t, cond)[..., : self.dim]

    def moments(
        self, net: nn.Module, x: Tensor, t: Tensor | int, cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor | float]:
        """Mean and variance of ``x_{t+1} | x_t``."""
        out = net(x, t, cond)
        if not self.learn_variance:
            return x + self.dt * out, self.step_var
        drift, log_scale = out.split(self.dim, dim=-1)
        return x + self.dt * drift, self.step_var * log_scale.clamp(-8.0, 4.0).exp()

    @torch.no_grad()
    def sample(
        self,
        net: nn.Module,
        n: int,
        *,
        cond: Tensor | None = None,
        explore: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        device = next(net.parameters()).device
        states = torch.empty(n, self.num_steps + 1, self.dim, device=device)
        states[:, 0] = 0.0
        # drawn on the CPU (where seeded generators live), then moved: same numbers on any device
        noise = torch.randn(n, self.num_steps, self.dim, generator=generator).to(device)
        log_behaviour = torch.zeros(n, device=device)
        x = states[:, 0]
        for t in range(self.num_steps):
            mean, var = self.moments(net, x, t, cond)
            var = var + explore**2
            step = noise[:, t] * (math.sqrt(var) if isinstance(var, float) else var.sqrt())
            x = mean + step
            states[:, t + 1] = x
            # the residual x_{t+1} − mean is the scaled noise itself: no second pass needed
            log_behaviour += _normal_log_prob(step, torch.zeros_like(step), var)
        return states, log_behaviour

    def step_log_probs(
        self,
        net: nn.Module,
        states: Tensor,
        *,
        cond: Tensor | None = None,
        steps: Tensor | None = None,
    ) -> Tensor:
        b = states.shape[0]
        if steps is None:
            steps = torch.arange(self.num_steps, device=states.device)
        k = steps.shape[0]
        x = states[:, steps].reshape(b * k, self.dim)
        x_next = states[:, steps + 1].reshape(b * k, self.dim)
        t = steps.repeat(b)
        c = None if cond is None else cond.repeat_interleave(k, dim=0)
        mean, var = self.moments(net, x, t, c)
        return _normal_log_prob(x_next, mean, var).view(b, k)

    @torch.no_grad()
    def backward_sample(
        self, x: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        # Brownian bridge from 0 (time 0) to x (time 1), drawn backwards:
        # x_t | x_{t+1} ~ N(x_{t+1}·t/(t+1), σ² dt · t/(t+1)).
        n = x.shape[0]
        states = torch.empty(n, self.num_steps + 1, self.dim, device=x.device)
        states[:, -1] = x
        states[:, 0] = 0.0
        noise = torch.randn(n, self.num_steps, self.dim, generator=generator).to(x.device)
        log_q = torch.zeros(n, device=x.device)
        for t in range(self.num_steps - 1, 0, -1):
            shrink, var = t / (t + 1), self.step_var * t / (t + 1)
            states[:, t] = states[:, t + 1] * shrink + noise[:, t] * math.sqrt(var)
            log_q += _normal_log_prob(noise[:, t] * math.sqrt(var), torch.zeros_like(x), var)
        return states, log_q
