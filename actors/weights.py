"""The weight store: the latest ``(version, ObjectRef)`` of the posterior's state dict.

Weights are pulled, not pushed: the learner puts the whole state dict once per publish and
hands the reference here; workers ask for the latest version at the top of each sampling call
and fetch the object only when it is newer than what they hold. Only the newest reference is
kept, so older versions are freed as soon as no worker holds them.

An object made with ``ray.put`` dies with its owner (the learner): if the learner is gone the
reference fails to resolve, workers keep sampling with what they hold, and a restarted learner
re-publishes from its checkpoint.
"""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class WeightStore:
    def __init__(self) -> None:
        self._version = -1
        self._ref: ray.ObjectRef | None = None
        self._learner_step = 0
        self._published = 0

    def publish(self, version: int, refs: list[ray.ObjectRef]) -> bool:
        """Keep ``refs[0]`` as ``version`` if it is newer. The ref travels inside a list so that
        Ray hands over the reference instead of resolving it; the previous one is released."""
        self._learner_step = max(self._learner_step, version)
        if version <= self._version:
            return False
        self._version, self._ref = version, refs[0]
        self._published += 1
        return True

    def set_learner_step(self, step: int) -> None:
        """The learner's current step: what ``max_staleness`` is measured against."""
        self._learner_step = max(self._learner_step, step)

    def latest(self) -> tuple[int, list[ray.ObjectRef], int]:
        """(version, [ref] or [], learner step)."""
        return self._version, [] if self._ref is None else [self._ref], self._learner_step

    def stats(self) -> dict[str, int]:
        return {"version": self._version, "learner_step": self._learner_step,
                "published": self._published}
