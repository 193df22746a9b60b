"""The text-to-image domain's exact tier (pipelines/t2i_gauss.py): RTB on both runtimes against
the Tier A bars, and DDPO / DPOK / KL-RL on the same sampler.

    python benchmarks/t2i_gauss.py [--out benchmarks/results/t2i_gauss.json] [--only NAME]

Runs ``rtb-ray train pipelines/configs/t2i_gauss.yaml`` as a user would (a subprocess, one run
at a time, one torch thread per process) with the overrides below. Bars (issue #18, Tier A), for
every prompt, within 10 minutes: |log Z_φ − log Z_c| ≤ 0.05 above the fixed-start floor
(``log_z_error_max``: the error against the attainable log Z_c − floor_c), posterior mean error
≤ 0.1 × the prior-to-target shift, ELBO gap ≤ 0.05, covariance within 5 %. The baselines are
policy gradients on posterior samples only, in groups of 16 rows of one prompt (DDPO normalises
advantages per prompt): KL weight 0 (DDPO, reward alone), 0.1 (DPOK-like) and 1 (the
KL-regularised objective whose optimum is the posterior), at RTB's number of steps. Also reports
the bytes a publish ships (the posterior's own tensors: its ε correction, not the exact prior).
Prints and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pipelines" / "configs" / "t2i_gauss.yaml"
POLICY_GRADIENT = ["train.objective.kind=kl_rl", "train.sources={posterior: 1}",
                   "train.group_size=16", "train.explore.start=0.0"]
RUNS = {  # name: (runtime flags, overrides, wall-clock budget in seconds or None)
    "rtb_in_process": (["--in-process"], [], 600),
    "rtb_ray": ([], [], 600),
    "ddpo": (["--in-process"], [*POLICY_GRADIENT, "train.objective.kl_weight=0.0"], None),
    "dpok_kl0.1": (["--in-process"], [*POLICY_GRADIENT, "train.objective.kl_weight=0.1"], None),
    "kl_rl_kl1": (["--in-process"], POLICY_GRADIENT, None),
}
BARS = {"log_z_error_max": 0.05, "mean_error_ratio_max": 0.1, "elbo_gap_max": 0.05,
        "cov_rel_error_max": 0.05}
REPORTED = (*BARS, "log_z_floor", "log_z_error", "mean_error_ratio", "cov_rel_error", "elbo_gap",
            "eubo_gap_max", "ess_fraction_min", "mean_log_reward", "step", "num_samples",
            "train_s")


def publish_bytes() -> dict[str, int]:
    """Bytes of the posterior's own tensors (what a publish ships) and of its whole state."""
    import torch

    from rtb_ray.config import load_config
    from rtb_ray.learner import make_posterior
    from rtb_ray.networks import own_state
    from rtb_ray.tasks import make_task

    cfg = load_config(CONFIG)
    task = make_task(cfg.task)
    prior = task.prior()
    posterior = make_posterior(prior, cfg.train.adapter, task)
    size = lambda state: sum(v.numel() * v.element_size() for v in state.values())  # noqa: E731
    with torch.no_grad():
        return {"publish_bytes": size(own_state(posterior, prior)),
                "posterior_state_bytes": size(posterior.state_dict())}


def run(name: str, out_dir: Path) -> dict:
    flags, overrides, budget = RUNS[name]
    output = out_dir / name
    sets = [a for o in (*overrides, "torch_threads=1") for a in ("--set", o)]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rtb_ray.cli", "train", str(CONFIG), *flags,
                           "--no-progress", "--no-mlflow", "--output", str(output), *sets],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall_s = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"returncode": proc.returncode, "stderr": proc.stderr[-2000:]}
    final = json.loads((output / "final_eval.json").read_text())
    out = {"runtime": "in process" if flags else "ray", "overrides": overrides, "wall_s": wall_s,
           **{k: final[k] for k in REPORTED if k in final}}
    if budget is not None:
        met = {k: final[k] <= bar for k, bar in BARS.items()}
        met["wall_s<=budget"] = wall_s <= budget
        out.update(budget_s=budget, bars_met=met, all_met=all(met.values()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/t2i_gauss.json")
    parser.add_argument("--only", choices=sorted(RUNS), action="append")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name in args.only or RUNS:
            results[name] = run(name, Path(tmp))
            print(name, json.dumps(results[name], indent=1), flush=True)
    bars = [r.get("all_met", False) for r in results.values() if "budget_s" in r or "stderr" in r]
    summary = {"runs": results, "rtb_bars_met": bool(bars) and all(bars), **publish_bytes(),
               "cpus": len(os.sched_getaffinity(0))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"RTB bars met: {summary['rtb_bars_met']}  ->  {args.out}")


if __name__ == "__main__":
    main()
