"""The Arrow replay store: durable, prioritised, rate-limited, queryable (docs/REPLAY.md)."""

from rtb_ray.replay.rate_limiter import RateLimiter
from rtb_ray.replay.samplers import Mixture, Prioritised, Recency, Sampler, Uniform
from rtb_ray.replay.segments import CorruptSegmentWarning, SegmentDirectory
from rtb_ray.replay.store import (InsertResult, InsertStatus, ReplayDiskError, ReplayStore,
                                  SampleTimeout)

__all__ = [
    "CorruptSegmentWarning", "InsertResult", "InsertStatus", "Mixture", "Prioritised",
    "RateLimiter", "Recency", "ReplayDiskError", "ReplayStore", "SampleTimeout", "Sampler", "SegmentDirectory",
    "Uniform",
]
