"""When did a 25→9 run first meet each quality bar? Reads a run directory, prints and saves JSON.

    python benchmarks/gmm25_bars.py runs/gmm25 [--out benchmarks/results/gmm25_bars.json]

The bars are the foundation issue's: mode-weight TV ≤ 0.05 against the analytic target and
against the learned-prior target, 9/9 modes, ≤ 2 % forbidden mass, ELBO gap ≤ 0.1 and
|log Z − log Z_θ| ≤ 0.05. ``wall_s`` counts fine-tuning time including evaluation; ``train_s``
excludes evaluation. The prior's own figures come from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

BARS = {
    "tv_analytic<=0.05": lambda m: m["tv_analytic"] <= 0.05,
    "tv_target<=0.05": lambda m: m["tv_target"] <= 0.05,
    "modes_hit==9": lambda m: m["modes_hit"] == 9,
    "forbidden_mass<=0.02": lambda m: m["forbidden_mass"] <= 0.02,
    "elbo_gap<=0.1": lambda m: m["elbo_gap"] <= 0.1,
    "abs_log_z_error<=0.05": lambda m: abs(m["log_z_error"]) <= 0.05,
}


def summarise(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    first = {}
    for name, ok in BARS.items():
        hit = next((r for r in evals if ok(r)), None)
        first[name] = None if hit is None else {k: hit[k] for k in ("step", "wall_s", "train_s")}
    all_met = next((r for r in evals if all(ok(r) for ok in BARS.values())), None)
    final = json.loads((run_dir / "final_eval.json").read_text())
    return {
        "run": str(run_dir),
        "first_met": first,
        "all_bars_first_met": None if all_met is None
        else {k: all_met[k] for k in ("step", "wall_s", "train_s")},
        "final": {k: final[k] for k in ("step", "wall_s", "num_samples", "tv_analytic",
                                        "tv_target", "modes_hit", "forbidden_mass", "elbo_gap",
                                        "eubo_gap", "log_z", "log_z_error", "mean_log_reward",
                                        "ess_fraction", "sliced_w2_analytic", "sliced_w2_floor")},
        "final_meets_all": all(ok(final) for ok in BARS.values()),
    }


def prior_figures(run_dir: Path) -> dict:
    from rtb_ray.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    stats = torch.load(cfg.task.prior_path(), weights_only=True)["stats"]
    return {k: stats[k] for k in ("pretrain_seconds", "num_samples", "prior_tv_uniform",
                                  "log_z_theta", "target_tv_analytic")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    out = summarise(args.run_dir)
    out["prior"] = prior_figures(args.run_dir)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
