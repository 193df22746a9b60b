"""Learner steps/s with log Z(y) as a table or an MLP, against one scalar log Z.

    python benchmarks/log_z.py [--batch 256] [--seconds 2] [--rounds 11] [--threads 1] [--out FILE]

On pipelines/gauss_cond.py's network and a fixed batch of its trajectories (T = 50), in one run
on one machine: ``Learner.step`` (RTB) with ``train.log_z.kind`` scalar, table and mlp,
interleaved over ``rounds`` (in alternating order) so that drift in the machine's speed hits
each alike; the median of each. One torch thread by default: on this 2-core VM two threads
made single measurements vary by ±20 %. A table needs ``cond`` ids, an MLP float values: each is compared with a scalar on the
same network and batch. The bar: ≤ 5 % slower than the scalar, by the ratio of medians and
by the median of each round's ratio. Prints and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.gauss_cond import Config, GaussCondTask  # noqa: E402
from rtb_ray.config import LogZConfig, TrainConfig  # noqa: E402
from rtb_ray.learner import Learner  # noqa: E402
from rtb_ray.rollout import Sampler  # noqa: E402
from rtb_ray.trajectory import Source  # noqa: E402

LOG_Z = {"table": LogZConfig(kind="table", num_conditions=8), "mlp": LogZConfig(kind="mlp")}


def steps_per_s(learner: Learner, batch, seconds: float) -> float:
    for _ in range(3):  # warm-up
        learner.step(batch)
    calls, t0 = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - t0 < seconds:
        learner.step(batch)
        calls += 1
    return calls / (time.perf_counter() - t0)


def compare(kind: str, batch_size: int, seconds: float, rounds: int) -> dict:
    task = GaussCondTask(Config(cond="ids" if kind == "table" else "values"))
    conditions = task.eval_conditions()
    learners = {name: Learner(task.family, task.prior(), TrainConfig(log_z=log_z),
                              eval_conditions=conditions)
                for name, log_z in (("scalar", LogZConfig()), (kind, LOG_Z[kind]))}
    sampler = Sampler(task, task.prior(), task.prior())
    batch = sampler.rollout(Source.PRIOR, batch_size, generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {name: [] for name in learners}
    for i in range(rounds):
        for name, learner in (list if i % 2 == 0 else reversed)(list(learners.items())):
            rates[name].append(steps_per_s(learner, batch, seconds))
    scalar, other = statistics.median(rates["scalar"]), statistics.median(rates[kind])
    # each round's two measurements are adjacent in time: their ratio cancels slow drift
    paired = statistics.median(o / s for o, s in zip(rates[kind], rates["scalar"]))
    return {"log_z": kind, "cond": "ids" if kind == "table" else "values",
            "scalar_steps_per_s": scalar, f"{kind}_steps_per_s": other,
            "slowdown": 1 - other / scalar, "slowdown_paired": 1 - paired, "rounds": rates,
            "bar_met": max(1 - other / scalar, 1 - paired) <= 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/log_z.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    results = [compare(kind, args.batch, args.seconds, args.rounds) for kind in LOG_Z]
    out = {"machine": {"cpus": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
                       "python": platform.python_version(), "torch": torch.__version__},
           "batch": args.batch, "num_steps": 50, "results": results,
           "all_met": all(r["bar_met"] for r in results)}
    for r in results:
        print(f"{r['log_z']:>5}: {r[r['log_z'] + '_steps_per_s']:.1f} steps/s vs scalar "
              f"{r['scalar_steps_per_s']:.1f}  (slowdown {100 * r['slowdown']:+.1f} %, paired "
              f"{100 * r['slowdown_paired']:+.1f} %)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"all bars met: {out['all_met']}  ->  {args.out}")


if __name__ == "__main__":
    main()
