"""`ray job submit` on a local Ray whose job server (the dashboard) listens on 127.0.0.1 only:
the README's recipe, run as a user runs it, from the repository root with the venv activated:

    export RAY_AUTH_MODE=token
    ray get-auth-token --generate
    ray start --head --dashboard-host=127.0.0.1
    ray job submit --no-wait --working-dir . --runtime-env-json '{"env_vars": {...}}' -- \\
      rtb-ray train pipelines/configs/gmm25.yaml --address auto --output ABS --tracking-uri ...
    ray job logs --follow JOB_ID
    ray job stop JOB_ID
    ray job submit --working-dir . ... -- rtb-ray train pipelines/configs/gmm25.yaml \\
      --address auto --resume ABS

(here on free ports and a temp dir of its own: tests/ray_head.py). What it relies on:

- The `ray job` commands need RAY_AUTH_MODE=token in the user's shell too: without it they send
  no token (~/.ray/auth_token) and the job server answers 401.
- `ray job stop` sends SIGTERM; Ray's job supervisor SIGKILLs the entrypoint
  RAY_JOB_STOP_WAIT_TIME_S (default 3) seconds later, too soon for a run to checkpoint, stop its
  actors and end its MLflow run. The job's runtime_env env_vars reach the supervisor (an actor
  with that runtime_env), which reads it from its environment when it stops the job.
- The entrypoint runs in a copy of the working directory (what .gitignore leaves, less .git and
  .venv, which Ray leaves out by default): relative paths would be lost with it, so the run
  directory and the MLflow store are absolute paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")

from ray_head import RAY_CLI, RayHead, ray_head, session_pids  # noqa: E402
from test_cli import ROOT, sets  # noqa: E402
from test_runtime import RUNTIME, learner_step, wait_for  # noqa: E402

ENV_VARS = {"RAY_JOB_STOP_WAIT_TIME_S": "120"}
TRAIN = ["rtb-ray", "train", "pipelines/configs/gmm25.yaml", "--address", "auto"]
SHORT = [o for o in RUNTIME if not o.startswith("train.steps=")]


def ray_job(head: RayHead, *args: str, timeout: float = 120) -> str:
    """``ray job ARGS`` from the repository root in a user's shell (RAY_AUTH_MODE=token
    exported, as for `ray start`); returns its output, checked."""
    proc = subprocess.run([RAY_CLI, "job", *args[:1], "--address", head.job_server, *args[1:]],
                          cwd=ROOT, env=head.env, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def shown_steps(logs: str) -> list[int]:
    """The steps the driver's `train` bar showed (tqdm: ``train:  0%| | 75/100000 [...]``)."""
    return [int(n) for n in re.findall(r"train:[^\r\n|]*\|[^|]*\|\s*(\d+)/\d+", logs)]


def supervisor_env(head: RayHead, entrypoint: str) -> dict[str, str]:
    """The environment of the job supervisor (a Ray worker of the head) that started the
    entrypoint whose command line has ``entrypoint``: the entrypoint runs in a session of its
    own, its parent in the head's."""
    for pid in session_pids(head.pid):
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
            if (entrypoint in Path(f"/proc/{pid}/cmdline").read_text()
                    and os.getsid(parent) == head.pid):
                return dict(v.split("=", 1) for v in Path(f"/proc/{parent}/environ").read_text(
                    errors="replace").split("\0") if "=" in v)
        except OSError:  # gone meanwhile
            pass
    raise AssertionError(f"no entrypoint {entrypoint!r} under the head")


