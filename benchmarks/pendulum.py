"""Offline RL on Pendulum-v1 (issue #17, Tier B): RTB against its baselines, one table.

    python benchmarks/pendulum.py [--datasets medium medium-replay medium-expert bimodal]
        [--seeds 5] [--episodes 10] [--sir-k 32] [--runs runs/pendulum]
        [--out benchmarks/results/pendulum] [--table-only]

For each dataset (``pipelines/configs/pendulum.yaml`` with ``task.dataset`` set):

1. The data, the diffusion-BC prior and the IQL critic, timed from an empty cache
   (``<runs>/cache``) as ``rtb-ray pretrain`` makes them.
2. For each seed: RTB trained as a user would (``rtb-ray train``, a subprocess, MLflow store
   ``<runs>/mlflow.db``, ``seed`` set); BC (a Gaussian MLP) and IQL's AWR actor trained here
   (``rtb_ray.offline_rl``, that seed); then every method rolled out on the same ``--episodes``
   episodes (reset seed 1000 + 100·seed), scored 100·(R − R_random)/(R_expert − R_random):
   BC and IQL act their mean, diffusion-BC a prior sample, SIR-k one of k prior actions drawn
   ∝ e^{βQ} (an estimate of RTB's own target), RTB a posterior sample.
3. A cell is the mean ± std over seeds of the per-seed mean score. Each cell is an MLflow run
   (experiment ``pendulum_benchmark``) with its scores and a picture of one episode (angle and
   torque over time); the RTB training runs are in experiment ``pendulum``.

Writes ``<out>/<dataset>.json`` per dataset (every figure, the timings) and, from all of them,
``<out>.json`` (the acceptance checks: on medium-replay and bimodal RTB ≥ diffusion-BC + 10,
≥ IQL − 5 and within 5 of SIR-k; data + prior + critic + one RTB run ≤ 45 min) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.pendulum import Episodes, PendulumTask, draw_episode, run_episodes  # noqa: E402
from rtb_ray.config import load_config  # noqa: E402
from rtb_ray import pretrain  # noqa: E402
from rtb_ray.offline_rl import train_awr, train_bc  # noqa: E402
from rtb_ray.run_dir import load_posterior  # noqa: E402
from rtb_ray.tracking import MlflowTracker  # noqa: E402

CONFIG = ROOT / "pipelines" / "configs" / "pendulum.yaml"
DATASETS = ("medium", "medium-replay", "medium-expert", "bimodal")
METHODS = ("BC", "diffusion-BC", "IQL", "SIR", "RTB", "KL-RL")
CHECKED = ("medium-replay", "bimodal")
BUDGET_S = 45 * 60
POLICY_STEPS = 10_000  # BC and AWR: Adam steps of batch 256
AWR_INVERSE_TEMPERATURE = 3.0  # IQL's own setting; advantages in the critic's units


# KL-RL: the same config with the policy-gradient objective (KL weight 1, advantages centred
# within each state's group), on its own samples only: a policy gradient needs on-policy rollouts
KL_RL = ["train.objective.kind=kl_rl", "train.sources={posterior: 1}",
         "runtime.workers={posterior: 1}"]


def train_run(output: Path, runs: Path, dataset: str, seed: int, extra: list[str]) -> float:
    """``rtb-ray train`` in a subprocess; its wall-clock seconds."""
    env = {**os.environ, "RTB_RAY_CACHE": str(runs / "cache")}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "rtb_ray.cli", "train", str(CONFIG), "--in-process",
         "--no-progress", "--output", str(output), "--tracking-uri",
         f"sqlite:///{(runs / 'mlflow.db').resolve()}", "--set", f"task.dataset={dataset}",
         "--set", f"seed={seed}", "--set", "torch_threads=1",
         *[a for item in extra for a in ("--set", item)]], cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{output}: rtb-ray train exited {proc.returncode}")
    return time.perf_counter() - t0


def sir_policy(task: PendulumTask, k: int, beta: float, gen: torch.Generator):
    """One of k prior actions per state, drawn with probability ∝ e^{βQ}."""
    prior, critic = task.prior(), task.critic()

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        states = torch.from_numpy(obs).float().repeat_interleave(k, 0)
        actions = task.to_action(task._sample(prior, states, gen))
        q = critic.q(states, actions).double().view(-1, k)
        pick = torch.multinomial((beta * q).softmax(1), 1, generator=gen)[:, 0]
        return actions.view(obs.shape[0], k, -1)[torch.arange(obs.shape[0]), pick].numpy()

    return act


def mean_policy(policy: torch.nn.Module):
    return lambda obs: policy.act(torch.from_numpy(obs).float()).detach().numpy()


def run_dataset(dataset: str, args: argparse.Namespace) -> dict:
    """Every method on one dataset, every seed; also ``<out>/<dataset>.json``."""
    os.environ["RTB_RAY_CACHE"] = str(args.runs / "cache")  # the same cache as the subprocesses
    torch.set_num_threads(1)
    pretrain.PROGRESS_BARS = False  # a log file, not a terminal
    cfg = load_config(CONFIG, [f"task.dataset={dataset}"])
    task = PendulumTask(cfg.task)
    t0 = time.perf_counter()
    task.prior()  # data, diffusion-BC and IQL, unless cached
    pretrain_s = time.perf_counter() - t0
    beta = cfg.train.objective.beta
    data, critic = task.data(), task.critic()
    scores: dict[str, list[list[float]]] = {m: [] for m in METHODS}
    failed = {m: 0 for m in METHODS}
    first: dict[str, Episodes] = {}
    rtb_s = []
    for seed in range(args.seeds):
        run, kl_run = args.runs / dataset / f"rtb_seed{seed}", args.runs / dataset / f"kl_seed{seed}"
        if not (run / "final_eval.json").exists():
            rtb_s.append(train_run(run, args.runs, dataset, seed, []))
        if seed < args.kl_rl_seeds and not (kl_run / "final_eval.json").exists():
            train_run(kl_run, args.runs, dataset, seed, KL_RL)
        gen = torch.Generator().manual_seed(seed)
        bc = train_bc(data, POLICY_STEPS, seed=seed, action_bound=2.0, progress=False)
        iql = train_awr(data, critic, POLICY_STEPS, inverse_temperature=AWR_INVERSE_TEMPERATURE,
                        seed=seed, action_bound=2.0, progress=False)
        posterior = load_posterior(task, cfg, run / "checkpoint.pt")[1]
        policies = {"BC": mean_policy(bc), "diffusion-BC": task.policy_of(task.prior(), gen),
                    "IQL": mean_policy(iql), "SIR": sir_policy(task, args.sir_k, beta, gen),
                    "RTB": task.policy_of(posterior, gen)}
        if seed < args.kl_rl_seeds:
            kl_posterior = load_posterior(task, cfg, kl_run / "checkpoint.pt")[1]
            policies["KL-RL"] = task.policy_of(kl_posterior, gen)
        for name, policy in policies.items():
            episodes = run_episodes(policy, args.episodes, seed=1000 + 100 * seed, env=task.env)
            scores[name].append(episodes.scores().tolist())
            failed[name] += int(episodes.failed.sum())
            first.setdefault(name, episodes)
        print(f"{dataset} seed {seed}: " + "  ".join(
            f"{m} {np.mean(scores[m][-1]):.1f}" for m in policies), flush=True)
    cells = {m: {"mean": float(np.mean([np.mean(s) for s in scores[m]])),
                 "std": float(np.std([np.mean(s) for s in scores[m]])),
                 "seed_means": [float(np.mean(s)) for s in scores[m]],
                 "failed_episodes": failed[m]} for m in METHODS if scores[m]}
    result = {"dataset": dataset, "cells": cells, "scores": scores, "beta": beta,
              "sir_k": args.sir_k, "seeds": args.seeds, "episodes": args.episodes,
              "pretrain_s": pretrain_s, "rtb_train_s": rtb_s,
              "rtb_wall_s": [json.loads((args.runs / dataset / f"rtb_seed{seed}" /
                                         "final_eval.json").read_text())["wall_s"]
                             for seed in range(args.seeds)],
              "prior_stats": {k: v for k, v in task.stats.items()
                              if isinstance(v, (int, float))}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{dataset}.json").write_text(json.dumps(result, indent=1))
    log_cells(args.runs, dataset, cells, first)
    return result


def log_cells(runs: Path, dataset: str, cells: dict, first: dict[str, Episodes]) -> None:
    """One MLflow run per (dataset, method): its scores and one rendered episode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    uri = f"sqlite:///{(runs / 'mlflow.db').resolve()}"
    pictures = runs / "episodes"
    pictures.mkdir(parents=True, exist_ok=True)
    for method, cell in cells.items():
        tracker = MlflowTracker(uri, "pendulum_benchmark", run_name=f"{dataset}: {method}")
        tracker.set_tags({"dataset": dataset, "method": method})
        tracker.log_metrics({"score_mean": cell["mean"], "score_std": cell["std"],
                             "failed_episodes": cell["failed_episodes"]}, step=0)
        for seed, value in enumerate(cell["seed_means"]):
            tracker.log_metrics({"score_seed": value}, step=seed)
        fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
        draw_episode(ax, first[method])
        fig.suptitle(f"{method} on {dataset} (seed 0)", fontsize=9)
        fig.tight_layout()
        path = pictures / f"{dataset}_{method}.png"
        fig.savefig(path)
        plt.close(fig)
        tracker.log_artifact(path, "eval")
        tracker.close("FINISHED")


