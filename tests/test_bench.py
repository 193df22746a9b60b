"""benchmarks/run.py scores every system with the same metrics: check that scoring on samples
whose answer is known (exact posterior samples pass the bar, prior samples do not)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from pipelines.gmm25 import CENTERS_9, CENTERS_25, WEIGHTS_9, analytic_metrics, mixture_sample

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run as bench  # noqa: E402


def _samples(n: int, exact: bool, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    if exact:
        return mixture_sample(n, CENTERS_9, WEIGHTS_9, gen).numpy()
    return mixture_sample(n, CENTERS_25, torch.full((25,), 1 / 25), gen).numpy()


def test_analytic_metrics_tell_the_posterior_from_the_prior():
    exact = analytic_metrics(torch.from_numpy(_samples(20_000, True, 0)))
    prior = analytic_metrics(torch.from_numpy(_samples(20_000, False, 1)))
    assert exact["tv_analytic"] < 0.02 and exact["modes_hit"] == 9
    assert exact["forbidden_mass"] < 1e-3 and bench.meets_bar(exact)
    assert prior["forbidden_mass"] > 0.6 and not bench.meets_bar(prior)


def test_peer_curve_is_scored_and_timed_like_ours(tmp_path):
    # a peer run that starts at the prior and ends at the exact posterior
    rows = [{"iteration": i, "finetune_s": 10.0 * i, "prior_s": 100.0, "log_z": 0.0}
            for i in (0, 1, 2)]
    arrays = {"x_0": _samples(5000, False, 2), "x_1": _samples(5000, False, 3),
              "x_2": _samples(5000, True, 4)}
    meta = {"rows": rows, "prior_s": 100.0, "finetune_s": 20.0, "pretrain_steps": 1,
            "iterations": 2, "eval_n": 5000, "torch": torch.__version__, "torch_threads": 1}
    np.savez(tmp_path / "peer_curve.npz", **arrays,
             meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    scored = bench.peer("run", tmp_path, tmp_path, tmp_path / "peer_curve.npz")
    assert scored["total_s"] == 120.0
    assert [p["t_s"] for p in scored["curve"]] == [100.0, 110.0, 120.0]
    assert bench.first_at_bar(scored["curve"]) == 120.0  # only the last point passes
    assert abs(scored["curve"][2]["mean_log_reward"] - 1.156) < 0.05
    assert json.loads((tmp_path / bench.PEER_CURVE).read_text())["total_s"] == 120.0


def test_run_refuses_unknown_parts():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--only", "nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown parts" in out.stderr
