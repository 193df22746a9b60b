"""The weight store: the latest ``(version, ObjectRef)`` of the posterior's state dict.

Workers pull: they ask for the latest version at each call and fetch it only when newer. Only the
newest reference is kept, so old versions are freed. A ``ray.put`` object dies with its owner (the
learner): workers then keep what they hold until a restarted learner publishes again."""

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

    def reset(self) -> None:
        """Forget the versions: a restarted learner publishes from its checkpoint, which may be
        behind the last version (workers take any version other than theirs)."""
        self._version, self._ref, self._learner_step = -1, None, 0

    def set_learner_step(self, step: int) -> None:
        """The learner's current step: what ``max_staleness`` is measured against."""
        self._learner_step = max(self._learner_step, step)

    def latest(self) -> tuple[int, list[ray.ObjectRef], int]:
        """(version, [ref] or [], learner step)."""
        return self._version, [] if self._ref is None else [self._ref], self._learner_step

    def stats(self) -> dict[str, int]:
        return {"version": self._version, "learner_step": self._learner_step,
                "published": self._published}
