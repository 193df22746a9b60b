"""Prior pretraining and prior checkpoints.

One loop for every task: the transition family knows its pretraining loss (bridge matching for
the pinned Brownian motion, ε-matching for DDPMs, ``family.pretrain_loss``); the task supplies
data samples.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from rtb_ray.transitions import TransitionFamily

PRIOR_FORMAT = "rtb-ray-prior/1"

# False hides every pretraining bar of the process (`--no-progress`): pretraining is reached
# through task.prior(), which takes no arguments, so the CLI cannot pass the flag down to it
PROGRESS_BARS = True


def progress_bar(iterable: Iterable, desc: str, progress: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar over ``iterable`` (at most one update a second), hidden when ``progress`` or
    ``PROGRESS_BARS`` is false."""
    return tqdm(iterable, desc=desc, disable=not (progress and PROGRESS_BARS), mininterval=1.0,
                **kwargs)


def _drop_cond(cond: Tensor, null_cond: Tensor, cond_drop: float,
               generator: torch.Generator) -> Tensor:
    """Each row's cond replaced by ``null_cond`` with probability ``cond_drop`` (drawn from the
    CPU generator, like all pretraining noise, so a seed gives the same rows on any device)."""
    drop = (torch.rand(cond.shape[0], generator=generator) < cond_drop).to(cond.device)
    null = null_cond.to(cond.device, cond.dtype).expand_as(cond)
    return torch.where(drop.view(-1, *([1] * (cond.dim() - 1))), null, cond)


