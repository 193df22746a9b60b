"""Faults injected into one 25→9 run on Ray: every one recovered, no durable row lost, bars met.

    python benchmarks/faults.py [--out benchmarks/results/faults.json]

One `rtb-ray train pipelines/configs/gmm25.yaml` on a two-node `ray.cluster_utils.Cluster` (both
nodes on this machine), driven as a user would (a subprocess; `--resume` after each kill). The
schedule, by learner step: 20 rollout-worker kills, 2 learner kills, 1 store kill, 1 node removal
(a fresh node joins after it) and 5 driver SIGKILLs of the whole process group, each followed by
`--resume`. A fault counts as recovered when:

- worker: the coordinator replaced it and the new worker has inserted rows;
- learner, store, node: the learner trains 50 steps past where it was (after the node, every
  worker samples on the nodes left);
- driver: the resumed run trains 50 steps past its checkpoint, in the same MLflow run.

Rows: "durable" rows are those in sealed segments, the store's promise (docs/REPLAY.md). Before
every fault and at the end the ids on disk are read; ``rows_lost`` counts ids once seen on disk and
missing at the end (must be 0). Acknowledged rows that were not sealed yet when a store or driver
died are lost by the documented contract: reported per fault, with the contract's bound.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow.dataset as ds

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from actors.session import init_ray, prepare_ray  # noqa: E402

CONFIG = ROOT / "pipelines" / "configs" / "gmm25.yaml"
BARS = {"tv_analytic<=0.05": lambda m: m["tv_analytic"] <= 0.05,
        "tv_target<=0.05": lambda m: m["tv_target"] <= 0.05,
        "modes_hit==9": lambda m: m["modes_hit"] == 9,
        "elbo_gap<=0.1": lambda m: m["elbo_gap"] <= 0.1}
# (learner step, fault). A learner restarts from the last checkpoint (every 500 steps; before
# the first one a dead learner ends the run), and a driver kill sends the run back to it: both
# come 50–200 steps after one, and the next faults wait for the run to pass them again
SCHEDULE = ([(250 + 40 * i, "worker") for i in range(4)] + [(600, "learner"), (800, "node"),
            (1100, "driver")]
            + [(1250 + 40 * i, "worker") for i in range(4)] + [(1450, "store"), (1600, "driver")]
            + [(1750 + 40 * i, "worker") for i in range(4)] + [(2050, "learner"),
                                                                 (2200, "driver")]
            + [(2250 + 40 * i, "worker") for i in range(4)] + [(2600, "driver")]
            + [(2750 + 40 * i, "worker") for i in range(4)] + [(3100, "driver")])


class Run:
    """The run under test: its driver process, and what it wrote."""

    def __init__(self, path: Path, address: str) -> None:
        self.path, self.address = path, address
        self.driver: subprocess.Popen | None = None
        self.log = open(path.parent / "driver.log", "a")

    def start(self, resume: bool) -> None:
        # its MLflow runs beside its output, not in ./mlflow.db of the repository (the default)
        args = [sys.executable, "-m", "rtb_ray.cli", "train", str(CONFIG), "--no-progress",
                "--address", self.address, "--output", str(self.path), "--tracking-uri",
                f"sqlite:///{(self.path.parent / 'mlflow.db').resolve()}"]
        if resume:
            args += ["--resume", str(self.path)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a user's
        self.log.write(f"\n$ {' '.join(args)}\n")
        self.log.flush()
        self.driver = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log,
                                       stderr=subprocess.STDOUT, start_new_session=True)

    def info(self) -> dict[str, Any]:
        return json.loads((self.path / "runtime.json").read_text())

    def train_rows(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if '"train"' in line]

    def step(self) -> int:
        rows = self.train_rows()
        return rows[-1]["step"] if rows else 0

    def disk_ids(self) -> set[int]:
        files = [str(f) for f in sorted((self.path / "replay").glob("segment-*.arrow"))]
        if not files:
            return set()
        return set(ds.dataset(files, format="ipc").to_table(columns=["id"])
                   .column("id").to_pylist())

    def actor(self, role: str) -> Any:
        import ray

        info = self.info()
        return ray.get_actor(info[role], namespace=info["namespace"])


def wait_for(what: str, check: Callable[[], Any], run: Run, timeout: float = 300) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        if run.driver is not None and run.driver.poll() is not None:
            raise RuntimeError(f"the driver ended (rc {run.driver.returncode}) while waiting for "
                               f"{what}; see {run.log.name}")
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def trains_past(run: Run, step: int, timeout: float = 300) -> float:
    """Seconds until the learner logs a train row past ``step`` (rows appended from now)."""
    t0, seen = time.time(), len(run.train_rows())
    wait_for(f"training past step {step}", lambda: any(
        r["step"] > step for r in run.train_rows()[seen:]), run, timeout)
    return time.time() - t0


def store_stats(run: Run) -> dict[str, Any]:
    import ray

    return ray.get(run.actor("store").stats.remote(), timeout=30)


def coordinator_status(run: Run) -> dict[str, Any]:
    import ray

    return ray.get(run.actor("coordinator").status.remote(), timeout=30)


def active(status: dict) -> list[dict]:
    return [w for w in status["workers"] if not w["retiring"]]


def kill_worker(run: Run, rng: random.Random) -> dict[str, Any]:
    import ray

    before = wait_for("a sampling worker", lambda: (lambda s: s if any(
        w["calls"] > 0 for w in active(s)) else None)(coordinator_status(run)), run)
    victim = rng.choice(sorted((w for w in active(before) if w["calls"] > 0),
                               key=lambda w: w["name"]))
    ray.kill(ray.get_actor(victim["name"], namespace=run.info()["namespace"]))
    t0 = time.time()

    def replaced() -> bool:
        s = coordinator_status(run)
        new = [w for w in active(s) if w["role"] == victim["role"]
               and w["name"] not in {v["name"] for v in before["workers"]}]
        return (s["totals"]["replaced"] > before["totals"]["replaced"]
                and any(w["inserted"] > 0 for w in new))

    wait_for(f"a replacement for {victim['name']}", replaced, run, timeout=120)
    return {"victim": victim["name"], "recovery_s": time.time() - t0}


def kill_learner(run: Run) -> dict[str, Any]:
    import ray

    step = run.step()
    ray.kill(run.actor("learner"), no_restart=True)
    return {"step": step, "recovery_s": trains_past(run, step + 50)}


def kill_store(run: Run) -> dict[str, Any]:
    import ray

    stats = store_stats(run)
    step = run.step()
    ray.kill(run.actor("store"), no_restart=False)  # Ray restarts it from its segments
    recovery = trains_past(run, step + 50)
    after = store_stats(run)
    return {"step": step, "recovery_s": recovery, "acknowledged_by_killed_store": stats["inserted"],
            "unsealed_at_kill": stats["unsealed_rows"], "reloaded_rows": after["loaded"]}


def remove_node(run: Run, cluster: Any, node: Any) -> tuple[dict[str, Any], Any]:
    step = run.step()
    before = {w["node"] for w in active(coordinator_status(run)) if w["calls"] > 0}
    cluster.remove_node(node)
    t0 = time.time()
    wait_for("every worker sampling on the nodes left", lambda: (lambda s: len(active(s)) == len(
        [w for w in active(s) if w["calls"] > 0 and w["node"] != node.node_id]))(
        coordinator_status(run)), run, timeout=180)
    recovery = max(time.time() - t0, trains_past(run, step + 50))
    fresh = cluster.add_node(num_cpus=2)  # a new (spot) node joins, as the autoscaler would
    return {"step": step, "nodes_with_workers_before": len(before),
            "recovery_s": recovery}, fresh


def kill_driver(run: Run) -> dict[str, Any]:
    import ray

    from rtb_ray.run_dir import check_run_dir

    on_disk_before_kill = len(run.disk_ids())
    acknowledged = store_stats(run)["inserted"]  # by this session's store, so far
    os.killpg(run.driver.pid, signal.SIGKILL)
    run.driver.wait()
    run.driver = None  # not a driver that ended by itself
    ray.shutdown()  # the actors we looked up die with the driver
    t0 = time.time()
    wait_for("the run's lock to be released", lambda: _free(check_run_dir, run.path), run,
             timeout=120)
    on_disk_after_kill = len(run.disk_ids())
    mlflow_run = json.loads((run.path / "mlflow_run.json").read_text())["run_id"]
    import torch

    saved = torch.load(run.path / "checkpoint.pt", weights_only=True)["learner"]["step"]
    run.start(resume=True)
    wait_for("the resumed driver", lambda: (run.path / "runtime.json").exists()
             and run.info().get("driver_pid") == run.driver.pid, run, timeout=120)
    init_ray(run.address, run.info()["namespace"])
    recovery = trains_past(run, saved + 50)
    resumed = store_stats(run)
    same_mlflow = json.loads((run.path / "mlflow_run.json").read_text())["run_id"] == mlflow_run
    return {"checkpoint_step": saved, "recovery_s": time.time() - t0,
            "train_past_checkpoint_s": recovery, "same_mlflow_run": same_mlflow,
            "acknowledged_by_store": acknowledged, "on_disk_before_kill": on_disk_before_kill,
            "on_disk_after_kill": on_disk_after_kill,
            "reloaded_on_resume": resumed["loaded"], "recovered": same_mlflow}


def _free(check_run_dir: Callable, path: Path) -> bool:
    try:
        check_run_dir(path, True)
        return True
    except FileExistsError:  # the killed learner still holds the run's lock
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "faults.json")
    p.add_argument("--seed", type=int, default=0, help="which worker each kill picks")
    args = p.parse_args()
    prepare_ray(None)
    import ray
    from ray.cluster_utils import Cluster

    rng = random.Random(args.seed)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"rtb-faults-{os.getpid()}"
    work.mkdir(parents=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    second = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    run = Run(work / "run", cluster.address)
    events: list[dict[str, Any]] = []
    seen_on_disk: set[int] = set()
    t_start = time.time()
    try:
        run.start(resume=False)
        wait_for("the driver to start", lambda: (run.path / "runtime.json").exists(), run)
        init_ray(cluster.address, run.info()["namespace"])
        for at_step, kind in SCHEDULE:
            wait_for(f"step {at_step}", lambda: run.step() >= at_step, run, timeout=900)
            seen_on_disk |= run.disk_ids()
            t0 = time.time()
            try:
                if kind == "worker":
                    detail = kill_worker(run, rng)
                elif kind == "learner":
                    detail = kill_learner(run)
                elif kind == "store":
                    detail = kill_store(run)
                elif kind == "node":
                    detail, second = remove_node(run, cluster, second)
                else:
                    detail = kill_driver(run)
                recovered = detail.pop("recovered", True)
            except (TimeoutError, RuntimeError) as err:  # not recovered: say why, go on if we can
                detail, recovered = {"error": str(err)}, False
            events.append({"kind": kind, "at_step": at_step, "recovered": recovered,
                           "t_s": t0 - t_start, **detail})
            print(json.dumps(events[-1]), flush=True)
            if run.driver is None or run.driver.poll() is not None:
                break
        code = run.driver.wait(timeout=3600) if run.driver is not None else None
    finally:
        if run.driver is not None and run.driver.poll() is None:
            os.killpg(run.driver.pid, signal.SIGKILL)
        ray.shutdown()
        cluster.shutdown()

    final_ids = run.disk_ids()
    seen_on_disk |= final_ids
    status_file = run.path / "runtime_status.json"
    final_status = json.loads(status_file.read_text()) if status_file.exists() else {
        "replay": {"inserted": 0, "sealed_rows": -1}}  # the last driver was killed
    final = json.loads((run.path / "final_eval.json").read_text()) if code == 0 else {}
    bars = {name: bool(final) and ok(final) for name, ok in BARS.items()}
    kinds = sorted({e["kind"] for e in events})
    acknowledged = (sum(e.get("acknowledged_by_store", 0) + e.get("acknowledged_by_killed_store",
                                                                   0) for e in events)
                    + final_status["replay"]["inserted"])
    out = {
        "config": str(CONFIG.relative_to(ROOT)), "driver_exit_code": code,
        "wall_s": time.time() - t_start,
        "per_kind": {k: {"injected": sum(e["kind"] == k for e in events),
                         "recovered": sum(e["kind"] == k and e["recovered"] for e in events),
                         "max_recovery_s": max((e.get("recovery_s", 0) for e in events
                                                if e["kind"] == k), default=None)}
                     for k in kinds},
        "events": events,
        "final": {k: final.get(k) for k in ("step", "tv_analytic", "tv_target", "modes_hit",
                                            "forbidden_mass", "elbo_gap", "log_z_error")},
        "bars": bars,
        "rows": {"on_disk_at_end": len(final_ids), "ever_seen_on_disk": len(seen_on_disk),
                 "final_session_sealed_all": final_status["replay"]["sealed_rows"]
                 == final_status["replay"]["inserted"],
                 "unsealed_lost_at_kills": acknowledged - len(final_ids)},
        "summary": {"faults_injected": len(events),
                    "faults_recovered": sum(e["recovered"] for e in events),
                    "acknowledged_rows": acknowledged,
                    "rows_lost": len(seen_on_disk - final_ids),
                    "bars_met": all(bars.values())},
    }
    text = json.dumps(out, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
