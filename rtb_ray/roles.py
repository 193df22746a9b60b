"""The rollout roles: who makes which trajectories for the replay store, defined once here.

Config validation, the learner's mixture (``training_mixture``), worker dispatch, per-role seeds
and ``rtb-ray status`` derive from ``ROLES``; Ray workers and the in-process source call the same
role functions. A new role is one function and one entry. torch is imported only when a role
runs, so config validation and ``rtb-ray status`` stay light."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    import torch

    from rtb_ray.config import RunConfig
    from rtb_ray.replay import Mixture, Sampler as RowSampler
    from rtb_ray.rollout import Sampler
    from rtb_ray.trajectory import TrajectoryBatch


@dataclass
class RolloutContext:
    """What a role needs to make a batch: the task's sampler (prior and posterior networks), the
    run's settings, its own random stream, read access to the replay store, and the weights
    version the sampler's posterior holds."""

    sampler: Sampler
    cfg: RunConfig
    generator: torch.Generator
    read_store: Callable[[int, RowSampler], TrajectoryBatch]  # n rows, not rate limited
    policy_version: int = 0


def posterior_rollouts(ctx: RolloutContext, n: int) -> TrajectoryBatch:
    """The posterior, its step variance inflated by the exploration schedule at the learner's
    progress (``train.explore``)."""
    from rtb_ray.trajectory import Source

    progress = max(ctx.policy_version, 0) / ctx.cfg.train.steps
    return ctx.sampler.rollout(Source.POSTERIOR, n, explore=ctx.cfg.train.explore.at(progress),
                               policy_version=ctx.policy_version, generator=ctx.generator,
                               group_size=ctx.cfg.train.group_size)


def prior_rollouts(ctx: RolloutContext, n: int) -> TrajectoryBatch:
    """The frozen prior: it covers every mode the prior has."""
    from rtb_ray.trajectory import Source

    return ctx.sampler.rollout(Source.PRIOR, n, generator=ctx.generator,
                               group_size=ctx.cfg.train.group_size)


def backward_rollouts(ctx: RolloutContext, n: int) -> TrajectoryBatch:
    """Known terminal states noised back to x_0: ``train.backward_candidates`` × n recent forward
    rows of the store (``train.backward_half_life``), resampled by their importance weights
    toward the target. Prior rows then reach every mode the prior covers, and posterior rows
    are corrected for the posterior's biases rather than amplified. With groups
    (``train.group_size`` k > 1) each backward group resamples the k rows of one stored forward
    group, within its condition: across conditions the draw would favour those of large Z(y)."""
    import torch

    from rtb_ray.metrics import sir_indices, target_log_weights
    from rtb_ray.replay import Mixture, Recency
    from rtb_ray.trajectory import Source

    train = ctx.cfg.train
    k = train.group_size
    # a store of groups draws whole groups: its half-life counts groups, the setting rows
    forward = Mixture({role.pool: 1.0 for role in ROLES.values() if role.forward},
                      inner=Recency(train.backward_half_life / k))
    known = ctx.read_store(n * train.backward_candidates if k == 1 else n, forward)
    log_weights = target_log_weights(known, train.objective.beta)
    if k == 1:
        pick = sir_indices(log_weights, n, ctx.generator)
    else:  # k draws within each stored group of k rows
        probs = torch.softmax(log_weights.detach().double().cpu().view(-1, k), 1)
        within = torch.multinomial(probs, k, replacement=True, generator=ctx.generator)
        pick = (within + k * torch.arange(probs.shape[0])[:, None]).view(-1)
    return ctx.sampler.rollout(Source.BACKWARD, n, terminal=known.terminal[pick],
                               cond=None if known.cond is None else known.cond[pick],
                               generator=ctx.generator)


def dataset_rollouts(ctx: RolloutContext, n: int) -> TrajectoryBatch:
    """The task's own data (``known_terminals``: offline RL's transitions, supervised pairs)
    noised back to x_0: trajectories that end where the data is, with the data's conditions.
    With groups each drawn datum is noised back k times (k independent paths, one condition)."""
    from rtb_ray.trajectory import Source

    k = ctx.cfg.train.group_size
    x, cond = ctx.sampler.task.known_terminals(n // k, ctx.generator)
    return ctx.sampler.rollout(
        Source.DATASET, n, terminal=x.repeat_interleave(k, dim=0),
        cond=None if cond is None else cond.repeat_interleave(k, dim=0), generator=ctx.generator)


@dataclass(frozen=True)
class Role:
    name: str  # the key in train.sources and runtime.workers
    pool: str  # the stored sources it makes, as a replay Mixture pool ("a|b")
    rollout: Callable[[RolloutContext, int], TrajectoryBatch]
    follows_learner: bool  # samples with the learner's weights (a worker pulls them first)
    forward: bool  # runs the chain forward: its terminals are what backward rollouts start from


ROLES: dict[str, Role] = {role.name: role for role in (
    Role("posterior", "posterior|explore", posterior_rollouts, follows_learner=True, forward=True),
    Role("prior", "prior", prior_rollouts, follows_learner=False, forward=True),
    Role("backward", "backward", backward_rollouts, follows_learner=False, forward=False),
    Role("dataset", "dataset", dataset_rollouts, follows_learner=False, forward=False),
)}
ROLE_NAMES = tuple(ROLES)


def check_role_names(names: Iterable[str], key: str, noun: str = "role") -> None:
    """ValueError naming ``key`` and the roles when ``names`` has one that is not a role."""
    unknown = [n for n in names if n not in ROLES]
    if unknown:
        raise ValueError(f"unknown {noun} {unknown[0]!r} in {key} (roles: "
                         f"{', '.join(ROLE_NAMES)})")


def training_mixture(cfg: RunConfig) -> Mixture:
    """The learner's batch: ``train.sources`` shares per role's pool, drawn within each pool by
    recency (``replay.recency_half_life``) or uniformly."""
    from rtb_ray.replay import Mixture, Recency, Uniform

    half_life = cfg.replay.recency_half_life
    # a store of groups draws whole groups: its half-life counts groups, the setting rows
    inner = Uniform() if half_life is None else Recency(half_life / cfg.train.group_size)
    return Mixture({ROLES[name].pool: share for name, share in cfg.train.sources.items()
                    if share > 0}, inner)
