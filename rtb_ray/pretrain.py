"""Prior pretraining and prior checkpoints.

For the pinned Brownian motion, path maximum likelihood on bridge-noised data has a closed-form
Rao-Blackwellised target: given x_1 and x_t on the Brownian bridge from 0, the expected
increment is dt·(x_1 − x_t)/(1 − t). Regressing the drift on that target has the same optimum
as maximising Σ_t log p_θ(x_{t+1}|x_t) on sampled bridge paths, with far less variance
("bridge matching").
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from rtb_ray.transitions import PinnedBrownian

PRIOR_FORMAT = "rtb-ray-prior/1"


def bridge_matching_loss(
    family: PinnedBrownian, net: nn.Module, x1: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    n = x1.shape[0]
    k = torch.randint(0, family.num_steps, (n,), generator=generator)
    t = (k.float() / family.num_steps)[:, None]
    z = torch.randn(x1.shape, generator=generator)
    x_t = t * x1 + (family.sigma**2 * t * (1 - t)).sqrt() * z
    target = (x1 - x_t) / (1 - t)
    return (family.drift(net, x_t, k) - target).square().sum(-1).mean()


def pretrain_bridge_matching(
    family: PinnedBrownian,
    net: nn.Module,
    sample_data: Callable[[int, torch.Generator], Tensor],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Fit ``net`` as the drift of a prior whose terminal marginal is the data distribution."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    losses: list[float] = []
    bar = tqdm(range(steps), desc="pretrain prior", disable=not progress, mininterval=1.0)
    for step in bar:
        loss = bridge_matching_loss(family, net, sample_data(batch_size, gen), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves
    a half-written file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def save_prior(path: Path, task: str, spec: dict, net: nn.Module, stats: dict) -> None:
    atomic_torch_save(
        {"format": PRIOR_FORMAT, "task": task, "spec": spec, "state_dict": net.state_dict(),
         "stats": stats},
        path,
    )


def load_prior(path: Path, task: str, spec: dict) -> tuple[dict, dict]:
    """The state dict and stats of a prior checkpoint; refuses one made for another task or
    another network/transition spec."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != PRIOR_FORMAT:
        raise ValueError(f"{path} is not an rtb-ray prior checkpoint")
    if ckpt["task"] != task:
        raise ValueError(f"{path} is a prior for task {ckpt['task']!r}, not {task!r}")
    if ckpt["spec"] != spec:
        diff = {k: (ckpt["spec"].get(k), v) for k, v in spec.items() if ckpt["spec"].get(k) != v}
        raise ValueError(f"{path} was made with other settings (checkpoint, config): {diff}")
    return ckpt["state_dict"], ckpt["stats"]
