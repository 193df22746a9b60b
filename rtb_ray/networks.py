"""Policy networks: ``net(x_t, t_index, cond) -> output`` over rows of (state, step) pairs."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def fourier_time_features(num_steps: int, dim: int) -> Tensor:
    """Sin/cos features of t = k / T for k = 0..T-1, geometric frequencies (as in PIS/DDPM)."""
    t = torch.arange(num_steps, dtype=torch.float32) / num_steps
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), dim // 2))
    angles = t[:, None] * freqs[None, :] * (2 * math.pi)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class TimeMLP(nn.Module):
    """An MLP of ``x`` with the time step added as an embedding after the first layer.

    Time is discrete (``t_index`` in ``[0, T)``), so the time branch is evaluated on the ``T``
    distinct steps once per forward and gathered, instead of once per row: a B·T-row batch pays
    for a ``dim -> hidden`` input layer only. The last layer starts at zero, so a fresh network
    is the zero drift (the pinned Brownian motion itself).
    """

    def __init__(self, dim: int, num_steps: int, hidden: int = 128, depth: int = 2,
                 time_features: int = 64, out_dim: int | None = None, cond_dim: int = 0) -> None:
        super().__init__()
        self.num_steps = num_steps
        self.register_buffer("time_features", fourier_time_features(num_steps, time_features))
        self.time_branch = nn.Sequential(nn.Linear(time_features, hidden), nn.GELU(),
                                         nn.Linear(hidden, hidden))
        self.input = nn.Linear(dim, hidden)
        self.cond_input = nn.Linear(cond_dim, hidden, bias=False) if cond_dim else None
        layers = [m for _ in range(depth) for m in (nn.GELU(), nn.Linear(hidden, hidden))]
        self.trunk = nn.Sequential(*layers, nn.GELU(), nn.Linear(hidden, out_dim or dim))
        nn.init.zeros_(self.trunk[-1].weight)
        nn.init.zeros_(self.trunk[-1].bias)

    def forward(self, x: Tensor, t_index: Tensor | int, cond: Tensor | None = None) -> Tensor:
        """``t_index``: one int for all rows (sequential sampling) or a ``[rows]`` tensor."""
        if isinstance(t_index, int):
            time = self.time_branch(self.time_features[t_index : t_index + 1])
        else:
            time = self.time_branch(self.time_features)[t_index]
        h = self.input(x) + time
        if self.cond_input is not None:
            if cond is None:
                raise ValueError("this network is conditional: pass cond")
            h = h + self.cond_input(cond)
        return self.trunk(h)


class LoRALinear(nn.Module):
    """``base(x) + (alpha/rank)·x Aᵀ Bᵀ`` with the base frozen (Hu et al., LoRA). B starts at
    zero, so the adapted network starts as the base network."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * (x @ self.lora_a.T) @ self.lora_b.T


def add_lora(net: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Wrap every ``nn.Linear`` of ``net`` (in place) in a LoRA adapter; only the adapters
    stay trainable."""
    net.requires_grad_(False)
    for name, child in list(net.named_children()):
        if isinstance(child, nn.Linear):
            setattr(net, name, LoRALinear(child, rank, alpha))
        else:
            add_lora(child, rank, alpha)
    return net
