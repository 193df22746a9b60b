"""The Ray runtime end to end, on a real local Ray: `rtb-ray train` as a subprocess, driven the
way a user would (`rtb-ray status`, `rtb-ray scale`, Ctrl-C, SIGKILL + --resume, a second node
that goes away), checked against the run directory, the replay store on disk and MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
import torch

ray = pytest.importorskip("ray")

from test_cli import CONFIG, ROOT, TINY, default_sigint, rtb_ray, sets, user_env  # noqa: E402

# A run that goes on until stopped: the tests act on it while it trains.
RUNTIME = [o for o in TINY if not o.startswith(("train.steps", "checkpoint_every"))] + [
    "train.steps=100000", "checkpoint_every_steps=25", "train.log_every_steps=25",
    "eval.every_steps=100000",
    "runtime.rollout_batch_size=32", "runtime.worker_num_cpus=0.1",
    "replay.min_size_to_sample=64", "replay.samples_per_insert=4",
    "tracking.log_model=false",
]


def start(run: Path, cache: Path, *extra: str, overrides: list[str] = RUNTIME
          ) -> subprocess.Popen:
    args = ["train", str(CONFIG), "--no-progress", "--output", str(run), *extra,
            *sets(overrides)]
    return subprocess.Popen([sys.executable, "-m", "rtb_ray.cli", *args], cwd=ROOT,
                            env=user_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=default_sigint)


def wait_for(what: str, check, proc: subprocess.Popen | None = None, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) while waiting for "
                                 f"{what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def status(run: Path, cache: Path) -> dict:
    """``rtb-ray status --json`` as a user runs it (no Ray variables of this test process)."""
    if not (run / "runtime.json").exists():  # the driver is still starting
        return {"workers": [], "totals": {"replaced": 0}}
    proc = rtb_ray("status", str(run), "--json", cache=cache)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def learner_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((r["step"] for r in rows if r["kind"] == "train"), default=0)


def active(s: dict, role: str) -> list[dict]:
    return [w for w in s["workers"] if w["role"] == role and not w["retiring"]]


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> str:
    """Ctrl-C (or SIGTERM, what job managers send); the run must checkpoint and exit 130 (a
    run that does not is killed, with its Ray, so that a failing test leaves nothing running)."""
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 130, out[-3000:]
    return out


def stored_rows(run: Path):
    return ds.dataset(run / "replay", format="ipc").to_table()


def check_nothing_lost(run: Path) -> dict:
    """Every trajectory a worker call reported inserted is in the store, and every stored row
    is on disk once the store is closed."""
    final = json.loads((run / "runtime_status.json").read_text())
    store = final["replay"]
    assert store["inserted"] >= final["totals"]["inserted"] > 0
    assert store["sealed_rows"] == store["inserted"]  # this session's rows, all on disk
    assert stored_rows(run).num_rows == store["loaded"] + store["sealed_rows"]
    return final


def test_kill_and_scale_workers_while_training(tmp_path, cache):
    run = tmp_path / "run"
    proc = start(run, cache)
    try:
        wait_for("training", lambda: learner_step(run) >= 50, proc)
        s = status(run, cache)
        assert {r: len(active(s, r)) for r in ("posterior", "prior", "backward")} == {
            "posterior": 1, "prior": 1, "backward": 1}
        t0 = time.monotonic()
        assert "posterior" in rtb_ray("status", str(run), cache=cache).stdout
        # ~2 s on two busy cores; a process that joins without token authentication instead
        # retries for ~30 s and fails, so this loose bound tells the two apart
        assert time.monotonic() - t0 < 15

        # kill the posterior worker: the coordinator replaces it and training goes on
        info = json.loads((run / "runtime.json").read_text())
        assert info["address"].startswith("127.0.0.1:")  # the local Ray binds loopback only
        victim = active(s, "posterior")[0]["name"]
        from actors.session import init_ray

        init_ray(info["address"], info["namespace"])
        try:
            ray.kill(ray.get_actor(victim))
        finally:
            ray.shutdown()
        step = learner_step(run)
        s = wait_for("a replacement worker", lambda: (lambda s: s if s["totals"]["replaced"] >= 1
                     and len(active(s, "posterior")) == 1 and active(s, "posterior")[0]["calls"]
                     > 0 else None)(status(run, cache)), proc)
        assert active(s, "posterior")[0]["name"] != victim
        wait_for("training after the kill", lambda: learner_step(run) > step + 25, proc)

        # scale 1 → 3 → 1 posterior workers, without a restart; repeated --role flags all apply
        up = rtb_ray("scale", str(run), "--role", "posterior=3", "--role", "prior=0", cache=cache)
        assert up.returncode == 0, up.stderr
        s = wait_for("3 posterior workers sampling", lambda: (lambda s: s if len(
            [w for w in active(s, "posterior") if w["calls"] > 0]) == 3 else None)(
            status(run, cache)), proc)
        assert s["targets"] == {"posterior": 3, "prior": 0, "backward": 1, "dataset": 0}
        assert rtb_ray("scale", str(run), "--role", "posterior=1", "--role", "prior=1",
                       cache=cache).returncode == 0
        s = wait_for("back to 1 posterior worker", lambda: (lambda s: s if len(
            [w for w in s["workers"] if w["role"] == "posterior"]) == 1 else None)(
            status(run, cache)), proc)
        assert s["totals"]["retired"] == 3  # two posterior workers and the prior one
        for bad_role, message in (("critic=2", "critic"),
                                  ("posterior=0,prior=0,backward=0", "at least one rollout"),
                                  ("posterior=99999999999999999999", "0..1024")):
            bad = rtb_ray("scale", str(run), "--role", bad_role, cache=cache)
            assert bad.returncode == 2 and message in bad.stderr, bad.stderr
            assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert status(run, cache)["targets"] == {"posterior": 1, "prior": 1, "backward": 1,
                                                "dataset": 0}
        step = learner_step(run)
        wait_for("training after scaling", lambda: learner_step(run) > step + 25, proc)
    finally:
        out = stop(proc) if proc.poll() is None else proc.stdout.read()
    assert "checkpoint saved" in out
    final = check_nothing_lost(run)
    assert final["totals"]["replaced"] == 1
    # the store of the run holds both roles' trajectories, and the learner's versions
    table = stored_rows(run)
    sources = set(table.column("source").to_pylist())
    assert {"prior", "backward"} <= sources and sources & {"posterior", "explore"}
    posterior = table.filter(pc.is_in(table.column("source"),
                                      value_set=__import__("pyarrow").array(["posterior",
                                                                             "explore"])))
    assert pc.max(posterior.column("policy_version")).as_py() > 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert {"staleness_p50", "staleness_p90", "staleness_max", "workers_posterior",
            "trajectories_per_s"} <= set(train[-1])


def kill_actor(run: Path, role: str, restart: bool = False) -> None:
    """ray.kill the run's ``role`` actor (learner, store...); ``restart``: let Ray restart it."""
    info = json.loads((run / "runtime.json").read_text())
    from actors.session import init_ray

    init_ray(info["address"], info["namespace"])
    try:
        ray.kill(ray.get_actor(info[role], namespace=info["namespace"]), no_restart=not restart)
    finally:
        ray.shutdown()


