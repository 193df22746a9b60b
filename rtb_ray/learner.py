"""The learner: the posterior, log Z, their optimiser, and one gradient step on a batch."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from rtb_ray.config import AdapterConfig, ConfigError, TrainConfig
from rtb_ray.log_z import check_log_z_kind, make_log_z
from rtb_ray.networks import add_lora, load_own_state, own_state
from rtb_ray.objectives import rtb_backward
from rtb_ray.pretrain import pretrain_prior
from rtb_ray.trajectory import TrajectoryBatch
from rtb_ray.transitions import TransitionFamily


def make_posterior(prior: nn.Module, adapter: AdapterConfig, task: object = None) -> nn.Module:
    """The posterior network: the task's own (``posterior_network(prior, adapter)``, e.g. the
    frozen prior plus a zero-initialised correction that reads inputs the prior must not), else
    a trainable copy of the prior, or the frozen prior with LoRA adapters on
    ``adapter.target_modules``. Starts equal to the prior either way. Learner, workers, driver
    checks and ``rtb-ray sample`` all build it with this function, so every state dict fits
    every copy."""
    custom = getattr(task, "posterior_network", None)
    if custom is not None:
        return custom(prior, adapter)
    if adapter.kind == "full":
        return copy.deepcopy(prior).requires_grad_(True)
    # LoRA: a copy of the modules that shares the prior's frozen tensors (one base in memory,
    # and own_state publishes and checkpoints the adapters alone)
    posterior = copy.deepcopy(prior, memo={id(t): t for t in (*prior.parameters(),
                                                             *prior.buffers())})
    try:
        add_lora(posterior, adapter.rank, adapter.alpha, adapter.target_modules)
    except ValueError as err:  # names the module path: a config problem, said in one line
        raise ConfigError(str(err)) from None
    return posterior


class Learner:
    """Owns the trainable state. The posterior starts as a copy of the (frozen) prior; log Z
    (``train.log_z``: a number, or a function of the condition) has its own, larger learning
    rate. ``version`` counts optimiser steps and is what rollouts record as ``policy_version``.
    ``eval_conditions`` (a conditional task's fixed set) size log Z(y) and are what its logged
    mean is taken over. ``target_terminals`` (set by the trainer when ``train.mass_covering``
    is on) are the samples of the mass-covering term."""

    def __init__(self, family: TransitionFamily, prior: nn.Module, cfg: TrainConfig,
                 device: torch.device | str = "cpu", seed: int = 0,
                 eval_conditions: torch.Tensor | None = None, task: object = None) -> None:
        self.family = family
        self.cfg = cfg
        self.device = torch.device(device)
        self.prior = prior.to(self.device).requires_grad_(False).eval()
        self.posterior = make_posterior(self.prior, cfg.adapter, task).to(self.device).train()
        self.log_z = make_log_z(cfg.log_z, eval_conditions).to(self.device)
        self.eval_conditions = None if eval_conditions is None else eval_conditions.to(self.device)
        self.trainable = [p for p in self.posterior.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            [{"params": self.trainable, "lr": cfg.lr},
             {"params": list(self.log_z.parameters()), "lr": cfg.lr_log_z}],
            fused=self.device.type == "cuda")  # one kernel for all parameters, not dozens
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.target_terminals: torch.Tensor | None = None

    def log_z_of(self, cond: torch.Tensor | None, n: int = 1) -> torch.Tensor:
        """log Z_φ for ``n`` rows of condition ``cond`` (None: an unconditional task), no grad."""
        with torch.no_grad():  # detached too: a scalar's expand() is a view that requires grad
            return self.log_z(None if cond is None else cond.to(self.device), n).detach()

    def mean_log_z(self) -> torch.Tensor:
        """log Z_φ, or its mean over the evaluation conditions (what a train row logs)."""
        cond = self.eval_conditions
        return self.log_z_of(cond, 1 if cond is None else cond.shape[0]).mean()

    def _target_batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        assert self.target_terminals is not None
        rows = torch.randint(0, self.target_terminals.shape[0], (n,), generator=generator)
        return self.target_terminals[rows].to(self.device)

    def warm_start(self, steps: int, lr: float, progress: bool = False) -> list[float]:
        """Fit the posterior to ``target_terminals`` by the family's denoising loss alone (its own
        Adam; the learner's optimiser starts afresh). Returns the loss every 100 steps."""
        return pretrain_prior(self.family, self.posterior, self._target_batch, steps,
                              self.cfg.mass_covering.batch_size, lr, progress=progress)

    def _lr_factor(self, step: int) -> float:
        if self.cfg.lr_schedule == "constant":
            return 1.0
        floor = self.cfg.lr_final_fraction
        progress = min(step / self.cfg.steps, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    @property
    def version(self) -> int:
        return self.step_count

    def step(self, batch: TrajectoryBatch) -> dict[str, float]:
        batch = batch.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        stats = rtb_backward(self.family, self.posterior, self.log_z, batch, self.cfg.objective,
                             self.generator, group_size=self.cfg.group_size)
        mass_covering = self.cfg.mass_covering
        if mass_covering.weight > 0 and self.target_terminals is not None:
            x = self._target_batch(mass_covering.batch_size, self.generator)
            fit = self.family.pretrain_loss(self.posterior, x, self.generator,
                                            mass_covering.first_steps)
            (mass_covering.weight * fit).backward()  # added to the trajectory loss's gradients
            stats["mass_covering_loss"] = fit.detach()
        if self.cfg.grad_clip is not None:
            stats["grad_norm"] = nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        stats["log_z"] = self.mean_log_z()
        # one sync per step: on a GPU each .item() would stall the queue of kernels
        values = torch.stack([v.float() for v in stats.values()]).tolist()
        return {**dict(zip(stats, values)), "lr": self.optimizer.param_groups[0]["lr"]}

    def state_dict(self) -> dict:
        return {"posterior": own_state(self.posterior, self.prior),
                "log_z": self.log_z.state_dict(),
                "log_z_kind": self.cfg.log_z.kind, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        log_z = state["log_z"]
        if isinstance(log_z, torch.Tensor):  # a checkpoint from before train.log_z: one number
            log_z = {"value": log_z}
        check_log_z_kind(state, self.cfg.log_z.kind)
        load_own_state(self.posterior, self.prior, state["posterior"])
        self.log_z.load_state_dict(log_z)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step"])
