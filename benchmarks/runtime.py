"""The Ray runtime against its parts done in one process, and its memory over a long run.

    python benchmarks/runtime.py [--minutes 10] [--quick] [--out DIR]

Measured in this run, on this machine, with the gmm25 network (T = 100, hidden 128):

- rollout: trajectories/s of 1 and 2 RolloutWorkers (posterior role, 128 per call, 2 calls in
  flight, 1 CPU and 1 torch thread each, inserting into the replay store's actor) against the
  in-process ``Sampler.rollout`` on 1 thread (the same work without Ray or the store).
- weights: publish-to-applied latency (learner-side ``ray.put`` + ``WeightStore.publish``, then a
  worker's ``pull_weights`` applying it) against one ``ray.put`` + ``ray.get`` in an actor.
- MLflow: the time one train row's ``log_metrics`` costs the loop (it only enqueues) as a share
  of the learner time between two rows (``train.log_every_steps`` steps).
- memory: ``rtb-ray train pipelines/configs/gmm25.yaml`` run for ``--minutes`` (train.steps
  large, no evaluations); every 15 s the RSS of the driver and of each actor process and the
  object store's use; growth per hour by a least-squares line over the second half.

Prints and saves ``runtime.json`` (``runtime_quick.json`` with --quick) in DIR
(default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.session import init_ray, prepare_ray  # noqa: E402

prepare_ray(None)  # before anything imports Ray
from rtb_ray.config import load_config  # noqa: E402
from rtb_ray.learner import Learner  # noqa: E402
from rtb_ray.rollout import Sampler  # noqa: E402
from rtb_ray.tasks import make_task  # noqa: E402
from rtb_ray.trajectory import Source  # noqa: E402

CONFIG = ROOT / "pipelines" / "configs" / "gmm25.yaml"
ROLLOUT_N = 128


def timed(fn, seconds: float) -> tuple[int, float]:
    """Call fn until ``seconds`` have passed; (calls, seconds)."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    return calls, time.perf_counter() - t0


def in_process_parts(cfg, seconds: float) -> dict:
    torch.set_num_threads(1)
    task = make_task(cfg.task)
    prior = task.prior()
    learner = Learner(task.family, prior, cfg.train)
    sampler = Sampler(task, learner.prior, learner.posterior)
    gen = torch.Generator().manual_seed(0)
    calls, dt = timed(lambda: sampler.rollout(Source.POSTERIOR, ROLLOUT_N, explore=0.05,
                                              generator=gen), seconds)
    rollout = {"trajectories_per_s": calls * ROLLOUT_N / dt, "torch_threads": 1,
               "ms_per_call": 1e3 * dt / calls}

    out = {"rollout_in_process": rollout}
    batch = sampler.rollout(Source.POSTERIOR, cfg.train.batch_size, generator=gen)
    steps, step_s = timed(lambda: learner.step(batch), seconds)  # the MLflow share's denominator

    from rtb_ray.tracking import MlflowTracker

    with tempfile.TemporaryDirectory() as tmp:
        tracker = MlflowTracker(f"sqlite:///{tmp}/mlflow.db", "bench", run_name="bench")
        row = {f"train/k{i}": float(i) for i in range(25)}  # a train row has ~25 columns
        n, log_s = timed(lambda: tracker.log_metrics(row, step=1), min(seconds, 3.0))
        tracker.close()
    per_row_ms = 1e3 * log_s / n
    step_ms = 1e3 * step_s / steps
    out["mlflow"] = {"log_metrics_ms_per_row": per_row_ms,
                     "log_every_steps": cfg.train.log_every_steps,
                     "learner_ms_per_step": step_ms,
                     "share_of_learner_time": per_row_ms / (cfg.train.log_every_steps * step_ms)}
    return out


def ray_parts(cfg, seconds: float) -> dict:
    import ray

    from actors.replay import start_store
    from actors.rollout import RolloutWorker
    from actors.weights import WeightStore

    # no rate limit: nothing samples the store here
    unlimited = cfg.replay.model_copy(update={"capacity": 200_000, "samples_per_insert": None})
    ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
             log_to_driver=False, logging_level="ERROR")
    out: dict = {"rollout_workers": []}
    try:
        store = start_store(cfg.model_copy(update={"replay": unlimited}), None, "bench")
        weights = WeightStore.remote()
        for n_workers in (1, 2):
            workers = [RolloutWorker.options(num_cpus=1).remote(cfg, "posterior", f"w{i}",
                                                                store, weights, seed=i)
                       for i in range(n_workers)]
            ray.get([w.step.remote(ROLLOUT_N) for w in workers])  # started and warm
            inflight = {w.step.remote(ROLLOUT_N): w for w in workers for _ in range(2)}
            done, calls, t0 = 0, [], time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                w = inflight.pop(ready[0])
                calls.append(ray.get(ready[0]))
                done += calls[-1]["inserted"]
                inflight[w.step.remote(ROLLOUT_N)] = w
            dt = time.perf_counter() - t0
            ray.get(list(inflight))
            # where a call's time goes: sampling (in the worker) and waiting for the store
            out["rollout_workers"].append({
                "workers": n_workers, "trajectories_per_s": done / dt,
                "sample_ms_per_call": 1e3 * float(np.mean([c["sample_s"] for c in calls])),
                "insert_ms_per_call": 1e3 * float(np.mean([c["insert_s"] for c in calls]))})
            for w in workers:
                ray.kill(w)

        # weight publish → applied by a worker, against one put + get
        worker = RolloutWorker.options(num_cpus=1).remote(cfg, "prior", "w", store, weights,
                                                          seed=9)
        state = {k: v.clone() for k, v in make_task(cfg.task).prior().state_dict().items()}
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        publish, baseline = [], []
        for version in range(1, 41):
            t0 = time.perf_counter()
            ray.get(weights.publish.remote(version, [ray.put(state)]))
            assert ray.get(worker.pull_weights.remote()) == version
            publish.append(time.perf_counter() - t0)
        holder = WeightStore.remote()
        for version in range(1, 41):
            t0 = time.perf_counter()
            ref = ray.put(state)
            ray.get(holder.publish.remote(version, [ref]))
            ray.get(ray.get(holder.latest.remote())[1][0])
            baseline.append(time.perf_counter() - t0)
        out["weights"] = {"state_dict_bytes": nbytes,
                          "publish_to_applied_ms_p50": 1e3 * float(np.median(publish)),
                          "put_get_ms_p50": 1e3 * float(np.median(baseline))}
        out["weights"]["ratio"] = (out["weights"]["publish_to_applied_ms_p50"]
                                   / out["weights"]["put_get_ms_p50"])
    finally:
        ray.shutdown()
    return out