def test_killed_learner_and_store_are_restarted_then_the_run_ends_cleanly(tmp_path, cache):
    """One live run, three kills: the learner (restarted from its checkpoint), the store
    (restarted by Ray from its sealed segments), the learner again past its restarts (the run
    ends FAILED with a resume hint). The healthy store loses nothing throughout."""
    run = tmp_path / "run"
    proc = start(run, cache, overrides=RUNTIME + ["runtime.learner_max_restarts=1"])
    try:
        wait_for("a checkpoint", lambda: (run / "checkpoint.pt").exists()
                 and learner_step(run) >= 50, proc)
        kill_actor(run, "learner")
        saved = torch.load(run / "checkpoint.pt", weights_only=True)["learner"]["step"]
        wait_for("training past the checkpoint again", lambda: learner_step(run) > saved + 50,
                 proc)

        sealed_before = stored_rows(run).num_rows
        kill_actor(run, "store", restart=True)
        step = learner_step(run)
        wait_for("training after the store restarted", lambda: learner_step(run) > step + 50,
                 proc)

        kill_actor(run, "learner")
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, out[-3000:]
    assert "the learner died" in out and "restarting it from the last checkpoint (1/1)" in out
    assert "Traceback" not in out and "rtb-ray: error: the learner failed" in out, out[-3000:]
    assert f"--resume {run}" in out
    # the restarted store reloaded its segments and sealed every row it acknowledged since
    store = json.loads((run / "runtime_status.json").read_text())["replay"]
    assert store["loaded"] >= min(sealed_before, store["capacity"])
    assert store["sealed_rows"] == store["inserted"] > 0
    assert stored_rows(run).num_rows == store["loaded"] + store["sealed_rows"] >= sealed_before

    import mlflow

    record = json.loads((run / "mlflow_run.json").read_text())
    mlflow_run = record["run_id"]
    client = mlflow.MlflowClient(record["tracking_uri"])
    assert client.get_run(mlflow_run).info.status == "FAILED"  # never left RUNNING
    # one MLflow run throughout: the restarted learner logged past its checkpoint
    assert max(m.step for m in client.get_metric_history(mlflow_run, "train/loss")) > saved + 50


