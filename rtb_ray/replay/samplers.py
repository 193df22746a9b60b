"""Which stored rows a training batch is drawn from. Every sampler is deterministic given the
numpy ``Generator`` the store passes in (the store's seed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping, Protocol

import numpy as np

from rtb_ray.trajectory import Source


class Rows(Protocol):
    """The ``count`` stored rows, oldest first; only rank order and source subsets cost O(rows),
    and only when a sampler asks for them. A store of groups (``group_size`` > 1) passes its
    groups instead, each named by its first row: samplers then draw, rank and age groups."""

    count: int

    def at(self, positions: np.ndarray) -> np.ndarray: ...  # 0..count-1 -> row sequence numbers

    def ranked(self) -> np.ndarray: ...  # sequence numbers by decreasing log_reward

    def of_sources(self, codes: tuple[int, ...]) -> "Rows": ...  # the rows of these sources


class Sampler(Protocol):
    def draw(self, rows: Rows, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` row sequence numbers, drawn with replacement."""


@dataclass(frozen=True)
class Uniform:
    def draw(self, rows: Rows, n: int, rng: np.random.Generator) -> np.ndarray:
        return rows.at(rng.integers(0, rows.count, n))


@lru_cache(maxsize=4)
def _rank_cdf(count: int, k: float) -> np.ndarray:
    return np.cumsum(1.0 / (k * count + np.arange(count, dtype=np.float64)))


@dataclass(frozen=True)
class Prioritised:
    """Reward-prioritised by rank (Tripp et al. 2020): the row of rank r (0 = highest log_reward)
    is drawn with probability ∝ 1 / (k·N + r). Small k concentrates on the best rows; k → ∞ is
    uniform."""

    k: float = 0.01

    def __post_init__(self) -> None:
        if not self.k > 0:
            raise ValueError(f"Prioritised.k must be > 0 (got {self.k})")

    def weights(self, count: int) -> np.ndarray:
        """Probability of each rank, for checks."""
        cdf = _rank_cdf(count, self.k)
        return np.diff(cdf, prepend=0.0) / cdf[-1]

    def draw(self, rows: Rows, n: int, rng: np.random.Generator) -> np.ndarray:
        ranked = rows.ranked()
        cdf = _rank_cdf(len(ranked), self.k)
        rank = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
        return ranked[np.minimum(rank, len(ranked) - 1)]


@dataclass(frozen=True)
class Recency:
    """Newer rows more often: a row ``half_life`` inserts older than the newest is drawn half as
    often (weight 2^(−age/half_life), age 0 = newest), by inverting a truncated exponential."""

    half_life: float

    def __post_init__(self) -> None:
        if not self.half_life > 0:
            raise ValueError(f"Recency.half_life must be > 0 (got {self.half_life})")

    def draw(self, rows: Rows, n: int, rng: np.random.Generator) -> np.ndarray:
        tau = self.half_life / math.log(2)
        # floor of an exponential truncated to [0, count) is exactly the truncated geometric
        age = np.floor(-tau * np.log1p(rng.random(n) * np.expm1(-rows.count / tau)))
        age = np.minimum(age.astype(np.int64), rows.count - 1)
        return rows.at(rows.count - 1 - age)


@dataclass(frozen=True)
class Mixture:
    """Per-source quotas of each batch, e.g. ``{"posterior|explore": .5, "prior": .25,
    "backward": .25}`` ("a|b" pools sources). Counts are the quotas rounded by largest
    remainder; the quota of a source with no rows in the store goes to the others in
    proportion. Within a source, rows are drawn by ``inner``; the batch is shuffled."""

    quotas: Mapping[str, float]
    inner: Sampler = field(default_factory=Uniform)

    def __post_init__(self) -> None:
        groups = []
        for name, share in self.quotas.items():
            if not share >= 0:
                raise ValueError(f"Mixture quota of {name!r} must be >= 0 (got {share})")
            codes = tuple(sorted(int(Source.parse(s.strip())) for s in name.split("|")))
            groups.append((codes, float(share)))
        if not sum(s for _, s in groups) > 0:
            raise ValueError("Mixture quotas must not all be zero")
        object.__setattr__(self, "_groups", tuple(groups))

    def draw(self, rows: Rows, n: int, rng: np.random.Generator) -> np.ndarray:
        present = [(rows.of_sources(codes), share) for codes, share in self._groups if share > 0]
        present = [(r, share) for r, share in present if r.count > 0]
        if not present:
            raise ValueError(f"no stored rows of any source in the mixture {dict(self.quotas)}")
        counts = split_by_quota(n, [share for _, share in present])
        parts = [self.inner.draw(r, c, rng) for (r, _), c in zip(present, counts) if c > 0]
        return rng.permutation(np.concatenate(parts))


def split_by_quota(n: int, shares: list[float]) -> list[int]:
    """``n`` split in proportion to ``shares``, rounded by largest remainder (sums to ``n``)."""
    exact = np.asarray(shares, np.float64) / sum(shares) * n
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]] += 1
    return counts.tolist()
