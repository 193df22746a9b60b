"""The learner step against the bare forward+backward of its rows, and against per-step recompute.

    python benchmarks/learner.py [--devices cpu,cuda] [--batches 256,2048] [--threads 1,2]
                                 [--seconds 5] [--out DIR]

With the gmm25 network (T = 100, hidden 128, learned variance), for each device, batch and CPU
thread count, in one run:

- ``learner``: ``Learner.step`` — Σ log p_φ of all B×T transitions recomputed in one batched
  network pass, the VarGrad loss, backward, gradient clipping, Adam;
- ``bare``: the same batched pass, ``.sum().backward()``, nothing else (the floor);
- ``sequential``: the same log-probabilities recomputed one time step at a time (T network
  calls of B rows, as an implementation that steps through the trajectory does), then backward.

``overhead_over_bare`` = learner / bare − 1; ``batched_speedup`` = sequential / bare.
Prints and saves ``learner.json`` (``learner_gpu.json`` when the devices include cuda).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtb_ray.config import ObjectiveConfig, TrainConfig  # noqa: E402
from rtb_ray.learner import Learner  # noqa: E402
from rtb_ray.networks import TimeMLP  # noqa: E402
from rtb_ray.trajectory import Source, TrajectoryBatch  # noqa: E402
from rtb_ray.transitions import PinnedBrownian  # noqa: E402


def _timed(fn, seconds: float, sync) -> float:
    """Seconds per call, after warm-up calls, over at least ``seconds`` (and 5 calls)."""
    for _ in range(3):
        fn()
    sync()
    calls, t0 = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    sync()
    return (time.perf_counter() - t0) / calls


def bench(device: str, batch: int, seconds: float = 5.0) -> dict:
    family = PinnedBrownian(2, 100, 5**0.5, learn_variance=True)
    prior = TimeMLP(2, 100, 128, 2, out_dim=family.net_out_dim)
    learner = Learner(family, prior, TrainConfig(objective=ObjectiveConfig(kind="vargrad")),
                      device)
    gen = torch.Generator().manual_seed(0)
    data = TrajectoryBatch.make(torch.randn(batch, 101, 2, generator=gen),
                                torch.randn(batch, generator=gen), torch.randn(batch, generator=gen),
                                torch.randn(batch, generator=gen), Source.PRIOR).to(device)
    net, states = learner.posterior, data.states
    steps = [torch.tensor([k], device=device) for k in range(family.num_steps)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def bare() -> None:
        net.zero_grad(set_to_none=True)
        family.step_log_probs(net, states).sum().backward()

    def sequential() -> None:
        net.zero_grad(set_to_none=True)
        torch.cat([family.step_log_probs(net, states, steps=k) for k in steps], 1).sum().backward()

    learner_s = _timed(lambda: learner.step(data), seconds, sync)
    bare_s = _timed(bare, seconds, sync)
    sequential_s = _timed(sequential, seconds, sync)
    return {"device": device, "batch": batch, "threads": torch.get_num_threads(),
            "learner_ms": 1e3 * learner_s, "bare_ms": 1e3 * bare_s,
            "sequential_ms": 1e3 * sequential_s,
            "overhead_over_bare": learner_s / bare_s - 1,
            "batched_speedup": sequential_s / bare_s,
            "trajectories_per_s": batch / learner_s}


def run(devices: list[str], batches: list[int], threads: list[int], seconds: float) -> dict:
    results = []
    for device in devices:
        for n in threads if device == "cpu" else [threads[-1]]:
            torch.set_num_threads(n)
            for batch in batches:
                r = bench(device, batch, seconds)
                results.append(r)
                print(f"{device:>4} B={batch:<6} threads={n}: learner {r['learner_ms']:.2f} ms, "
                      f"bare {r['bare_ms']:.2f} ms (overhead {100 * r['overhead_over_bare']:+.1f}"
                      f" %), per-step recompute {r['sequential_ms']:.2f} ms "
                      f"(batched {r['batched_speedup']:.1f}x faster)", flush=True)
    return {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                        else None},
            "results": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="cpu", help="comma-separated: cpu,cuda")
    p.add_argument("--batches", default="256", help="comma-separated batch sizes")
    p.add_argument("--threads", default="1,2", help="CPU thread counts to try (CPU device)")
    p.add_argument("--seconds", type=float, default=5.0, help="timing per measurement")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    devices = args.devices.split(",")
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--devices names cuda, but torch sees no CUDA device")
    out = run(devices, [int(b) for b in args.batches.split(",")],
              [int(t) for t in args.threads.split(",")], args.seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "learner_gpu.json" if "cuda" in devices else "learner.json"
    (args.out / name).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {args.out / name}")


if __name__ == "__main__":
    main()