def test_a_failed_disk_stops_the_run_with_a_checkpoint_and_one_line(tmp_path, cache):
    run = tmp_path / "run"
    proc = start(run, cache)
    try:
        wait_for("a checkpoint", lambda: (run / "checkpoint.pt").exists()
                 and learner_step(run) >= 50, proc)
        saved = torch.load(run / "checkpoint.pt", weights_only=True)["learner"]["step"]
        sealed = stored_rows(run).num_rows
        # the store's directory goes away under it (as a full or lost disk does): sealing fails
        replay = run / "replay"
        replay.rename(run / "replay.old")
        replay.write_text("not a directory")
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("rtb-ray: error:")]
    assert errors and "the learner failed: ReplayDiskError: sealing a replay segment to" in \
        errors[0] and "Not a directory" in errors[0], out[-3000:]
    assert "acknowledged rows are not on disk; checkpoint saved at step" in errors[0]
    step = int(errors[0].rsplit("checkpoint saved at step ", 1)[1].split()[0])
    assert step >= saved
    assert torch.load(run / "checkpoint.pt", weights_only=True)["learner"]["step"] == step
    assert f"--resume {run}" in out
    # nothing half-written: the sealed segments are whole and verify
    replay.unlink()
    (run / "replay.old").rename(replay)
    from rtb_ray.replay import ReplayStore

    reopened = ReplayStore(replay, capacity_trajectories=10**6)
    assert reopened.stats()["loaded"] >= sealed and reopened.verify_segments() == 0
    reopened.close()

    import mlflow

    record = json.loads((run / "mlflow_run.json").read_text())
    mlflow_run = record["run_id"]
    client = mlflow.MlflowClient(record["tracking_uri"])
    assert client.get_run(mlflow_run).info.status == "FAILED"


def test_sigkill_of_the_driver_then_resume(tmp_path, cache):
    run = tmp_path / "run"
    # with the mass-covering term on: the learner actor warm-starts once, not again on resume
    overrides = RUNTIME + ["train.mass_covering.weight=1.0", "train.mass_covering.num_samples=500",
                           "train.mass_covering.warm_start_steps=10"]
    proc = start(run, cache, overrides=overrides)
    try:
        wait_for("a checkpoint", lambda: (run / "checkpoint.pt").exists()
                 and learner_step(run) >= 50, proc)
        time.sleep(2)  # some rows sealed into segments
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["learner"]["step"]
    mlflow_run = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    on_disk = stored_rows(run).num_rows
    assert on_disk > 0

    assert json.loads((run / "mass_covering.json").read_text())["warm_start_steps"] == 10
    more = [o for o in overrides if not o.startswith("train.steps")] + [
        f"train.steps={saved + 25}"]
    again = rtb_ray("train", str(CONFIG), "--no-progress", "--resume", str(run), *sets(more),
                    cache=cache)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"continues run {mlflow_run}" in again.stdout
    final = json.loads((run / "final_eval.json").read_text())
    assert final["step"] == saved + 25
    assert "warm_start_steps" not in json.loads((run / "mass_covering.json").read_text())
    last_train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                  if '"train"' in line][-1]
    assert last_train["mass_covering_loss"] > 0
    status_file = json.loads((run / "runtime_status.json").read_text())
    assert status_file["replay"]["loaded"] == on_disk  # the store reopened its segments
    check_nothing_lost(run)

    import mlflow

    client = mlflow.MlflowClient(json.loads((run / "mlflow_run.json").read_text())["tracking_uri"])
    history = client.get_metric_history(mlflow_run, "train/loss")
    assert max(m.step for m in history) == saved + 25
    assert client.get_run(mlflow_run).data.tags["resumed_at_step"] == str(saved)


def test_two_node_cluster_survives_losing_a_node(tmp_path, cache):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    second = cluster.add_node(num_cpus=2, resources={"second_node": 1})
    cluster.wait_for_nodes()
    run = tmp_path / "run"
    try:
        # the README's "Run on a cluster" commands: train against the cluster, status, scale
        proc = start(run, cache, "--address", cluster.address, overrides=RUNTIME + [
            "runtime.workers={posterior: 2, prior: 1, backward: 1}"])
        try:
            s = wait_for("workers on both nodes", lambda: (lambda s: s if len(
                {w["node"] for w in s["workers"] if w["calls"] > 0}) == 2 else None)(
                status(run, cache)), proc)
            assert second.node_id in {w["node"] for w in s["workers"]}
            assert rtb_ray("scale", str(run), "--workers", "5", cache=cache).returncode == 0
            wait_for("5 workers", lambda: len(status(run, cache)["workers"]) == 5, proc)
            cluster.remove_node(second)
            step = learner_step(run)
            s = wait_for("replacements on the head", lambda: (lambda s: s if
                         s["totals"]["replaced"] >= 1 and len(
                             [w for w in s["workers"] if w["calls"] > 0]) == 5 else None)(
                status(run, cache)), proc)
            assert {w["node"] for w in s["workers"] if w["calls"] > 0} == {
                cluster.head_node.node_id}
            wait_for("training after the node left", lambda: learner_step(run) > step + 25, proc)
        finally:
            out = stop(proc, signal.SIGTERM) if proc.poll() is None else proc.stdout.read()
        assert "checkpoint saved" in out
        final = check_nothing_lost(run)
        assert len(final["inserted_by_node"]) == 2
    finally:
        cluster.shutdown()
