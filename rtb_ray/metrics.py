"""Metrics that say whether the posterior is right (RTB.md, "Metrics").

With ``lw(τ) = β log r(x_T) + log p_prior(τ) − log p_φ(τ)``:
ELBO = mean lw over posterior trajectories (≤ log Z), importance-weighted log Z =
log mean exp lw, ESS = 1 / Σ softmax(lw)²; EUBO = mean lw over target trajectories (≥ log Z),
drawn by resampling prior trajectories in proportion to r^β (SIR).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rtb_ray.trajectory import Source, TrajectoryBatch
from rtb_ray.transitions import TransitionFamily


@torch.no_grad()
def sum_log_probs(family: TransitionFamily, net: nn.Module, states: Tensor,
                  cond: Tensor | None = None, chunk: int = 4096) -> Tensor:
    """Σ_t log p(x_{t+1}|x_t) per trajectory, in chunks of trajectories to bound memory."""
    out: list[Tensor] = []
    for i in range(0, states.shape[0], chunk):
        c = None if cond is None else cond[i : i + chunk]
        out.append(family.step_log_probs(net, states[i : i + chunk], cond=c).sum(1))
    return torch.cat(out)


def importance_metrics(log_weights: Tensor) -> dict[str, float]:
    n = log_weights.shape[0]
    lw = log_weights.double()
    w = torch.softmax(lw, 0)
    return {
        "elbo": lw.mean().item(),
        "iw_log_z": (torch.logsumexp(lw, 0) - math.log(n)).item(),
        "ess_fraction": (1.0 / w.square().sum()).item() / n,
    }


def target_log_weights(batch: TrajectoryBatch, beta: float) -> Tensor:
    """log of p_prior(τ)·r(x_T)^β / q(τ) for forward trajectories made by any process q: the
    importance weights toward the target path measure. For prior rows q = p_prior and this is
    β·log r; for posterior rows it also divides out the posterior, so resampling them does not
    count the reward twice (which would sharpen the target towards r^2β)."""
    return beta * batch.log_reward + batch.log_prior - batch.log_behaviour


def sir_indices(log_weights: Tensor, m: int, generator: torch.Generator | None = None) -> Tensor:
    """Sampling-importance-resampling: m indices drawn with probability ∝ exp(log_weights)."""
    probs = torch.softmax(log_weights.detach().double().cpu(), 0)
    return torch.multinomial(probs, m, replacement=True, generator=generator).to(log_weights.device)


def mode_weights(x: Tensor, centers: Tensor) -> Tensor:
    """Share of samples whose nearest centre is each of ``centers [K, D]``."""
    nearest = torch.cdist(x.float(), centers.float()).argmin(1)
    return torch.bincount(nearest, minlength=centers.shape[0]).double() / x.shape[0]


def total_variation(p: Tensor, q: Tensor) -> float:
    return 0.5 * (p.double() - q.double()).abs().sum().item()


def sliced_wasserstein(
    x: Tensor, y: Tensor, num_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """W2 averaged over random 1-D projections (quantile matching; sizes may differ)."""
    d = x.shape[1]
    dirs = torch.randn(d, num_projections, generator=generator, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    q = torch.linspace(0, 1, min(x.shape[0], y.shape[0]), dtype=torch.float64)
    qx = torch.quantile(x.double() @ dirs, q, dim=0)
    qy = torch.quantile(y.double() @ dirs, q, dim=0)
    return (qx - qy).square().mean().sqrt().item()


@torch.no_grad()
def posterior_metrics(family: TransitionFamily, posterior: nn.Module, prior: nn.Module,
                      samples: TrajectoryBatch, target_pool: TrajectoryBatch | None, beta: float,
                      reference_log_z: float | None = None, eubo_samples: int = 4096,
                      generator: torch.Generator | None = None) -> dict[str, float]:
    """Generic quality metrics of a posterior. ``samples`` are on-policy posterior trajectories
    (their ``log_prior`` and ``log_reward`` filled in); ``target_pool`` are prior trajectories
    from which target trajectories are drawn by SIR for the EUBO."""
    def lw(b: TrajectoryBatch) -> Tensor:  # lw(τ) of the module docstring
        log_post = sum_log_probs(family, posterior, b.states, b.cond)
        return beta * b.log_reward + b.log_prior - log_post

    out = importance_metrics(lw(samples))
    out["mean_log_reward"] = samples.log_reward.double().mean().item()
    if target_pool is not None:
        idx = sir_indices(target_log_weights(target_pool, beta), eubo_samples, generator)
        out["eubo"] = lw(target_pool.index(idx)).double().mean().item()
    if reference_log_z is not None:
        out["reference_log_z"] = reference_log_z
        out["elbo_gap"] = reference_log_z - out["elbo"]
        if "eubo" in out:
            out["eubo_gap"] = out["eubo"] - reference_log_z
    return out


def frechet_distance(x: Tensor, y: Tensor) -> float:
    """‖μx − μy‖² + Tr(Σx + Σy − 2(Σx Σy)^½) between Gaussians fitted to two feature sets
    (FID's formula, in whatever fixed feature space the caller chose). Tr (Σx Σy)^½ is the sum
    of the square roots of the eigenvalues of Σx^½ Σy Σx^½, a symmetric PSD matrix."""
    x, y = x.double(), y.double()
    mu = (x.mean(0) - y.mean(0)).square().sum()
    cx, cy = torch.cov(x.T), torch.cov(y.T)
    evals, evecs = torch.linalg.eigh(cx)
    root_x = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(root_x @ cy @ root_x).clamp_min(0).sqrt().sum()
    return (mu + torch.trace(cx) + torch.trace(cy) - 2 * cross).item()


def mean_pairwise_cosine_distance(
    x: Tensor, max_samples: int = 2000, generator: torch.Generator | None = None
) -> float:
    """Diversity: 1 − cos between distinct pairs, averaged (on a random subset of at most
    ``max_samples`` rows: the pair count is quadratic)."""
    if x.shape[0] > max_samples:
        x = x[torch.randperm(x.shape[0], generator=generator)[:max_samples]]
    n = x.shape[0]
    unit = torch.nn.functional.normalize(x.double().flatten(1), dim=1)
    similarity = unit @ unit.T
    return (1.0 - (similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))).item()


def staleness(batch: TrajectoryBatch, version: int) -> Tensor:
    """How many learner steps old the weights were that sampled each posterior row."""
    on_policy = (batch.source == Source.POSTERIOR) | (batch.source == Source.EXPLORE)
    return version - batch.policy_version[on_policy]


def staleness_quantiles(staleness: Tensor) -> dict[str, float]:
    """Mean, quantiles and max of the staleness of the posterior rows a learner trained on."""
    if staleness.numel() == 0:
        return {}
    s = staleness.double()
    q = torch.quantile(s, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"staleness_mean": s.mean().item(), "staleness_p50": q[0], "staleness_p90": q[1],
            "staleness_p99": q[2], "staleness_max": s.max().item()}
