"""Staleness against time to the bar on 25→9, in the Ray runtime (issue: performance, part 3).

    python benchmarks/staleness.py [--publish 1,5,20,50] [--half-lives none,128,512]
                                   [--seeds 0] [--steps 5000] [--out DIR] [--work DIR]

One prior is pretrained (or found) in WORK/cache; then ``rtb-ray train
pipelines/configs/gmm25.yaml`` runs on Ray once per setting, each stopped (Ctrl-C, a checkpoint)
at its first evaluation at the bar (mode TV ≤ 0.05, 9/9 modes, ≤ 2 % forbidden mass):

- ``runtime.publish_every_steps`` ∈ --publish, the store's recency weighting at the config's
  (``replay.recency_half_life`` 512);
- ``replay.recency_half_life`` ∈ --half-lives (``none``: uniform over the store), publishing
  at the config's (every 5 steps).

Per run: fine-tuning seconds to the bar (the run's own clock, evaluations included: ``wall_s``
of the first evaluation at the bar), learner steps to the bar, and the staleness its learner saw
(``train/staleness_*``: learner step minus the policy version of each trained trajectory,
averaged over the train rows up to the bar). Writes ``staleness.json`` (``staleness_NAME.json`` with --name) and its ``.png``
to DIR (default benchmarks/results/). Speeds are compared within this one run, on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import CONFIG, meets_bar, ours  # noqa: E402

STALENESS = ("staleness_mean", "staleness_p50", "staleness_p90", "staleness_p99")


def settings(publish: list[int], half_lives: list[int | None]) -> list[dict]:
    """The runs: publish intervals at the config's recency, then half-lives at the config's
    publish interval (the config's own pair once)."""
    runs = [{"publish_every_steps": p, "recency_half_life": 512} for p in publish]
    runs += [{"publish_every_steps": 5, "recency_half_life": h} for h in half_lives]
    unique: list[dict] = []
    for r in runs:
        if r not in unique:
            unique.append(r)
    return unique


def measure(setting: dict, work: Path, cache: Path, steps: int, seed: int) -> dict:
    half_life = setting["recency_half_life"]
    name = f"publish{setting['publish_every_steps']}_halflife{half_life}_seed{seed}"
    overrides = (f"runtime.publish_every_steps={setting['publish_every_steps']}",
                 f"replay.recency_half_life={'null' if half_life is None else half_life}",
                 f"train.steps={steps}", f"seed={seed}")
    result = ours(name, False, work, overrides=overrides, cache=cache, stop_at_bar=True)
    at_bar = next((p for p in result["curve"] if meets_bar(p)), None)
    rows = [json.loads(line) for line in
            (Path(result["run"]) / "metrics.jsonl").read_text().splitlines()]
    until = at_bar["step"] if at_bar else steps
    train = [r for r in rows if r["kind"] == "train" and r["step"] <= until and
             "staleness_mean" in r]
    return {**setting, "seed": seed, "name": name,
            "finetune_s_to_bar": at_bar["wall_s"] if at_bar else None,
            "steps_to_bar": at_bar["step"] if at_bar else None,
            "reached_bar": at_bar is not None,
            **{k: sum(r[k] for r in train) / len(train) if train else None for k in STALENESS},
            "staleness_max": max((r["staleness_max"] for r in train), default=None),
            "final": result["final"]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "publish_every_steps", "runtime.publish_every_steps"),
                           (axes[1], "recency_half_life", "replay.recency_half_life")):
        other = "recency_half_life" if key == "publish_every_steps" else "publish_every_steps"
        fixed = 512 if key == "publish_every_steps" else 5
        mine = [r for r in rows if r[other] == fixed and r["reached_bar"]]
        values = sorted({r[key] if r[key] is not None else 0 for r in mine})

        def mean(k: str, v: int) -> float:
            at = [r[k] for r in mine if (r[key] if r[key] is not None else 0) == v]
            return sum(at) / len(at)

        ax.plot([r[key] if r[key] is not None else 0 for r in mine],
                [r["finetune_s_to_bar"] for r in mine], ".", color="gray", label="one seed")
        ax.plot(values, [mean("finetune_s_to_bar", v) for v in values], "o-",
                label="mean over seeds")
        for v in values:
            ax.annotate(f"p50 {mean('staleness_p50', v):.0f} / p90 {mean('staleness_p90', v):.0f}",
                        (v, mean("finetune_s_to_bar", v)), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.legend(fontsize=7)
        ax.set(xlabel=label + (" (0: none, uniform)" if key == "recency_half_life" else ""),
               ylabel="fine-tuning seconds to the 25→9 bar", title=f"{label} (staleness quantiles)")
        if key == "publish_every_steps":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publish", default="1,5,20,50")
    parser.add_argument("--half-lives", default="none,128,2048")
    parser.add_argument("--seeds", default="0", help="seeds per setting, e.g. 0,1,2")
    parser.add_argument("--steps", type=int, default=5000, help="train.steps: the cap of a run")
    parser.add_argument("--name", help="write staleness_NAME.json (a partial sweep) instead")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_staleness")
    args = parser.parse_args()
    publish = [int(p) for p in args.publish.split(",")]
    half_lives = [None if h == "none" else int(h) for h in args.half_lives.split(",")]
    cache = args.work / "cache"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rtb_ray.cli", "pretrain", str(CONFIG)], check=True,
                   cwd=ROOT, env={**os.environ, "RTB_RAY_CACHE": str(cache)})
    rows = []
    for setting in settings(publish, half_lives):
        for seed in (int(x) for x in args.seeds.split(",")):
            rows.append(measure(setting, args.work, cache, args.steps, seed))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "final"}), flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpus": len(os.sched_getaffinity(0)),
                          "platform": platform.platform(), "torch": torch.__version__},
              "config": str(CONFIG.relative_to(ROOT)), "cap_steps": args.steps,
              "wall_s": time.perf_counter() - t0, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.out / ("staleness.json" if args.name is None else f"staleness_{args.name}.json")
    name.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, name.with_suffix(".png"))
    print(f"\n{'publish':>8} {'half-life':>9} {'seed':>4} {'s to bar':>9} {'steps':>6} {'p50':>5} "
          f"{'p90':>5}")
    for r in rows:
        s = "—" if r["finetune_s_to_bar"] is None else f"{r['finetune_s_to_bar']:.0f}"
        p50 = "—" if r["staleness_p50"] is None else f"{r['staleness_p50']:.0f}"
        p90 = "—" if r["staleness_p90"] is None else f"{r['staleness_p90']:.0f}"
        print(f"{r['publish_every_steps']:>8} {str(r['recency_half_life']):>9} {r['seed']:>4} {s:>9} "
              f"{str(r['steps_to_bar']):>6} {p50:>5} {p90:>5}")
    print(f"wrote {name} and {name.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
