"""Conditional posteriors against their closed forms: the Tier A runs of pipelines/gauss_cond.py.

    python benchmarks/gauss_cond.py [--out benchmarks/results/gauss_cond.json] [--only NAME]

Runs ``rtb-ray train`` as a user would (a subprocess, one run at a time) on each config below and
checks, for every one of the 8 conditions y, the bars of the conditional-core issue:
|log Z_φ(y) − log Z(y)| ≤ 0.05, |posterior mean error| ≤ 0.05·σ, std within 5 %, all within the
wall-clock budget (in process 5 min, on Ray 10 min, on this machine's cores). Prints and saves
JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "pipelines" / "configs"
RUNS = {  # name: (config, runtime flags, wall-clock budget in seconds)
    "rtb_table_in_process": ("gauss_cond.yaml", ["--in-process"], 300),
    "vargrad_groups16_in_process": ("gauss_cond_vargrad.yaml", ["--in-process"], 300),
    "rtb_mlp_float_cond_ray": ("gauss_cond_mlp.yaml", [], 600),
}
BARS = {"log_z_error_max": 0.05, "mean_error_max": 0.05, "std_rel_error_max": 0.05}


def run(name: str, out_dir: Path) -> dict:
    config, flags, budget = RUNS[name]
    output = out_dir / name
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rtb_ray.cli", "train", str(CONFIGS / config),
                           *flags, "--no-progress", "--no-mlflow", "--output", str(output)],
                          cwd=ROOT, capture_output=True, text=True)
    wall_s = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"config": config, "returncode": proc.returncode, "stderr": proc.stderr[-2000:]}
    final = json.loads((output / "final_eval.json").read_text())
    figures = {k: final[k] for k in (*BARS, "log_z_error", "mean_error", "std_rel_error",
                                     "elbo_gap", "elbo_gap_max", "eubo_gap_max",
                                     "ess_fraction_min", "step", "num_samples", "train_s")}
    met = {k: final[k] <= bar for k, bar in BARS.items()}
    met["wall_s<=budget"] = wall_s <= budget
    return {"config": config, "runtime": "in process" if flags else "ray", "wall_s": wall_s,
            "budget_s": budget, **figures, "bars_met": met, "all_met": all(met.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gauss_cond.json")
    parser.add_argument("--only", choices=sorted(RUNS), action="append")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name in args.only or RUNS:
            results[name] = run(name, Path(tmp))
            print(name, json.dumps(results[name], indent=1), flush=True)
    summary = {"runs": results, "all_met": all(r.get("all_met", False) for r in results.values()),
               "cpus": len(__import__("os").sched_getaffinity(0))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"all bars met: {summary['all_met']}  ->  {args.out}")


if __name__ == "__main__":
    main()
