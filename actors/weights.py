"""The weight store: the latest ``(version, ObjectRef)`` of the posterior's state dict.

Weights are pulled, not pushed: the learner puts the whole state dict once per publish and
hands the reference here; workers ask for the latest version at the top of each sampling call
and fetch the object only when it is newer than what they hold.
"""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class WeightStore:
    def __init__(self) -> None:
        self._version = -1
        self._ref: ray.ObjectRef | None = None

    def publish(self, version: int, refs: list[ray.ObjectRef]) -> bool:
        """Keep ``refs[0]`` as ``version`` if it is newer. The ref travels inside a list so that
        Ray hands over the reference instead of resolving it; the previous one is released."""
        if version <= self._version:
            return False
        self._version, self._ref = version, refs[0]
        return True

    def latest(self) -> tuple[int, list[ray.ObjectRef]]:
        return self._version, [] if self._ref is None else [self._ref]

    def version(self) -> int:
        return self._version
