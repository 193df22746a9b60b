"""The control domain's exact tier (pipelines/bandit_gmm.py) against its acceptance bars.

    python benchmarks/bandit_gmm.py [--out benchmarks/results/bandit_gmm.json] [--only NAME]

Runs ``rtb-ray train`` as a user would (a subprocess, one run at a time, from this tree) on each
config below, each with its own empty prior cache, so that every wall time includes pretraining
the prior (behaviour cloning and the stored target samples) as on a clean clone. Checks, as means
over the 16 evaluation states, the bars of issue #17 (Tier A): mode-weight TV to the
learned-prior target ≤ 0.05, |E_π[Q] − E_target[Q]| ≤ 0.1·|E_μ[Q] − E_target[Q]|
(``q_gap_ratio``), |log Z_φ(s) − log Z_θ(s)| ≤ 0.1, all within 10 minutes; reports beside them
the TV to the analytic π*, the prior's own error (its target's TV to π*) and the floors: what a
sampler of the target itself scores at the final sample size (``floors``). One torch thread
per process (the pretraining driver included: ``OMP_NUM_THREADS=1``); the learner on Ray takes
its one CPU. Prints and saves JSON.
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
CONFIGS = ROOT / "pipelines" / "configs"
RUNS = {  # name: (config, runtime flags, wall-clock budget in seconds, the prior included)
    "vargrad_groups64_in_process": ("bandit_gmm.yaml", ["--in-process"], 600),
    "rtb_mlp_ray": ("bandit_gmm_ray.yaml", [], 600),
}
BARS = {"tv_target": 0.05, "q_gap_ratio": 0.1, "log_z_abs_error": 0.1}
REPORTED = ("log_z_error_max", "log_z_error", "tv_target_max", "q_gap_ratio_max", "tv_analytic",
            "target_tv_analytic", "prior_tv_behaviour", "tv_floor", "log_z_theta_vs_exact",
            "elbo_gap", "elbo_gap_max", "eubo_gap_max", "ess_fraction_min", "step",
            "num_samples", "train_s")


def prior_seconds(cache: Path) -> float | None:
    """Pretraining and target-sampling seconds, from the prior checkpoint the run cached."""
    import torch

    files = list((cache / "bandit_gmm").glob("prior-*.pt"))
    if len(files) != 1:
        return None
    stats = torch.load(files[0], map_location="cpu", weights_only=True)["stats"]
    return float(stats["pretrain_seconds"] + stats["stats_seconds"])


def floors(cache: Path, per_state: int = 2000, seed: int = 100) -> dict[str, float]:
    """What a sampler of the learned-prior target itself scores at the final evaluation's size:
    fresh prior samples (16 384 per state, as stored) resampled by e^{βQ}, ``per_state`` per
    evaluation state; and the standard error of the stored log Z_θ(s) (delta method)."""
    import torch

    from rtb_ray.config import load_config
    from rtb_ray.tasks import make_task

    os.environ["RTB_RAY_CACHE"] = str(cache)
    torch.set_num_threads(1)
    cfg = load_config(CONFIGS / RUNS["vargrad_groups64_in_process"][0])
    task = make_task(cfg.task)
    prior = task.prior()
    beta = cfg.train.objective.beta
    states = task.eval_conditions()
    pool = cfg.task.pretrain.stats_samples
    task.reference_log_z(beta, states)  # the β evaluate scores at
    gen = torch.Generator().manual_seed(seed)
    picks, log_z_se = [], []
    for s in states:
        x = task.family.sample(prior, pool, cond=s.expand(pool, -1), generator=gen)[0][:, -1]
        w = (beta * task.bandit.q(s.expand(pool, -1), x)).softmax(0)
        log_z_se.append((w.std() / w.mean()).item() / pool**0.5)
        picks.append(x[torch.multinomial(w, per_state, replacement=True, generator=gen)])
    m = task.evaluate(torch.cat(picks), states.repeat_interleave(per_state, 0))
    return {"tv_target": m["tv_target"], "q_gap_ratio": m["q_gap_ratio"],
            "tv_analytic": m["tv_analytic"], "tv_floor_exact": m["tv_floor"],
            "log_z_theta_standard_error": sum(log_z_se) / len(log_z_se)}


def run(name: str, out_dir: Path) -> dict:
    config, flags, budget = RUNS[name]
    output, cache = out_dir / name, out_dir / f"cache-{name}"
    env = {**os.environ, "RTB_RAY_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rtb_ray.cli", "train", str(CONFIGS / config),
                           *flags, "--no-progress", "--no-mlflow", "--output", str(output),
                           "--set", "torch_threads=1"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    wall_s = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"config": config, "returncode": proc.returncode, "stderr": proc.stderr[-2000:]}
    final = json.loads((output / "final_eval.json").read_text())
    figures = {k: final[k] for k in (*BARS, *REPORTED) if k in final}
    met = {k: final[k] <= bar for k, bar in BARS.items()}
    met["wall_s<=budget"] = wall_s <= budget
    return {"config": config, "runtime": "in process" if flags else "ray", "wall_s": wall_s,
            "prior_s": prior_seconds(cache), "budget_s": budget, **figures, "bars_met": met,
            "all_met": all(met.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bandit_gmm.json")
    parser.add_argument("--only", choices=sorted(RUNS), action="append")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name in args.only or RUNS:
            results[name] = run(name, Path(tmp))
            print(name, json.dumps(results[name], indent=1), flush=True)
        # both configs have one task: either run's cached prior will do
        caches = [Path(tmp) / f"cache-{n}" for n in results]
        cache = next((c for c in caches if list(c.glob("bandit_gmm/prior-*.pt"))), None)
        noise = floors(cache) if cache is not None else None
        print("floors", json.dumps(noise, indent=1), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    summary = {"runs": results, "all_met": all(r.get("all_met", False) for r in results.values()),
               "bars": BARS, "floors": noise, "cpus": len(os.sched_getaffinity(0)),
               "commit": commit, "load_average_after": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"all bars met: {summary['all_met']}  ->  {args.out}")


if __name__ == "__main__":
    main()
