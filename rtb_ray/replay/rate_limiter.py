"""Backpressure between rollout workers and the learner (Reverb's ``SampleToInsertRatio``).

The error ``e = samples_per_insert · (inserted − min_size_to_sample) − sampled`` says how far the
learner is from its target: ``e > 0``, it lags (too few samples per insert); ``e < 0``, the
writers lag. Inserts are allowed while ``e <= error_buffer`` (or while the store is smaller than
``min_size_to_sample``); samples are allowed once the store holds ``min_size_to_sample`` rows and
while ``e >= -error_buffer``. Both checks look at the state *before* the call, so a call may
overshoot by one batch; this is what makes batched calls deadlock-free: whenever one side is
blocked, the other is allowed.
"""

from __future__ import annotations


class RateLimiter:
    def __init__(self, samples_per_insert: float | None = None, error_buffer: float | None = None,
                 min_size_to_sample: int = 1) -> None:
        if min_size_to_sample < 1:
            raise ValueError(f"min_size_to_sample must be >= 1 (got {min_size_to_sample})")
        if samples_per_insert is not None:
            if samples_per_insert <= 0:
                raise ValueError(f"samples_per_insert must be > 0 (got {samples_per_insert})")
            if error_buffer is None or error_buffer <= 0:
                raise ValueError(
                    f"samples_per_insert needs an error_buffer > 0 (got {error_buffer})")
        self.samples_per_insert = samples_per_insert
        self.error_buffer = error_buffer
        self.min_size_to_sample = min_size_to_sample
        # trajectories inserted and sampled since this limiter was made (the store adds to them)
        self.inserted = self.sampled = 0

    def warm_start(self, size: int) -> None:
        """A store reopened with ``size`` rows: count them so that the error starts at zero
        (or below, while fewer than ``min_size_to_sample`` rows are back)."""
        self.inserted, self.sampled = min(size, self.min_size_to_sample), 0

    @property
    def error(self) -> float:
        """> 0: the learner lags behind the target ratio; < 0: the writers lag."""
        if self.samples_per_insert is None:
            return 0.0
        return self.samples_per_insert * (self.inserted - self.min_size_to_sample) - self.sampled

    def can_insert(self, size: int) -> bool:
        if self.samples_per_insert is None or size < self.min_size_to_sample:
            return True
        return self.error <= self.error_buffer

    def can_sample(self, size: int) -> bool:
        if size < self.min_size_to_sample:
            return False
        return self.samples_per_insert is None or self.error >= -self.error_buffer

    def why_not_sample(self, size: int) -> str:
        if size < self.min_size_to_sample:
            return (f"the store holds {size} rows, fewer than "
                    f"min_size_to_sample={self.min_size_to_sample}")
        return (f"the writers lag: samples_per_insert={self.samples_per_insert}, "
                f"{self.inserted} counted inserts, {self.sampled} samples, error {self.error:.0f} "
                f"< -error_buffer={-self.error_buffer}")
