"""The coordinator: one named actor per run that owns the rollout workers. It keeps
``runtime.max_in_flight`` calls in flight per worker, replaces workers that die and follows
``scale``: surplus workers get no new calls and stop once theirs have returned, so no inserted
trajectory is lost. ``status`` and ``metrics`` are served meanwhile (``max_concurrency``).

A worker Ray cannot place yet (no node has its resources: ``runtime.worker_resources`` on an
autoscaled cluster waiting for a node) is *pending*; ``status`` says so, and scaling down
removes pending workers first, at once."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray

from rtb_ray.config import RunConfig, check_worker_counts
from rtb_ray.roles import ROLE_NAMES

THROUGHPUT_WINDOW_S = 20.0
MAX_FAILED_STARTS = 5  # a role whose new workers keep dying is not restarted forever


@dataclass
class WorkerRecord:
    name: str
    role: str
    handle: Any
    started: float = field(default_factory=time.time)
    in_flight: list = field(default_factory=list)
    retiring: bool = False
    node: str | None = None
    version: int = -1
    inserted: int = 0
    calls: int = 0
    placed: bool = False  # Ray has started its process on a node (never unset)


def actor_placed(handle: Any) -> bool | None:
    """Whether Ray has started the actor's process on some node: until then it waits for a node
    with its resources (pending). None when this Ray cannot tell.

    The GCS actor table has the worker's pid from the moment a node leases it (the constructor
    may still be running) and 0 while the request waits for resources; reading one entry is one
    local RPC (~1 ms). ``ray.util.state.get_actor`` says the same through the dashboard's API
    server, an HTTP hop through a process that a busy head may answer slowly, and status must
    stay quick. The table is private Ray API, hence the None."""
    try:
        from ray._private import state

        info = state.actors(actor_id=handle._actor_id.hex())
    except (AttributeError, ImportError, ray.exceptions.RayError):
        return None
    return bool(info) and int(info.get("Pid") or 0) > 0


@ray.remote(num_cpus=0, max_concurrency=8)
class Coordinator:
    def __init__(self, cfg: RunConfig, run: str, namespace: str, store: Any, weights: Any,
                 prior_file: list[ray.ObjectRef]) -> None:
        self.cfg, self.run, self.namespace = cfg, run, namespace
        self.store, self.weights, self.prior_file = store, weights, prior_file
        self.targets = {role: cfg.runtime.workers.get(role, 0) for role in ROLE_NAMES}
        self.workers: dict[str, WorkerRecord] = {}
        self.next_index = dict.fromkeys(ROLE_NAMES, 0)
        self.failed_starts = dict.fromkeys(ROLE_NAMES, 0)
        self.totals = {"inserted": 0, "quarantined": 0, "throttled": 0, "stale": 0, "errors": 0,
                       "replaced": 0, "retired": 0, "calls": 0}
        self.by_role = {role: 0 for role in ROLE_NAMES}
        self.by_node: dict[str, int] = {}
        self.recent: deque[tuple[float, str, int]] = deque()  # (time, role, inserted)
        self.last_error = ""
        self.store_stats: dict[str, Any] = {}
        self.weight_stats: dict[str, Any] = {}
        self.started = time.time()
        self.crashed = False
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="coordinator", daemon=True)
        self.thread.start()

    # -- the loop ------------------------------------------------------------------------------
    def _spawn(self, role: str) -> None:
        from actors.rollout import RolloutWorker

        index = self.next_index[role]
        self.next_index[role] += 1
        name = f"{self.run}/{role}-{index}"
        # Custom resources are asked for only when the config says so (runtime.worker_resources,
        # e.g. {rollout: 1} on cluster.yaml), not when the cluster happens to have them: an
        # autoscaled cluster with no rollout node up yet has no `rollout` in
        # ray.cluster_resources(), and the node types the autoscaler could add are not public
        # API. Explicit keeps every worker of a run placed alike.
        handle = RolloutWorker.options(
            name=name, namespace=self.namespace, num_cpus=self.cfg.runtime.worker_num_cpus,
            resources=dict(self.cfg.runtime.worker_resources) or None,
            scheduling_strategy="SPREAD", max_restarts=0,
        ).remote(self.cfg, role, name, self.store, self.weights,
                 seed=self.cfg.seeds.worker(role, index), prior_file=self.prior_file)
        self.workers[name] = WorkerRecord(name, role, handle)

    def _reconcile(self) -> None:
        """Start or retire workers until each role has its target count."""
        for role in ROLE_NAMES:
            active = [w for w in self.workers.values() if w.role == role and not w.retiring]
            if self.failed_starts[role] >= MAX_FAILED_STARTS:
                continue
            for _ in range(self.targets[role] - len(active)):
                self._spawn(role)
            # keep those that have sampled, oldest first: a worker that has not (pending, or
            # still starting) holds no rows, and a pending one would make an autoscaler add a
            # node for nothing
            keep = sorted(active, key=lambda w: (w.calls == 0, w.started))
            for w in keep[self.targets[role]:]:
                w.retiring = True  # no new calls; shut down once its calls are back

    def _submit(self) -> dict[Any, WorkerRecord]:
        owners = {}
        n = self.cfg.runtime.rollout_batch_size
        for w in self.workers.values():
            while not w.retiring and len(w.in_flight) < self.cfg.runtime.max_in_flight:
                w.in_flight.append(w.handle.step.remote(n))
            for ref in w.in_flight:
                owners[ref] = w
        return owners

    def _record(self, w: WorkerRecord, result: dict[str, Any]) -> None:
        w.calls += 1
        w.node, w.version = result["node"], result["version"]
        self.totals["calls"] += 1
        self.failed_starts[w.role] = 0
        status = result["status"]
        if status in ("throttled", "stale"):
            self.totals[status] += 1
            self.last_error = f"{w.name}: {result['reason']}"
        elif status == "rejected":
            self.totals["errors"] += 1
            self.last_error = f"{w.name}: batch rejected: {result['reason']}"
        n = result["inserted"]
        w.inserted += n
        self.totals["inserted"] += n
        self.totals["quarantined"] += result["quarantined"]
        self.by_role[w.role] += n
        self.by_node[w.node] = self.by_node.get(w.node, 0) + n
        self.recent.append((time.time(), w.role, n))

    def _collect(self, owners: dict[Any, WorkerRecord]) -> None:
        if not owners:
            time.sleep(0.1)
            return
        ready, _ = ray.wait(list(owners), num_returns=1, timeout=0.5)
        if ready:  # and whatever else is done by now
            ready, _ = ray.wait(list(owners), num_returns=len(owners), timeout=0)
        for ref in ready:
            w = owners[ref]
            w.in_flight.remove(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as err:  # the worker is gone: replace it
                with self.lock:
                    if w.name in self.workers:
                        del self.workers[w.name]
                        self.totals["replaced"] += 0 if w.retiring else 1
                        if w.calls == 0:
                            self.failed_starts[w.role] += 1
                        self.last_error = f"{w.name} died: {str(err).splitlines()[0]}"
                continue
            except ray.exceptions.RayTaskError as err:  # e.g. the store timed out a draw
                with self.lock:
                    self.totals["errors"] += 1
                    self.last_error = f"{w.name}: {str(err.cause or err).splitlines()[0]}"
                continue
            with self.lock:
                self._record(w, result)

    @staticmethod
    def _placed(w: WorkerRecord) -> bool | None:
        """Whether the worker has a process on a node (asked of Ray until it has)."""
        if not w.placed:
            placed = w.calls > 0 or actor_placed(w.handle)
            if not placed:
                return placed
            w.placed = True
        return True

    def _retire(self) -> None:
        for w in [w for w in self.workers.values() if w.retiring]:
            # a pending worker's calls have not started (it has no process): nothing to wait for
            if w.in_flight and self._placed(w) is not False:
                continue
            ray.kill(w.handle)
            del self.workers[w.name]
            self.totals["retired"] += 1

    def _loop(self) -> None:
        try:
            self._run_loop()
        except BaseException as err:  # a bug here must show in status, not vanish with a thread
            self.last_error = f"coordinator loop crashed: {err!r}"
            self.crashed = True
            raise

    def _run_loop(self) -> None:
        last_stats = 0.0
        while not self.stopping.is_set():
            with self.lock:
                self._reconcile()
                owners = self._submit()
            self._collect(owners)
            with self.lock:
                self._retire()
                cutoff = time.time() - THROUGHPUT_WINDOW_S
                while self.recent and self.recent[0][0] < cutoff:
                    self.recent.popleft()
            if time.time() - last_stats > 2.0:
                last_stats = time.time()
                try:
                    self.store_stats, self.weight_stats = ray.get(
                        [self.store.stats.remote(), self.weights.stats.remote()], timeout=10)
                except (ray.exceptions.RayError, TimeoutError) as err:
                    self.last_error = f"stats: {str(err).splitlines()[0]}"

    # -- calls from the driver, the learner and ``rtb-ray scale/status`` -------------------------
    def scale(self, counts: dict[str, int]) -> dict[str, int]:
        """Set the number of workers of some roles; returns all targets."""
        check_worker_counts(counts, total=False)
        with self.lock:
            check_worker_counts({**self.targets, **counts})
            self.targets.update(counts)
            for role in counts:
                self.failed_starts[role] = 0
            return dict(self.targets)

    def _throughput(self) -> dict[str, float]:
        now = time.time()
        span = min(THROUGHPUT_WINDOW_S, max(now - self.started, 1e-3))
        out = {f"trajectories_per_s_{role}": 0.0 for role in ROLE_NAMES}
        for _, role, n in self.recent:
            out[f"trajectories_per_s_{role}"] += n / span
        out["trajectories_per_s"] = sum(out.values())
        return out

    def metrics(self) -> dict[str, float]:
        """Numbers for the learner's train rows (flat, numeric)."""
        with self.lock:
            active = [w for w in self.workers.values() if not w.retiring]
            out = {f"workers_{role}": float(sum(w.role == role for w in active))
                   for role in ROLE_NAMES}
            out.update(self._throughput())
            out["workers_replaced"] = float(self.totals["replaced"])
            out["inserted"] = float(self.totals["inserted"])
        for key in ("size", "samples_per_insert"):
            if key in self.store_stats:
                out[f"replay_{key}"] = float(self.store_stats[key])
        return out

    @staticmethod
    def _state(w: WorkerRecord, placed: bool | None) -> str:
        """pending: waits for a node with its resources; starting: on a node (or Ray cannot
        tell), no call back yet; sampling: calls have come back."""
        if w.calls > 0:
            return "sampling"
        return "pending" if placed is False else "starting"

    def status(self) -> dict[str, Any]:
        with self.lock:
            unplaced = [w for w in self.workers.values() if not w.placed]
        # outside the lock (one GCS read each), so the loop never waits on status
        placed = {w.name: self._placed(w) for w in unplaced}
        with self.lock:
            workers = [{"name": w.name, "role": w.role, "node": w.node, "version": w.version,
                        "inserted": w.inserted, "calls": w.calls, "retiring": w.retiring,
                        "in_flight": len(w.in_flight),
                        "state": self._state(w, placed.get(w.name, True))}
                       for w in self.workers.values()]
            return {"run": self.run, "targets": dict(self.targets), "workers": workers,
                    "totals": dict(self.totals), "inserted_by_role": dict(self.by_role),
                    "inserted_by_node": dict(self.by_node), "throughput": self._throughput(),
                    "replay": dict(self.store_stats), "weights": dict(self.weight_stats),
                    "last_error": self.last_error, "crashed": self.crashed,
                    "uptime_s": time.time() - self.started}

    def stop(self) -> dict[str, Any]:
        """Stop sampling and shut the workers down. Calls still in flight are cut short: a
        store insert is atomic, so their rows are in the store or not at all (the store's
        ``inserted`` counter is then ahead of ``totals.inserted``, never behind)."""
        self.stopping.set()
        self.thread.join()
        for w in self.workers.values():
            ray.kill(w.handle)
        self.workers.clear()
        return self.status()