def plasma_mb(address: str) -> float | None:
    """Object store memory in use, from Ray's memory summary (None if not reported)."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB", text)
    return float(m.group(1)) if m else None


def memory_run(minutes: float, out_dir: Path) -> dict:
    import ray

    run = Path(tempfile.mkdtemp(prefix="rtb-runtime-bench-")) / "run"
    args = [sys.executable, "-m", "rtb_ray.cli", "train", str(CONFIG), "--no-progress",
            "--output", str(run), "--set", "train.steps=1000000",
            "--set", "eval.every_steps=1000000", "--set", "checkpoint_every_steps=2000"]
    driver = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "runtime.json").exists():
        if time.time() > deadline or driver.poll() is not None:
            raise RuntimeError("the run did not start")
        time.sleep(1)
    info = json.loads((run / "runtime.json").read_text())
    init_ray(info["address"], info["namespace"])
    samples = []
    t_start = time.time()
    try:
        while time.time() - t_start < minutes * 60:
            time.sleep(15)
            rss: dict[str, float] = {"driver": psutil.Process(driver.pid).memory_info().rss}
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                m = re.match(r"ray::(\w+)", cmd)
                if m and m.group(1) in ("RolloutWorker", "LearnerActor", "ReplayStore",
                                        "WeightStore", "Coordinator"):
                    rss[m.group(1)] = rss.get(m.group(1), 0) + p.info["memory_info"].rss
            metrics = run / "metrics.jsonl"
            rows = [json.loads(line) for line in metrics.read_text().splitlines()
                    if '"train"' in line] if metrics.exists() else []
            samples.append({"t_s": time.time() - t_start,
                            "step": rows[-1]["step"] if rows else 0,
                            "rss_mb": {k: v / 2**20 for k, v in rss.items()},
                            "object_store_mb": plasma_mb(info["address"])})
            print(f"memory {samples[-1]}", flush=True)
    finally:
        ray.shutdown()
        driver.send_signal(signal.SIGTERM)  # checkpoints and stops, like Ctrl-C
        driver.wait(timeout=300)
    second_half = samples[len(samples) // 2:]
    t = np.array([s["t_s"] for s in second_half]) / 3600

    def growth(values: list[float]) -> float:
        return float(np.polyfit(t, np.array(values), 1)[0]) if len(t) > 1 else 0.0

    keys = sorted({k for s in samples for k in s["rss_mb"]})
    growth_mb_per_h = {k: growth([s["rss_mb"].get(k, 0.0) for s in second_half]) for k in keys}
    if all(s["object_store_mb"] is not None for s in second_half):
        growth_mb_per_h["object_store"] = growth([s["object_store_mb"] for s in second_half])
    steps = [s["step"] for s in samples]
    return {"minutes": minutes, "samples": samples, "growth_mb_per_hour": growth_mb_per_h,
            "learner_steps_per_s": (steps[-1] - steps[0]) / (samples[-1]["t_s"]
                                                              - samples[0]["t_s"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0,
                   help="length of the memory run (0: none)")
    p.add_argument("--quick", action="store_true", help="short timings, a 2-minute memory run")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    minutes = min(2.0, args.minutes) if args.quick else args.minutes
    seconds = 4.0 if args.quick else 15.0
    cfg = load_config(CONFIG)
    result = {"mode": "quick" if args.quick else "full",
              "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                          "torch": torch.__version__}}
    result.update(in_process_parts(cfg, seconds))
    print(json.dumps(result, indent=1), flush=True)
    result.update(ray_parts(cfg, seconds))
    one = result["rollout_workers"][0]["trajectories_per_s"]
    result["rollout_one_worker_vs_in_process"] = one / result["rollout_in_process"][
        "trajectories_per_s"]
    print(json.dumps({k: result[k] for k in ("rollout_workers", "weights",
                                             "rollout_one_worker_vs_in_process")}, indent=1),
          flush=True)
    if minutes > 0:
        result["memory"] = memory_run(minutes, args.out)
        print(json.dumps({k: v for k, v in result["memory"].items() if k != "samples"}, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("runtime_quick.json" if args.quick else "runtime.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