def test_ray_job_submit_logs_stop_and_resume(tmp_path, cache):
    runs = tmp_path / "rtb-runs"  # the recipe's $HOME/rtb-runs
    run, store = runs / "gmm25", f"sqlite:///{runs / 'mlflow.db'}"
    env_json = json.dumps({"env_vars": ENV_VARS})
    took, t0 = {}, time.monotonic()
    with ray_head(tmp_path, cache, dashboard=True, name="rtb-job-") as head:
        took["head"] = time.monotonic() - t0
        t = time.monotonic()
        out = ray_job(head, "submit", "--no-wait", "--working-dir", ".",
                      "--runtime-env-json", env_json, "--",
                      *TRAIN, "--output", str(run), "--tracking-uri", store, *sets(RUNTIME))
        job_id = re.search(r"raysubmit_\w+", out).group()
        uploaded = [u.rstrip(".") for u in re.findall(r"Uploading package (\S+)", out)]
        follow_log = tmp_path / "follow.log"
        with open(follow_log, "w") as f:
            follow = subprocess.Popen(
                [RAY_CLI, "job", "logs", "--address", head.job_server, "--follow", job_id],
                cwd=ROOT, env=head.env, stdout=f, stderr=subprocess.STDOUT)
        try:
            def ended() -> str:
                return f"the job ended:\n{follow_log.read_text()[-3000:]}" \
                    if follow.poll() is not None else ""

            wait_for("training", lambda: ended() or learner_step(run) >= 25, timeout=120)
            assert not ended(), ended()
            took["submit to step 25"] = time.monotonic() - t
            # the driver's progress bar, as `ray job logs` shows it (refreshed each second)
            wait_for("progress in ray job logs", lambda: ended() or any(
                n > 0 for n in shown_steps(follow_log.read_text())), timeout=60)
            assert not ended(), ended()
            # the stop timeout reached the job's supervisor, which reads it from its environment
            supervisor = supervisor_env(head, str(run))
            assert supervisor.get("RAY_JOB_STOP_WAIT_TIME_S") == "120"

            t = time.monotonic()
            out = ray_job(head, "stop", job_id, timeout=180)  # waits for the job to end
            took["stop"] = time.monotonic() - t
            assert f"Job '{job_id}' was stopped" in out  # its status is STOPPED
            follow.wait(timeout=60)  # it ends with the job
            follow_out = follow_log.read_text()
            assert follow.returncode == 0, follow_out[-3000:]
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
        supervisor_log = (head.logs / "jobs" / f"supervisor-{job_id}.log").read_text()
        assert "terminated gracefully with SIGTERM" in supervisor_log, supervisor_log[-3000:]

        # `ray job logs --follow` followed it to the end: the run checkpointed on SIGTERM
        assert "run directory:" in follow_out, follow_out[-3000:]
        assert "SIGTERM: stopping at the next step" in follow_out, follow_out[-3000:]
        step = int(re.search(r"interrupted at step (\d+): checkpoint saved", follow_out)[1])
        assert step >= 25 and max(shown_steps(follow_out)) <= step
        saved = torch.load(run / "checkpoint.pt", weights_only=True)["learner"]["step"]
        assert saved == step
        record = json.loads((run / "mlflow_run.json").read_text())
        import mlflow

        client = mlflow.MlflowClient(record["tracking_uri"])
        assert record["tracking_uri"] == store
        assert client.get_run(record["run_id"]).info.status == "KILLED"
        rows_before = len((run / "metrics.jsonl").read_text().splitlines())

        # resumed, 50 steps more (train.steps raised on the command line), followed to its end
        t = time.monotonic()
        out = ray_job(head, "submit", "--working-dir", ".", "--runtime-env-json", env_json, "--",
                      *TRAIN, "--resume", str(run), *sets(SHORT + [f"train.steps={step + 50}"]),
                      timeout=180)
        took["resumed run"] = time.monotonic() - t
        assert re.search(r"Job 'raysubmit_\w+' succeeded", out), out[-3000:]
        assert "final metrics:" in out

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    new = [r["step"] for r in rows[rows_before:] if r["kind"] == "train"]
    # the learner went on from the checkpoint's step, not from 0, to the raised train.steps
    assert new and min(new) > step and min(new) <= step + 25 and max(new) <= step + 50, new
    assert learner_step(run) <= step + 50 and (run / "final_eval.json").exists()
    mlflow_run = client.get_run(record["run_id"])  # the same MLflow run, continued
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["resumed_at_step"] == str(step)
    took["total"] = time.monotonic() - t0
    print(f"stopped at step {step}; uploaded {uploaded}; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in took.items()))


def test_the_readme_shows_the_recipe_this_test_runs():
    """README.md's `ray job` lines are the commands above, flag for flag."""
    readme = (ROOT / "README.md").read_text()
    env_json = json.dumps({"env_vars": ENV_VARS})
    submit = f"--working-dir . --runtime-env-json '{env_json}' -- \\\n  {' '.join(TRAIN)}"
    assert f"ray job submit --no-wait {submit} --output " in readme
    assert f"ray job submit {submit} --resume " in readme
    assert "export RAY_AUTH_MODE=token" in readme and "--dashboard-host=127.0.0.1" in readme
    assert "ray job logs --follow JOB_ID" in readme and "ray job stop JOB_ID" in readme
