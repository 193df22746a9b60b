"""Learner throughput on CUDA against the CPU, for the gmm25 network (T = 100, hidden 128).

    python benchmarks/gpu_learner.py [--out DIR]

One learner step = recompute Σ log p_φ for all B×T transitions in one batched pass, VarGrad
loss, backward, Adam. Prints and saves JSON (default benchmarks/results/gpu_learner.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rtb_ray.config import ObjectiveConfig, TrainConfig
from rtb_ray.learner import Learner
from rtb_ray.networks import TimeMLP
from rtb_ray.trajectory import Source, TrajectoryBatch
from rtb_ray.transitions import PinnedBrownian


def bench(device: str, batch: int, steps: int = 30) -> dict:
    family = PinnedBrownian(2, 100, 5**0.5, learn_variance=True)
    prior = TimeMLP(2, 100, 128, 2, out_dim=family.net_out_dim)
    learner = Learner(family, prior, TrainConfig(objective=ObjectiveConfig(kind="vargrad")), device)
    data = TrajectoryBatch.make(torch.randn(batch, 101, 2), torch.randn(batch), torch.randn(batch),
                                torch.randn(batch), Source.PRIOR).to(device)
    for _ in range(5):
        learner.step(data)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        learner.step(data)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return {"device": device, "batch": batch, "ms_per_step": 1e3 * dt,
            "trajectories_per_s": batch / dt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark compares the GPU learner with the CPU")
    results = []
    for batch in (256, 2048, 16384):
        for device in ("cpu", "cuda"):
            if device == "cpu" and batch > 2048:
                continue
            results.append(bench(device, batch))
            print(results[-1], flush=True)
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "cpu_threads": torch.get_num_threads(), "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_learner.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