def uniform_rows(x: Tensor, cond: Tensor) -> Callable[[int, torch.Generator],
                                                      tuple[Tensor, Tensor]]:
    """``sample_data`` for ``pretrain_prior`` from fixed (x, cond) pairs: rows drawn uniformly
    with replacement (behaviour cloning on a dataset)."""
    def sample(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        rows = torch.randint(0, x.shape[0], (n,), generator=generator)
        return x[rows], cond[rows]

    return sample


def pretrain_prior(family: TransitionFamily, net: nn.Module,
                   sample_data: Callable[[int, torch.Generator], Tensor | tuple[Tensor, Tensor]],
                   steps: int, batch_size: int, lr: float, seed: int = 0, progress: bool = True,
                   cond_drop: float = 0.0, null_cond: Tensor | None = None) -> list[float]:
    """Fit ``net`` so that the family's process ends in the data distribution (Adam, cosine
    learning rate). Returns the loss every 100 steps.

    ``sample_data(n, generator)`` returns data ``x`` or ``(x, cond)``; with a cond the network
    learns the conditional distribution. ``cond_drop`` > 0 replaces each row's cond by
    ``null_cond`` (broadcast to the row) with that probability, so that the same network also
    learns the unconditional distribution under ``null_cond`` (classifier-free-guidance
    training)."""
    if not 0.0 <= cond_drop <= 1.0:
        raise ValueError(f"cond_drop must lie in [0, 1], not {cond_drop}")
    if cond_drop > 0 and null_cond is None:
        raise ValueError("cond_drop > 0 needs null_cond: the condition that stands for "
                         "'no condition'")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    losses: list[float] = []
    bar = progress_bar(range(steps), "pretrain prior", progress)
    for step in bar:
        data = sample_data(batch_size, gen)
        x, cond = data if isinstance(data, tuple) else (data, None)
        if cond_drop > 0:
            if cond is None:
                raise ValueError("cond_drop > 0 needs conditions: sample_data must return "
                                 "(x, cond)")
            assert null_cond is not None  # checked above
            # drawn only when asked for: without cond_drop the generator's stream (and so a
            # seeded prior) is what it was before conditions existed
            cond = _drop_cond(cond, null_cond, cond_drop, gen)
        loss = family.pretrain_loss(net, x, gen, cond=cond)
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


def read_checkpoint(path: Path, what: str) -> Any:
    """``torch.load`` of tensors and plain values only (``weights_only``). A file that is not one
    (random bytes, a directory, a truncated file, a pickle that would run code) is a one-line
    ValueError naming it; torch's own message would suggest ``weights_only=False``: never."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is not {what} (a weights-only load refused it: it is not a "
                         f"file of tensors and plain values)") from None
    except Exception as err:  # torch's weights-only unpickler raises IndexError, KeyError...
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{path} is not {what} ({type(err).__name__}: {first})") from None


def save_prior(path: Path, task: str, spec: dict, net: nn.Module, stats: dict) -> None:
    atomic_torch_save({"format": PRIOR_FORMAT, "task": task, "spec": spec,
                       "state_dict": net.state_dict(), "stats": stats}, path)


def load_prior(path: Path, task: str, spec: dict) -> tuple[dict, dict]:
    """The state dict and stats of a prior checkpoint; refuses one made for another task or
    another network/transition spec."""
    ckpt = read_checkpoint(path, "an rtb-ray prior checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != PRIOR_FORMAT:
        raise ValueError(f"{path} is not an rtb-ray prior checkpoint")
    if ckpt["task"] != task:
        raise ValueError(f"{path} is a prior for task {ckpt['task']!r}, not {task!r}")
    if ckpt["spec"] != spec:
        diff = {k: (ckpt["spec"].get(k), v) for k, v in spec.items() if ckpt["spec"].get(k) != v}
        raise ValueError(f"{path} was made with other settings (checkpoint, config): {diff}")
    return ckpt["state_dict"], ckpt["stats"]


def cache_root() -> Path:
    """Where priors are cached: ``$RTB_RAY_CACHE``, default ``~/.cache/rtb-ray``."""
    return Path(os.environ.get("RTB_RAY_CACHE", Path.home() / ".cache" / "rtb-ray"))


class PriorCheckpointConfig(BaseModel):
    """The prior-checkpoint settings every task has. A task's config subclasses it and defines
    ``name`` and ``spec()`` (everything the checkpoint depends on); the default checkpoint is a
    file in the cache named by a hash of the spec, so changing a setting never reuses a prior
    made with another."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf is never a setting
    prior_checkpoint: str | None = Field(
        None, description="default: a file named by the prior's settings in the cache folder"
    )
    pretrain_if_missing: bool = True

    def spec(self) -> dict:
        raise NotImplementedError

    def prior_path(self) -> Path:
        if self.prior_checkpoint:
            return Path(self.prior_checkpoint).expanduser()
        digest = hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()
        return cache_root() / getattr(self, "name") / f"prior-{digest[:12]}.pt"


def load_or_pretrain(config: PriorCheckpointConfig, task: str,
                     pretrain: Callable[[], Any]) -> tuple[dict, dict]:
    """The prior's state dict and stats, pretraining first (``pretrain()``) if it is missing
    and the config allows it. (Checked here, when the prior is loaded, not when the config is
    validated: validation does no I/O, and a Ray node may receive the file after it.)"""
    path = config.prior_path()
    if not path.exists():
        if not config.pretrain_if_missing:
            raise FileNotFoundError(
                f"prior_checkpoint: {path} does not exist and pretrain_if_missing is false "
                "(run `rtb-ray pretrain CONFIG` first)")
        pretrain()
    return load_prior(path, task, config.spec())


def load_frozen_bundle(config: PriorCheckpointConfig, task: str, pretrain: Callable[[], Any],
                       bundle: nn.ModuleDict, check_file: Callable[[Path], None] | None = None
                       ) -> tuple[nn.ModuleDict, dict]:
    """A task's networks saved as one prior checkpoint (e.g. the prior and a reward model),
    loaded into ``bundle`` (pretrained first if missing) and frozen, with the checkpoint's
    stats. ``check_file`` reads an existing file first, to refuse in one line one made for other
    networks (naming what differs) before the spec comparison would."""
    path = config.prior_path()
    if check_file is not None and path.exists():
        check_file(path)
    state, stats = load_or_pretrain(config, task, pretrain)
    bundle.load_state_dict(state)
    return bundle.requires_grad_(False).eval(), stats
