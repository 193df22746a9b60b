"""Replay store benchmark: throughput against memcpy, sample latency against numpy fancy
indexing, sealing MB/s, reopen time, and RSS under a long insert loop.

    python benchmarks/replay.py [--quick] [--out DIR] [--tmp DIR]

Definitions (all measured in this run, on this machine):

- insert+sample throughput: steady state (the store already full, so every insert evicts),
  alternating ``insert(b rows)`` and ``sample(b rows)``; bytes moved = bytes inserted + bytes
  sampled (the tensors of the TrajectoryBatch), over the wall time of both.
- memcpy (the baseline of the acceptance ratio): ``np.copyto`` of the same number of bytes
  between the places insert and sample copy between: a batch-sized buffer and rotating slots
  of a 256 MiB region, alternating in and out (``memcpy_gbps``). The same copy between two
  reused buffers is reported as ``memcpy_cache_gbps``: a 1 MB copy then never leaves L2, so it
  measures the cache (2-3x DRAM here), which no operation on a ring of 10^4..10^6 rows can use.
- numpy equivalent: the same copy into the store's own ring arrays and ``take`` of the same
  number of random rows, without the store (what the hot path cannot avoid): its ratio to
  memcpy is the ceiling of any store here. ``two_threads``: the same with the copies in and the
  takes out on two threads at once, against memcpy on two threads (does the second core move
  the ceiling?).
- latency: ``store.sample(512)`` (uniform), then numpy fancy indexing ``states[idx]`` of the
  very rows each sample returned (run after the store pass, so any cache advantage is numpy's).
- sealing: write + fsync + rename + manifest of each segment, timed in the sealer thread.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtb_ray.replay import Mixture, Prioritised, Recency, ReplayStore  # noqa: E402
from rtb_ray.replay.ring import ColumnRing  # noqa: E402
from rtb_ray.trajectory import Source, TrajectoryBatch, TrajectoryLayout  # noqa: E402

STEPS = 100  # states are [101, dim] float32
MB = 1 << 20
# (dim, rows) stores; batch sizes (MB); insert+sample cycles per batch size; sample(512) calls;
# rows sealed to disk and reopened; RSS loop: (store capacity MB, passes through it)
QUICK = {"configs": [(2, 10_000), (2, 1_000_000), (64, 10_000)], "batch_mb": [1.0, 4.0],
         "cycles": 40, "latency_reps": 400, "seal_rows": 200_000, "rss": (64, 6)}
FULL = {"configs": [(d, n) for d in (2, 16, 64) for n in (10_000, 100_000, 1_000_000)],
        "batch_mb": [1.0, 4.0, 16.0], "cycles": 200, "latency_reps": 3000,
        "seal_rows": 1_000_000, "rss": (256, 10)}


def make_batch(b: int, dim: int, seed: int = 0) -> TrajectoryBatch:
    gen = torch.Generator().manual_seed(seed)
    source = Source(seed % 4)
    return TrajectoryBatch.make(torch.randn(b, STEPS + 1, dim, generator=gen),
                                torch.randn(b, generator=gen), torch.randn(b, generator=gen),
                                torch.randn(b, generator=gen), source, seed)


def tensor_bytes(batch: TrajectoryBatch) -> int:
    tensors = [batch.states, batch.log_reward, batch.log_prior, batch.log_behaviour,
               batch.source, batch.policy_version]
    return sum(t.numel() * t.element_size() for t in tensors)


def fill(store: ReplayStore, rows: int, dim: int, chunk_bytes: int = 8 * MB) -> float:
    """Insert ``rows`` rows; returns the wall time (first touch of the ring's pages included)."""
    b = max(1, min(rows, chunk_bytes // (4 * (STEPS + 1) * dim)))
    batch = make_batch(b, dim)
    t0 = time.perf_counter()
    for start in range(0, rows, b):
        store.insert(batch.index(slice(0, min(b, rows - start)))).raise_for_status()
    return time.perf_counter() - t0


def rotating_copies(region: np.ndarray, nbytes: int, reps: int) -> float:
    """Seconds for ``reps`` copies of ``nbytes`` between a batch-sized buffer and rotating slots
    of ``region``, alternating in and out: the copies insert and sample make, as plain memcpy."""
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    slots = len(region) // nbytes
    t0 = time.perf_counter()
    for i in range(reps):
        j = (i * 7919) % slots
        if i % 2:
            np.copyto(dst, region[j * nbytes:(j + 1) * nbytes])
        else:
            np.copyto(region[j * nbytes:(j + 1) * nbytes], src)
    return time.perf_counter() - t0


def memcpy_gbps(nbytes: int, reps: int) -> tuple[float, float]:
    """(memory, cache) bandwidth of ``np.copyto`` of ``nbytes``, in GB/s.

    memory: ``rotating_copies`` through a 256 MiB region (far larger than the caches, like the
    store's ring). cache: one buffer into another, both reused, so a 1 MB copy never leaves L2
    (it measures the cache, which no store of 10^4..10^6 rows stays in)."""
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    np.copyto(dst, src)
    t0 = time.perf_counter()
    for _ in range(reps):
        np.copyto(dst, src)
    cache = nbytes * reps / (time.perf_counter() - t0) / 1e9
    region = np.ones(max(4 * nbytes, 256 * MB), np.uint8)
    memory = nbytes * reps / rotating_copies(region, nbytes, reps) / 1e9
    return memory, cache


def together(*jobs) -> float:
    """Wall seconds of running the jobs on threads at once (numpy releases the GIL in copies)."""
    threads = [threading.Thread(target=job) for job in jobs]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - t0


def copy_in(ring: np.ndarray, states: np.ndarray, i: int) -> None:
    """The numpy equivalent of insert number i: the batch copied into the next rows."""
    at = (i * len(states)) % (len(ring) - len(states))
    ring[at:at + len(states)] = states


def take_out(ring: np.ndarray, b: int, rng: np.random.Generator) -> np.ndarray:
    """The numpy equivalent of a sample: ``take`` of b random rows."""
    return ring.take(rng.integers(0, len(ring), b), axis=0)


def two_threads(ring: np.ndarray, states: np.ndarray, cycles: int) -> dict:
    """Whether the second core changes the ratio: the numpy equivalent with its copies in and
    takes out on two threads at once, against memcpy on two threads."""
    cycles = max(cycles, (512 * MB) // states.nbytes)  # long enough to hide starting threads
    def copies_in() -> None:
        for i in range(cycles):
            copy_in(ring, states, i)

    def takes_out() -> None:  # each sample dropped as the next is taken, as a learner does
        rng = np.random.default_rng(1)
        for _ in range(cycles):
            take_out(ring, len(states), rng)

    seconds = together(copies_in, takes_out)
    numpy_gbps = 2 * states.nbytes * cycles / seconds / 1e9
    regions = [np.ones(max(4 * states.nbytes, 256 * MB), np.uint8) for _ in range(2)]
    memcpy = 2 * states.nbytes * cycles / together(
        *[lambda r=r: rotating_copies(r, states.nbytes, cycles) for r in regions]) / 1e9
    return {"numpy_equivalent_gbps": numpy_gbps, "memcpy_gbps": memcpy,
            "ratio": numpy_gbps / memcpy}


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    a = np.array(seconds) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}


def batch_rows(rows: int, dim: int, batch_mb: float) -> int:
    return max(1, min(rows // 4, round(batch_mb * MB / (4 * (STEPS + 1) * dim))))


def throughput(store: ReplayStore, dim: int, rows: int, b: int, cycles: int) -> dict:
    batch = make_batch(b, dim, seed=1)
    nbytes = tensor_bytes(batch)
    store.insert(batch).raise_for_status()  # warm up
    store.sample(b)
    insert_s = sample_s = 0.0
    for _ in range(cycles):
        t0 = time.perf_counter()
        store.insert(batch).raise_for_status()
        t1 = time.perf_counter()
        store.sample(b)
        t2 = time.perf_counter()
        insert_s += t1 - t0
        sample_s += t2 - t1
    memcpy, memcpy_cache = memcpy_gbps(nbytes, cycles * 2)

    # the same memory traffic in plain numpy, on the store's own ring (the store is done)
    ring = store._ring.tensors["states"]
    states = batch.states.numpy()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(cycles):
        copy_in(ring, states, i)
        take_out(ring, b, rng)
    numpy_s = time.perf_counter() - t0
    both_cores = two_threads(ring, states, cycles)
    moved = 2 * nbytes * cycles
    total = moved / (insert_s + sample_s) / 1e9
    return {
        "dim": dim, "rows": rows, "batch_rows": b, "batch_mb": nbytes / MB,
        "insert_gbps": nbytes * cycles / insert_s / 1e9,
        "sample_gbps": nbytes * cycles / sample_s / 1e9,
        "insert_trajectories_per_s": b * cycles / insert_s,
        "sample_trajectories_per_s": b * cycles / sample_s,
        "throughput_gbps": total, "memcpy_gbps": memcpy, "memcpy_cache_gbps": memcpy_cache,
        "numpy_equivalent_gbps": 2 * states.nbytes * cycles / numpy_s / 1e9,
        "ratio_to_memcpy": total / memcpy, "ratio_to_memcpy_cache": total / memcpy_cache,
        "two_threads": both_cores,
    }


def latency(store: ReplayStore, reps: int, n: int = 512) -> dict:
    ring = store._ring.tensors["states"]
    capacity = len(ring)
    for _ in range(20):
        store.sample(n)
    store_s, picked = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        b = store.sample(n)
        store_s.append(time.perf_counter() - t0)
        picked.append(b.extras["id"].numpy() % capacity)  # no quarantine here: id == sequence
    numpy_s = []
    for idx in picked:
        t0 = time.perf_counter()
        ring[idx]
        numpy_s.append(time.perf_counter() - t0)
    out = {"batch": n, "rows": store.size, "store": percentiles_ms(store_s),
           "numpy_fancy_indexing": percentiles_ms(numpy_s)}
    out["ratio_p99"] = out["store"]["p99_ms"] / out["numpy_fancy_indexing"]["p99_ms"]
    return out


def other_samplers(store: ReplayStore, dim: int, reps: int, n: int = 512) -> dict:
    samplers = {"prioritised": Prioritised(0.01), "recency": Recency(store.size / 10),
                "mixture": Mixture({"posterior": 0.5, "prior": 0.25, "backward": 0.25})}
    out = {}
    for name, sampler in samplers.items():
        store.sample(n, sampler=sampler)  # builds the rank index once
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            store.sample(n, sampler=sampler)
            times.append(time.perf_counter() - t0)
        out[name] = percentiles_ms(times)
    small = make_batch(256, dim, seed=5)  # rank index merge after every insert
    times = []
    for _ in range(max(5, reps // 5)):
        store.insert(small)
        t0 = time.perf_counter()
        store.sample(n, sampler=samplers["prioritised"])
        times.append(time.perf_counter() - t0)
    out["prioritised_after_insert"] = percentiles_ms(times)
    return out


def seal_and_reopen(directory: Path, rows: int, dim: int) -> dict:
    shutil.rmtree(directory, ignore_errors=True)
    store = ReplayStore(directory, capacity_trajectories=rows)
    t0 = time.perf_counter()
    fill(store, rows, dim, chunk_bytes=MB)
    insert_s = time.perf_counter() - t0
    store.close()
    wall_s = time.perf_counter() - t0
    stats = store.stats()
    del store
    gc.collect()
    t0 = time.perf_counter()
    reopened = ReplayStore(directory, capacity_trajectories=rows)
    reopen_s = time.perf_counter() - t0
    assert reopened.size == rows and reopened.stats()["corrupt_segments"] == 0
    reopened.close()
    del reopened
    shutil.rmtree(directory, ignore_errors=True)
    return {
        "dim": dim, "rows": rows, "disk_mb": stats["sealed_bytes"] / MB,
        "segments": stats["sealed_segments"],
        "seal_mbps": stats["sealed_bytes"] / MB / stats["seal_seconds"],
        "insert_with_sealing_mbps": stats["sealed_bytes"] / MB / insert_s,
        "insert_then_close_wall_s": wall_s,
        "reopen_s": reopen_s, "reopen_mbps": stats["sealed_bytes"] / MB / reopen_s,
        "note": "reopen reads from the page cache (files just written); it verifies checksums",
    }


def rss_loop(capacity_mb: int, passes: int, dim: int = 16) -> dict:
    process = psutil.Process()
    gc.collect()
    base = process.memory_info().rss
    store = ReplayStore(capacity_trajectories=10**9, capacity_bytes=capacity_mb * MB)
    batch = make_batch(max(1, (4 * MB) // (4 * (STEPS + 1) * dim)), dim)
    per_pass = math.ceil(store_capacity_rows(capacity_mb, dim) / len(batch))
    samples = []
    for p in range(passes):
        for _ in range(per_pass):
            store.insert(batch).raise_for_status()
        samples.append((process.memory_info().rss - base) / MB)
    stats = store.stats()
    return {"capacity_mb": capacity_mb, "inserted_mb": stats["inserted"] * tensor_bytes(
            batch) / len(batch) / MB, "store_nbytes_mb": stats["nbytes"] / MB,
            "rss_growth_mb_per_pass": [round(s, 1) for s in samples],
            "max_rss_growth_mb": max(samples),
            "bounded": max(samples) <= 1.1 * capacity_mb + 32}


def store_capacity_rows(capacity_mb: int, dim: int) -> int:
    return capacity_mb * MB // ColumnRing.row_nbytes(TrajectoryLayout((STEPS + 1, dim)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (~10 s; the full run takes 1-2 min and up to 6 GiB)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the sealing/reopen test writes (deleted afterwards)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quick = args.quick
    budget = min(6 << 30, psutil.virtual_memory().available // 2)
    size = QUICK if quick else FULL
    configs, batch_mbs, cycles = size["configs"], size["batch_mb"], size["cycles"]
    reps, seal_rows, rss = size["latency_reps"], size["seal_rows"], size["rss"]

    result: dict = {
        "mode": "quick" if quick else "full",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "pyarrow": pa.__version__, "torch": torch.__version__,
                    "load_average_at_start": os.getloadavg()},
        "throughput": [], "latency": None, "samplers": None, "skipped": [],
    }
    result["rss"] = mem = rss_loop(*rss)  # first, so RSS growth is the store's own
    print(f"RSS growth over {len(mem['rss_growth_mb_per_pass'])} passes through a "
          f"{mem['capacity_mb']} MB store: {mem['rss_growth_mb_per_pass']} MB\n")
    print(f"{'dim':>4} {'rows':>9} {'batch MB':>8} {'insert':>7} {'sample':>7} {'ins+smp':>7} "
          f"{'memcpy':>7} {'ratio':>6} {'cache cp':>8} {'numpy':>7}   (GB/s)")
    for dim, rows in configs:
        nbytes = rows * ColumnRing.row_nbytes(TrajectoryLayout((STEPS + 1, dim)))
        if nbytes > budget:
            result["skipped"].append({"dim": dim, "rows": rows, "reason":
                                      f"{nbytes / 2**30:.1f} GiB over the memory budget"})
            continue
        store = ReplayStore(capacity_trajectories=rows, seed=0)
        fill_s = fill(store, rows, dim)
        if dim == 2 and rows == max(n for d, n in configs if d == 2):
            result["latency"] = latency(store, reps)
            result["samplers"] = other_samplers(store, dim, max(20, reps // 20))
        for b in sorted({batch_rows(rows, dim, mb) for mb in batch_mbs}):
            r = throughput(store, dim, rows, b, cycles)
            r["fill_gbps"] = nbytes / fill_s / 1e9
            result["throughput"].append(r)
            print(f"{dim:>4} {rows:>9} {r['batch_mb']:>8.2f} {r['insert_gbps']:>7.2f} "
                  f"{r['sample_gbps']:>7.2f} {r['throughput_gbps']:>7.2f} {r['memcpy_gbps']:>7.2f} "
                  f"{r['ratio_to_memcpy']:>6.2f} {r['memcpy_cache_gbps']:>8.2f} "
                  f"{r['numpy_equivalent_gbps']:>7.2f}")
        del store
        gc.collect()

    lat = result["latency"]
    print(f"\nsample(512) at {lat['rows']} rows of 2x101: store p50 {lat['store']['p50_ms']:.3f} "
          f"p99 {lat['store']['p99_ms']:.3f} ms; numpy fancy indexing p50 "
          f"{lat['numpy_fancy_indexing']['p50_ms']:.3f} p99 "
          f"{lat['numpy_fancy_indexing']['p99_ms']:.3f} ms (ratio p99 {lat['ratio_p99']:.2f})")
    for name, t in result["samplers"].items():
        print(f"  {name:>24}: p50 {t['p50_ms']:.3f} p99 {t['p99_ms']:.3f} ms")

    result["seal"] = seal_and_reopen(args.tmp / f"rtb-ray-replay-bench-{os.getpid()}",
                                     seal_rows, 2)
    s = result["seal"]
    print(f"\nsealing {s['rows']} rows ({s['disk_mb']:.0f} MB, {s['segments']} segments): "
          f"{s['seal_mbps']:.0f} MB/s (write+fsync, background); reopen {s['reopen_s']:.2f} s "
          f"({s['reopen_mbps']:.0f} MB/s)")

    big = [t for t in result["throughput"] if t["batch_mb"] >= 1.0]
    worst = min(big, key=lambda t: t["ratio_to_memcpy"])
    result["summary"] = {
        "throughput_gbps": worst["throughput_gbps"],
        "memcpy_gbps": worst["memcpy_gbps"],
        "throughput_ratio": worst["ratio_to_memcpy"],
        "throughput_config": {k: worst[k] for k in ("dim", "rows", "batch_rows", "batch_mb")},
        "throughput_ratio_to_cache_memcpy": worst["ratio_to_memcpy_cache"],
        "throughput_ratio_to_numpy_equivalent":
            worst["throughput_gbps"] / worst["numpy_equivalent_gbps"],
        # the ceiling: plain numpy's copy + take, no store, against the same memcpy; and the
        # same on two threads against memcpy on two threads
        "numpy_equivalent_ratio": worst["numpy_equivalent_gbps"] / worst["memcpy_gbps"],
        "numpy_equivalent_ratio_two_threads": worst["two_threads"]["ratio"],
        "best_throughput_ratio": max(t["ratio_to_memcpy"] for t in big),
        "p99_sample_ms": lat["store"]["p99_ms"],
        "numpy_p99_sample_ms": lat["numpy_fancy_indexing"]["p99_ms"],
        "p99_ratio_to_numpy": lat["ratio_p99"],
        "latency_rows": lat["rows"],
        "seal_mbps": s["seal_mbps"],
        "reopen_s": s["reopen_s"],
        "max_rss_growth_mb": mem["max_rss_growth_mb"],
        "rss_capacity_mb": mem["capacity_mb"],
        "acceptance": {
            "throughput_ge_half_memcpy": worst["ratio_to_memcpy"] >= 0.5,
            "p99_le_2ms": lat["store"]["p99_ms"] <= 2.0,
            "p99_le_3x_numpy": lat["ratio_p99"] <= 3.0,
            "rss_bounded": mem["bounded"],
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("replay_quick.json" if quick else "replay.json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    print(f"\nsummary: {json.dumps(result['summary'], indent=2)}\nwritten to {path}")


if __name__ == "__main__":
    main()
