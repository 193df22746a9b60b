"""The README's "Add a task": a task in a file outside the repository, written against the
documented contract only (docs/examples/ring_task.py, copied elsewhere), trains on both runtimes
and exports samples."""

from __future__ import annotations

import json
import shutil

import numpy as np
import yaml

from test_cli import ROOT, rtb_ray


def test_a_task_from_outside_trains_on_both_runtimes_and_exports_samples(tmp_path):
    task_file = tmp_path / "my_tasks" / "ring.py"
    task_file.parent.mkdir()
    shutil.copy(ROOT / "docs" / "examples" / "ring_task.py", task_file)
    config = tmp_path / "ring.yaml"
    config.write_text(yaml.safe_dump({
        "task": {"name": str(task_file), "num_steps": 10, "hidden": 16},
        "train": {"steps": 20, "batch_size": 32, "sources": {"posterior": 0.5, "prior": 0.25,
                                                             "backward": 0.25}},
        "eval": {"every_steps": 10, "num_samples": 200, "final_num_samples": 300},
        "checkpoint_every_steps": 10,
        "tracking": {"log_model": False},
        "replay": {"min_size_to_sample": 64, "samples_per_insert": 2.0},
        "runtime": {"rollout_batch_size": 32, "worker_num_cpus": 0.1},
    }))
    for runtime in (["--in-process"], []):
        run = tmp_path / f"run-{len(runtime)}"
        done = rtb_ray("train", str(config), *runtime, "--no-progress", "--output", str(run),
                       cache=tmp_path / "cache")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "radius_error=" in done.stdout  # the task's own progress metrics
        final = json.loads((run / "final_eval.json").read_text())
        assert final["step"] == 20 and np.isfinite(final["radius_error"])
        assert yaml.safe_load((run / "config.yaml").read_text())["task"]["name"] == str(task_file)
        assert "(experiment 'ring')" in done.stdout  # named by the task, not by its file
        npz = tmp_path / f"samples-{len(runtime)}.npz"
        exported = rtb_ray("sample", str(run), "--n", "50", "--out", str(npz),
                           cache=tmp_path / "cache")
        assert exported.returncode == 0, exported.stderr
        data = np.load(npz)
        assert data["x"].shape == (50, 2) and np.isfinite(data["logw"]).all()