def summarise(out: Path) -> dict:
    """The table and the acceptance checks from every ``<out>/<dataset>.json`` present."""
    results = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    lines = ["| dataset | seeds | " + " | ".join(METHODS) + " |",
             "|---" * (len(METHODS) + 2) + "|"]
    for name in DATASETS:
        if name in results:
            cells = results[name]["cells"]
            lines.append(f"| {name} | {results[name]['seeds']} | " + " | ".join(
                f"{cells[m]['mean']:.1f} ± {cells[m]['std']:.1f}" + (
                    f" ({len(cells[m]['seed_means'])} seeds)"
                    if len(cells[m]["seed_means"]) != results[name]["seeds"] else "")
                if m in cells else "n/a" for m in METHODS) + " |")
    checks = {}
    for name in CHECKED:
        if name not in results:
            continue
        c = {m: results[name]["cells"][m]["mean"] for m in METHODS}
        r = results[name]
        checks[name] = {
            "rtb_vs_diffusion_bc": c["RTB"] - c["diffusion-BC"],
            "rtb_ge_diffusion_bc_plus_10": c["RTB"] >= c["diffusion-BC"] + 10,
            "rtb_vs_iql": c["RTB"] - c["IQL"], "rtb_ge_iql_minus_5": c["RTB"] >= c["IQL"] - 5,
            "rtb_vs_sir": c["RTB"] - c["SIR"], "rtb_within_5_of_sir": abs(c["RTB"] - c["SIR"]) <= 5,
            # data, prior and critic as the checkpoint timed them, then seed 0's RTB run
            "budget_s": r["prior_stats"]["pretrain_seconds"] + r["rtb_wall_s"][0],
        }
        checks[name]["within_budget"] = checks[name]["budget_s"] <= BUDGET_S
    met = [v for ch in checks.values() for k, v in ch.items() if isinstance(v, bool)]
    summary = {"table": lines, "checks": checks, "all_met": bool(met) and all(met),
               "results": results}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--sir-k", type=int, default=32)
    parser.add_argument("--kl-rl-seeds", type=int, default=5,
                        help="seeds of the KL-RL baseline (each a training run as long as RTB's)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "pendulum")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pendulum")
    parser.add_argument("--table-only", action="store_true",
                        help="only summarise the per-dataset results already written")
    args = parser.parse_args()
    args.runs = args.runs.resolve()
    if not args.table_only:
        for dataset in args.datasets:
            run_dataset(dataset, args)
    summary = summarise(args.out)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(summary["table"]) + "\n")
    print("\n".join(summary["table"]))
    print(json.dumps(summary["checks"], indent=1))
    print(f"all bars met: {summary['all_met']}  ->  {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
