"""RTB and friends, written as losses of one per-trajectory quantity.

For a trajectory τ with posterior log-probability ``S = Σ_t log p_φ(x_{t+1}|x_t)``:

    RTB      δ(τ) = log Z + S − log p_prior(τ) − β log r(x_T),        L = mean δ²
    VarGrad  d(τ) = S − log p_prior(τ) − β log r(x_T),                L = var d
             (log Z is then fitted to −mean d by its own squared error, detached from φ)
    KL-RL    A(τ) = β log r − γ(S − log p_prior) (detached),         L = −mean (A − mean A)·S
             (γ = ``kl_weight``: 1 targets the posterior; γ = 0 is DDPO, reward alone, with
             A − mean A divided by its group's std as DDPO normalises per prompt)

Every loss depends on the network only through S, so its gradient is Σ_b (∂L/∂S_b) ∇S_b. That
lets the same code (a) backpropagate through the whole batch at once, (b) accumulate ∇S in
chunks of steps with O(chunk) memory, and (c) push gradients through a random subset of steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rtb_ray.config import ObjectiveConfig
from rtb_ray.trajectory import TrajectoryBatch
from rtb_ray.transitions import TransitionFamily


def scaled_log_reward(log_reward: Tensor, cfg: ObjectiveConfig) -> Tensor:
    if cfg.log_reward_floor is not None:
        log_reward = log_reward.clamp_min(cfg.log_reward_floor)
    return cfg.beta * log_reward


def centred(v: Tensor, group_size: int) -> Tensor:
    """``v`` minus its mean over each group of ``group_size`` consecutive rows (1: the batch)."""
    if group_size == 1:
        return v - v.mean()
    groups = v.view(-1, group_size)
    return (groups - groups.mean(1, keepdim=True)).view(-1)


def trajectory_loss(
    log_post: Tensor, log_prior: Tensor, beta_log_reward: Tensor, log_z: Tensor, cfg: ObjectiveConfig,
    group_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """The scalar loss and the per-trajectory RTB residual δ (detached, for logging).
    ``log_z [B]``: log Z_φ of each row's condition. VarGrad and KL-RL centre within groups of
    ``group_size`` rows that share a condition (a batch is made of whole groups)."""
    d = log_post - log_prior - beta_log_reward
    delta = (log_z + d).detach()
    if cfg.kind == "rtb":
        per_traj = (log_z + d).square()
        fit_log_z = 0.0
    else:
        if d.shape[0] % group_size:
            raise ValueError(f"a batch of {d.shape[0]} rows is not whole groups of "
                             f"train.group_size={group_size}")
        # log Z does not enter these losses: fit it to the batch estimate −mean d on its own
        # learning rate so that it stays an estimate of the normaliser.
        fit_log_z = (log_z + d.detach()).square().mean()
        if cfg.kind == "vargrad":
            per_traj = centred(d, group_size).square()
        else:  # kl_rl: REINFORCE with a group-mean baseline on β log r − γ·log(p_φ/p_prior)
            log_ratio = (log_post - log_prior).detach()
            advantage = centred(beta_log_reward - cfg.kl_weight * log_ratio, group_size)
            if cfg.kl_weight == 0:  # DDPO: advantages normalised within each group (prompt)
                rows = advantage.view(-1, group_size) if group_size > 1 else advantage.view(1, -1)
                advantage = (rows / rows.std(1, keepdim=True).clamp_min(1e-8)).view(-1)
            per_traj = -advantage * log_post
    if cfg.loss_clip is not None:
        per_traj = torch.relu(per_traj - cfg.loss_clip)
    return per_traj.mean() + fit_log_z, delta


def rtb_backward(family: TransitionFamily, posterior: nn.Module, log_z: nn.Module,
                 batch: TrajectoryBatch, cfg: ObjectiveConfig,
                 generator: torch.Generator | None = None, group_size: int = 1
                 ) -> dict[str, Tensor]:
    """Compute the loss of ``batch`` and accumulate its gradients into ``posterior`` and
    ``log_z`` (``.grad``; rtb_ray/log_z.py). Σ log p_φ is recomputed for all B×T transitions
    in batched passes."""
    states, cond = batch.states, batch.cond
    log_z = log_z(cond, len(batch))
    beta_log_reward = scaled_log_reward(batch.log_reward, cfg)
    num_steps, k = batch.num_steps, cfg.subsample_steps
    steps, scale = None, 1.0
    if k is not None and k < num_steps:
        steps = torch.randperm(num_steps, generator=generator)[:k].sort().values.to(states.device)
        scale = num_steps / k

    if cfg.chunk_steps is None:
        log_post = family.step_log_probs(posterior, states, cond=cond, steps=steps).sum(1)
        if steps is not None:
            # value = Σ over all steps; gradient = (T/k)·Σ over the k chosen steps (unbiased)
            rest = torch.ones(num_steps, dtype=torch.bool, device=states.device)
            rest[steps] = False
            with torch.no_grad():
                log_rest = family.step_log_probs(posterior, states, cond=cond,
                                                 steps=rest.nonzero().squeeze(1)).sum(1)
            log_post = scale * log_post - (scale - 1) * log_post.detach() + log_rest
        loss, delta = trajectory_loss(log_post, batch.log_prior, beta_log_reward, log_z, cfg,
                                      group_size)
        loss.backward()
    else:
        # δ without a graph, then ∂L/∂S_b · ∇ Σ_{t ∈ chunk} log p_φ, chunk by chunk.
        with torch.no_grad():
            log_post = family.step_log_probs(posterior, states, cond=cond).sum(1).requires_grad_()
        loss, delta = trajectory_loss(log_post, batch.log_prior, beta_log_reward, log_z, cfg,
                                      group_size)
        loss.backward()
        coef = log_post.grad * scale  # type: ignore[operator]
        chosen = steps if steps is not None else torch.arange(num_steps, device=states.device)
        for chunk in chosen.split(cfg.chunk_steps):
            lp = family.step_log_probs(posterior, states, cond=cond, steps=chunk).sum(1)
            (coef * lp).sum().backward()
        log_post = log_post.detach()

    # tensors, not floats: the caller reads all of a step's numbers in one device sync
    return {"loss": loss.detach(), "delta_mean": delta.mean(), "delta_sq": delta.square().mean(),
            "log_post": log_post.detach().mean()}
