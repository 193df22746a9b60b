"""rtb-ray against its peer and against the machine's limits: one command, one run, one machine.

    python benchmarks/run.py [--quick] [--only replay,learner,runtime,e2e,staleness]
                             [--peer cached|run|skip]
                             [--out DIR]

Parts (each also runs on its own; see its script):

- replay  — benchmarks/replay.py: insert+sample against memcpy, sample latency against numpy.
- learner — benchmarks/learner.py: the learner step against the bare forward+backward of its
            rows and against per-step recompute (1 and 2 threads).
- runtime — benchmarks/runtime.py without its memory run: 1 and 2 rollout workers against the
            in-process sampler, weight broadcast against put+get, MLflow logging overhead.
- staleness — benchmarks/staleness.py: time to the 25→9 bar against the publish interval and
            the store's recency weighting, with the staleness quantiles each run reached.
- e2e     — quality against wall time on 25→9 for (a) the in-process trainer and (b) the Ray
            runtime, each `rtb-ray train pipelines/configs/gmm25.yaml` (the README's main job)
            from an empty prior cache, so prior pretraining is in the clock; and (c) the peer,
            torchgfn 2.4.1's RTB with its example's defaults (benchmarks/peer_torchgfn.py), in
            its own virtual environment (benchmarks/.peer-venv, made on first use). Every
            system's samples are scored by pipelines.gmm25.analytic_metrics (mode TV against
            the analytic p9, modes hit, forbidden mass) and E[log r], on 10 000 samples. Our
            times run from the process start to when an evaluation's row is written (Ray
            start-up, prior, evaluations included); the peer's exclude its start-up and its
            evaluations. The peer's run is long (about an hour here): ``--peer cached`` (the
            default) reuses benchmarks/results/peer_torchgfn_curve.json when it exists.

The bar is the issue's absolute bar: mode TV ≤ 0.05, 9/9 modes, ≤ 2 % forbidden mass.
``end_to_end.ratio_vs_peer`` = the Ray runtime's time to the bar (prior included) / the peer's
total time with its defaults (prior included). Writes ``bench.json`` (``bench_quick.json``),
``bench.md`` and ``bench_e2e.png`` to DIR (default benchmarks/results/); --quick runs the parts
at small sizes and skips e2e.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEER_VENV = ROOT / "benchmarks" / ".peer-venv"
PEER_CURVE = "peer_torchgfn_curve.json"
CONFIG = ROOT / "pipelines" / "configs" / "gmm25.yaml"
BAR = {"tv_analytic": 0.05, "modes_hit": 9, "forbidden_mass": 0.02}
STALENESS_KEYS = ("publish_every_steps", "recency_half_life", "seed", "finetune_s_to_bar",
                  "steps_to_bar", "staleness_p50", "staleness_p90", "staleness_p99")
PARTS = ("replay", "learner", "runtime", "e2e", "staleness")


def meets_bar(m: dict) -> bool:
    return (m["tv_analytic"] <= BAR["tv_analytic"] and m["modes_hit"] >= BAR["modes_hit"]
            and m["forbidden_mass"] <= BAR["forbidden_mass"])


def first_at_bar(curve: list[dict]) -> float | None:
    return next((p["t_s"] for p in curve if meets_bar(p)), None)


def script(name: str, *args: str) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / name), *args]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


# -- the peer --------------------------------------------------------------------------------
def peer_python() -> Path:
    """The peer's interpreter, its virtual environment made on first use. torch is pinned by
    .ci/constraints.txt like ours (here the CPU wheel on disk); torchgfn 2.4.1 pins numpy < 2."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"making the peer's virtual environment in {PEER_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c",
                        str(ROOT / ".ci" / "constraints.txt"), "torchgfn==2.4.1", "matplotlib"],
                       check=True)
    return python


