"""Crash safety: a writer process SIGKILLed while sealing segments never leaves a partial
segment visible, and reopening recovers every segment it had sealed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from rtb_ray.replay import ReplayStore

REPO = Path(__file__).resolve().parents[1]

WRITER = """
import sys, torch
from rtb_ray.replay import ReplayStore
from rtb_ray.trajectory import Source, TrajectoryBatch

store = ReplayStore(sys.argv[1], capacity_trajectories=4000, segment_rows=400, run="crash")
print("ready", store.stats()["next_id"], flush=True)
while True:  # 100 rows of 101 x 16 float32 per insert: a 2.6 MB segment every 4 inserts
    b = TrajectoryBatch.make(torch.randn(100, 101, 16), torch.randn(100), torch.randn(100),
                             torch.randn(100), Source.PRIOR, 1)
    store.insert(b)
    print("sealed_rows", store.stats()["sealed_rows"], flush=True)
"""


def manifest_rows(directory: Path) -> int:
    path = directory / "_manifest.json"
    return sum(s["rows"] for s in json.loads(path.read_text())["segments"]) if path.exists() else 0


def run_and_kill(directory: Path, script: Path, kill_mid_write: bool) -> tuple[int, int]:
    """Start a writer, SIGKILL it; returns (rows it reported sealed, its first id)."""
    child = subprocess.Popen([sys.executable, str(script), str(directory)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    ready = child.stdout.readline().split()
    if not ready:
        raise AssertionError(f"the writer did not start: {child.communicate(timeout=20)[1]}")
    deadline = time.monotonic() + 20
    if kill_mid_write:  # as soon as a segment is being written
        while not list(directory.glob(".segment-*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(random.uniform(0, 0.001))
    else:
        time.sleep(random.uniform(0.05, 0.3))
    child.send_signal(signal.SIGKILL)
    # (stderr: empty, it was killed). The kill may cut the last line short: only whole
    # lines, those followed by a newline, count.
    lines = child.communicate(timeout=20)[0].split("\n")[:-1]
    sealed = [int(line.split()[1]) for line in lines if line.startswith("sealed_rows")]
    return (sealed[-1] if sealed else 0), int(ready[1])


def test_sigkill_mid_write_leaves_no_partial_segment_and_loses_no_sealed_one(tmp_path: Path):
    random.seed(0)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    directory = tmp_path / "store"
    directory.mkdir()
    left_mid_write = 0
    next_id = 0
    for attempt in range(4):
        before = manifest_rows(directory)
        reported, first_id = run_and_kill(directory, script, kill_mid_write=attempt % 2 == 1)
        assert first_id >= next_id  # ids continue across restarts
        left_mid_write += bool(list(directory.glob(".*.tmp")))

        # every visible file is a complete, valid Arrow file
        visible = [p for p in directory.iterdir() if not p.name.startswith((".", "_"))]
        for path in visible:
            with pa.OSFile(str(path)) as f:
                pa.ipc.open_file(f).read_all().validate(full=True)

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no segment may be found corrupt
            store = ReplayStore(directory, capacity_trajectories=4000)
            assert store.verify_segments() == 0
        stats = store.stats()
        assert stats["corrupt_segments"] == 0
        assert manifest_rows(directory) >= before + reported  # every sealed segment is back
        assert stats["size"] == min(4000, manifest_rows(directory))
        assert not list(directory.glob(".*.tmp"))  # leftovers of the crash are gone
        next_id = stats["next_id"]
        store.close()

        dataset = ds.dataset(directory, format="ipc")
        ids = dataset.to_table().column("id").to_pylist() if dataset.files else []
        assert len(ids) == len(set(ids)) == manifest_rows(directory)
    assert left_mid_write >= 1  # at least one kill really landed in the middle of a write