def score_peer(npz_path: Path) -> dict:
    import numpy as np
    import torch

    from pipelines.gmm25 import analytic_metrics, log_reward

    data = np.load(npz_path)
    meta = json.loads(bytes(data["meta"]).decode())
    curve = []
    for row in meta["rows"]:
        x = torch.from_numpy(data[f"x_{row['iteration']}"])
        curve.append({"t_s": meta["prior_s"] + row["finetune_s"], "step": row["iteration"],
                      **analytic_metrics(x), "mean_log_reward": log_reward(x).mean().item(),
                      "num_samples": int(x.shape[0])})
    return {"system": "torchgfn 2.4.1 RTB (peer)", "prior_s": meta["prior_s"],
            "finetune_s": meta["finetune_s"], "total_s": meta["prior_s"] + meta["finetune_s"],
            "settings": {k: meta[k] for k in ("pretrain_steps", "iterations", "eval_n", "torch",
                                             "torch_threads")},
            "curve": curve}


def peer(mode: str, out: Path, work: Path, npz: Path | None = None) -> dict | None:
    """The peer's scored curve: from ``npz`` (a finished peer_torchgfn.py run) if given, else
    the cached one (mode "cached", when there is one), else from a new run (about an hour)."""
    cached = ROOT / "benchmarks" / "results" / PEER_CURVE
    if mode == "skip":
        return None
    if npz is None and mode == "cached" and cached.exists():
        print(f"peer: the curve cached in {cached}")
        return json.loads(cached.read_text())
    if npz is None:
        work = work / "peer"
        shutil.rmtree(work, ignore_errors=True)
        cmd = [str(peer_python()), str(ROOT / "benchmarks" / "peer_torchgfn.py"), "--out",
               str(work)]
        print(f"\n$ {' '.join(cmd)}   (about an hour on 2 cores)", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        npz = work / "peer_curve.npz"
    scored = score_peer(npz)
    (out / PEER_CURVE).write_text(json.dumps(scored, indent=2) + "\n")
    return scored


# -- ours ------------------------------------------------------------------------------------
def ours(name: str, in_process: bool, work: Path, *, overrides: tuple[str, ...] = (),
         cache: Path | None = None, stop_at_bar: bool = False) -> dict:
    """`rtb-ray train` of the main job (with ``--set`` ``overrides``) from an empty prior cache,
    or from ``cache``; every evaluation row is stamped with the time since the process started.
    ``stop_at_bar``: Ctrl-C at the first evaluation at the bar (no final evaluation then)."""
    run = work / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    cache = cache or run / "cache"
    cmd = [sys.executable, "-m", "rtb_ray.cli", "train", str(CONFIG), "--output", str(run / "run"),
           "--no-progress", *(["--in-process"] if in_process else []),
           *(a for o in overrides for a in ("--set", o))]
    env = {**os.environ, "RTB_RAY_CACHE": str(cache)}
    print(f"\n$ RTB_RAY_CACHE={cache} {' '.join(cmd[1:])}", flush=True)
    metrics = run / "run" / "metrics.jsonl"
    curve, seen, stopped = [], 0, False
    t0 = time.perf_counter()
    with open(run / "stdout.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:
            done = proc.poll() is not None
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            now = time.perf_counter() - t0
            for line in lines[seen:]:
                row = json.loads(line)
                if row.get("kind") == "eval":
                    curve.append({"t_s": now, "step": row["step"], "wall_s": row["wall_s"],
                                  **{k: row[k] for k in ("tv_analytic", "modes_hit",
                                                         "forbidden_mass", "mean_log_reward",
                                                         "num_samples")}})
                    print(f"  {name} {now:7.1f} s step {row['step']:>5}: TV {row['tv_analytic']:.3f}"
                          f" modes {row['modes_hit']:.0f} forbidden {row['forbidden_mass']:.4f} "
                          f"E[log r] {row['mean_log_reward']:.3f}", flush=True)
                    if stop_at_bar and meets_bar(row) and not done:
                        proc.send_signal(signal.SIGINT)  # checkpoints, exits 130
                        stopped = True
            seen = len(lines)
            if done:
                break
            time.sleep(0.5)
    total_s = time.perf_counter() - t0
    if proc.returncode != (130 if stopped else 0):
        raise RuntimeError(f"{name}: rtb-ray train exited {proc.returncode}; see {run}/stdout.log")
    import torch

    prior_ckpt = next(cache.rglob("prior-*.pt"))
    prior_s = torch.load(prior_ckpt, weights_only=True)["stats"]["pretrain_seconds"]
    final_path = run / "run" / "final_eval.json"
    final = json.loads(final_path.read_text()) if final_path.exists() else curve[-1]
    keys = ("step", "num_samples", "tv_analytic", "tv_target", "modes_hit", "forbidden_mass",
            "elbo_gap", "eubo_gap", "log_z_error", "mean_log_reward", "ess_fraction")
    return {"system": "rtb-ray " + ("in-process trainer" if in_process else "Ray runtime"),
            "prior_s": prior_s, "total_s": total_s, "curve": curve,
            "final": {k: final[k] for k in keys if k in final}, "run": str(run / "run")}


# -- report ----------------------------------------------------------------------------------
def plot(systems: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tv, ax_r) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in systems:
        t = [p["t_s"] / 60 for p in s["curve"]]
        line, = ax_tv.plot(t, [max(p["tv_analytic"], 1e-3) for p in s["curve"]], "o-", ms=3,
                           label=s["system"])
        tuned = [p for p in s["curve"] if p["step"] > 0]  # the prior's point is far below
        ax_r.plot([p["t_s"] / 60 for p in tuned], [p["mean_log_reward"] for p in tuned], "o-",
                  ms=3, color=line.get_color(), label=s["system"])
        for ax in (ax_tv, ax_r):
            ax.axvline(s["prior_s"] / 60, color=line.get_color(), ls=":", lw=1)
    ax_tv.axhline(BAR["tv_analytic"], color="k", ls="--", lw=1, label="bar: TV 0.05")
    ax_tv.set(yscale="log", xlabel="wall time, prior included (min)",
              ylabel="mode TV to the analytic posterior", title="25→9: quality against time")
    ax_r.axhline(1.1563, color="k", ls="--", lw=1, label="exact posterior: 1.156")
    ax_r.set(xlabel="wall time, prior included (min)", ylabel="E[log r]",
             ylim=(0.9, 1.3), title="E[log r] after fine-tuning began (dotted: prior done)")
    for ax in (ax_tv, ax_r):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def minutes(s: float | None) -> str:
    return "not reached" if s is None else f"{s / 60:.1f} min"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# rtb-ray benchmarks ({result['mode']})", "",
             f"Machine: {m['cpus']} CPU cores, {m['platform']}, torch {m['torch']}; "
             f"{result['date']}.", ""]
    e2e = result.get("end_to_end")
    if e2e:
        lines += ["## 25→9 end to end (prior pretraining included)", "",
                  "| system | prior | to the bar | total | final TV | modes | forbidden | "
                  "E[log r] |", "|---|---|---|---|---|---|---|---|"]
        for s in e2e["systems"]:
            last = s["curve"][-1]
            lines.append(f"| {s['system']} | {minutes(s['prior_s'])} | "
                         f"{minutes(first_at_bar(s['curve']))} | {minutes(s['total_s'])} | "
                         f"{last['tv_analytic']:.3f} | {last['modes_hit']:.0f}/9 | "
                         f"{100 * last['forbidden_mass']:.2f} % | "
                         f"{last['mean_log_reward']:.3f} |")
        lines += ["", "The bar: mode TV ≤ 0.05 against the analytic posterior, 9/9 modes, ≤ 2 % "
                  "forbidden mass; E[log r] of the exact posterior 1.156. "
                  f"ratio_vs_peer = {e2e['ratio_vs_peer']}, ratio_vs_in_process = "
                  f"{e2e['ratio_vs_in_process']}.", "", "![quality against time](bench_e2e.png)",
                  ""]
    if result.get("staleness"):
        lines += ["## Staleness against time to the bar (benchmarks/staleness.py)", "",
                  "| " + " | ".join(STALENESS_KEYS) + " |",
                  "|" + "---|" * len(STALENESS_KEYS)]
        lines += ["| " + " | ".join(f"{r[k]:.0f}" if isinstance(r[k], float) else str(r[k])
                                    for k in STALENESS_KEYS) + " |" for r in result["staleness"]]
        lines.append("")
    parts = result.get("parts", {})
    if parts:
        lines += ["## Parts", "", "| measure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in parts.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="small sizes; no end-to-end runs")
    p.add_argument("--only", default=",".join(PARTS), help=f"parts to run, of {','.join(PARTS)}")
    p.add_argument("--peer", choices=("cached", "run", "skip"), default="cached",
                   help="the peer's curve: reuse the cached one, run it again, or leave it out")
    p.add_argument("--peer-npz", type=Path, default=None,
                   help="score this finished peer_torchgfn.py run (its peer_curve.npz) instead")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="where the JSON, Markdown and plot go")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench",
                   help="where the end-to-end runs (stores, caches, logs) go")
    args = p.parse_args()
    only = set(args.only.split(","))
    if only - set(PARTS):
        p.error(f"--only: unknown parts {sorted(only - set(PARTS))} (parts: {', '.join(PARTS)})")
    if args.quick:
        only -= {"e2e", "staleness"}
    args.out.mkdir(parents=True, exist_ok=True)
    quick = ["--quick"] if args.quick else []
    result: dict = {"mode": "quick" if args.quick else "full",
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "machine": {"cpus": len(os.sched_getaffinity(0)),
                                "platform": platform.platform(),
                                "torch": __import__("torch").__version__}, "parts": {}}
    parts = result["parts"]
    if "replay" in only:
        script("replay.py", *quick, "--out", str(args.out))
        s = json.loads((args.out / ("replay_quick.json" if args.quick else "replay.json"))
                       .read_text())["summary"]
        parts.update({"replay insert+sample / memcpy (worst, ≥ 1 MB batches)":
                      s["throughput_ratio"], "replay p99 sample(512) ms": s["p99_sample_ms"],
                      "replay p99 / numpy fancy indexing": s["p99_ratio_to_numpy"]})
    if "learner" in only:
        script("learner.py", "--seconds", "2" if args.quick else "8", "--out", str(args.out))
        for r in json.loads((args.out / "learner.json").read_text())["results"]:
            key = f"learner B={r['batch']} {r['threads']} thread(s)"
            parts[f"{key}: overhead over bare forward+backward"] = r["overhead_over_bare"]
            parts[f"{key}: batched recompute speed-up over per-step"] = r["batched_speedup"]
    if "runtime" in only:
        script("runtime.py", *quick, "--minutes", "0", "--out", str(args.out))
        r = json.loads((args.out / ("runtime_quick.json" if args.quick else "runtime.json"))
                       .read_text())
        parts.update({"1 rollout worker / in-process sampler":
                      r["rollout_one_worker_vs_in_process"],
                      "2 rollout workers, trajectories/s":
                      r["rollout_workers"][1]["trajectories_per_s"],
                      "weight publish→applied / put+get (p50)": r["weights"]["ratio"],
                      "MLflow logging share of learner time": r["mlflow"]["share_of_learner_time"]})
    if "e2e" in only:
        systems = [ours("in_process", True, args.work), ours("ray", False, args.work)]
        peer_result = peer(args.peer, args.out, args.work, args.peer_npz)
        if peer_result is not None:
            systems.append(peer_result)
        in_process, ray_runtime = systems[0], systems[1]
        ray_bar, in_bar = first_at_bar(ray_runtime["curve"]), first_at_bar(in_process["curve"])
        e2e = {"bar": BAR, "systems": systems,
               "time_to_bar_s": {s["system"]: first_at_bar(s["curve"]) for s in systems},
               "ratio_vs_in_process": None if ray_bar is None or in_bar is None
               else round(ray_bar / in_bar, 3),
               "ratio_vs_peer": None if ray_bar is None or peer_result is None
               else round(ray_bar / peer_result["total_s"], 3),
               "ours_final": ray_runtime["final"]}
        if peer_result is not None:
            e2e["peer_total_s"] = peer_result["total_s"]
            e2e["peer_reaches_bar"] = first_at_bar(peer_result["curve"]) is not None
        result["end_to_end"] = e2e
        plot(systems, args.out / "bench_e2e.png")
    if "staleness" in only:
        script("staleness.py", "--out", str(args.out), "--work", str(args.work / "staleness"))
        runs = json.loads((args.out / "staleness.json").read_text())["runs"]
        result["staleness"] = [{k: r.get(k) for k in STALENESS_KEYS} for r in runs]
    name = "bench_quick" if args.quick else "bench"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(result))
    print("\n" + markdown(result))
    print(f"written to {args.out / name}.json and .md")


if __name__ == "__main__":
    main()
