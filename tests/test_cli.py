"""The command line: clear one-line errors for bad input, and a tiny end-to-end run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "pipelines" / "configs" / "gmm25.yaml"
# A small version of the shipped config, so that the tests run in seconds.
TINY = [
    "task.num_steps=20", "task.hidden=32", "task.pretrain.steps=150",
    "task.pretrain.batch_size=256", "task.pretrain.stats_samples=2000",
    "train.steps=20", "train.batch_size=32", "eval.every_steps=10", "eval.num_samples=200",
    "eval.final_num_samples=300", "checkpoint_every_steps=10",
]


def user_env(cache: Path | str) -> dict[str, str]:
    """A user's environment for the CLI under test: without the Ray settings this test process
    made for itself (conftest.py), with its own prior cache. It keeps MLFLOW_TRACKING_URI, the
    suite's store (conftest.py ``mlflow_store``), so that runs stay out of ./mlflow.db of the
    repository, where the CLI runs."""
    from conftest import SET_FOR_THE_SUITE

    env = {k: v for k, v in os.environ.items() if k not in SET_FOR_THE_SUITE}
    return {**env, "RTB_RAY_CACHE": str(cache)}


def rtb_ray(*args: str, cache: Path, check: bool = False, cwd: Path = ROOT,
            env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """``rtb-ray ARGS`` in ``cwd`` with a user's environment, changed by ``env`` (None: unset).
    Outside the repository this tree goes first on PYTHONPATH, as ``python -m`` puts it there
    when run from the repository."""
    full = user_env(cache)
    if cwd != ROOT:
        full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full.get("PYTHONPATH")]))
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    proc = subprocess.run([sys.executable, "-m", "rtb_ray.cli", *args], capture_output=True,
                          text=True, env=full, cwd=cwd, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def default_sigint() -> None:
    """For Popen(preexec_fn=...): Ctrl-C must reach the CLI under test even when this test
    process inherited an ignored SIGINT (as background jobs of non-interactive shells do)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.bacth_size=64", "train.bacth_size: unknown key"),
        ("train.batch_size=-4", "train.batch_size: Input should be greater than or equal to 1"),
        ("task.num_steps=0", "task.num_steps: Input should be greater than or equal to 1"),
        ("train.objective.kind=ppo", "train.objective.kind"),
        ("train.sources={posterior: 1, replay: 1}", "unknown source 'replay'"),
        ("task.name=__init__", "must define Config (a pydantic model) and make_task"),
        ("task.name=123", "task name must be a non-empty string (got 123)"),
        ("task.name=null", "task name must be a non-empty string (got None)"),
        ("task.name=[a, b]", "task name must be a non-empty string (got ['a', 'b'])"),
        # on Ray the learner trains where Ray gives it a GPU: none asked for, refused up front
        ("device=cuda", "device: cuda on Ray needs runtime.learner_num_gpus >= 1"),
        # sizes that are typos, not settings: refused before anything allocates them
        ("eval.num_samples=100000000", "eval.num_samples: Input should be less than or equal"),
        ("task.num_steps=1000000", "task.num_steps: Input should be less than or equal to 10000"),
        ("replay.capacity=99999999999", "replay.capacity: Input should be less than or equal"),
        # checked against the task (T = 100 here) before Ray starts or the prior is pretrained
        ("train.mass_covering={weight: 1, first_steps: 999}",
         "train.mass_covering.first_steps: 999 is more than the task's 100 steps"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, override, expected):
    proc = rtb_ray("train", str(CONFIG), "--set", override, "--output", str(tmp_path / "run"),
                   cache=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_missing_prior_without_pretraining_is_a_clear_error(tmp_path):
    proc = rtb_ray("train", str(CONFIG), "--set", "task.pretrain_if_missing=false",
                   "--set", f"task.prior_checkpoint={tmp_path}/nope.pt", cache=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "nope.pt does not exist and pretrain_if_missing is false" in proc.stderr


@pytest.mark.parametrize("command", [["train", str(CONFIG), "--output", "RUN"],
                                     ["train", str(CONFIG), "--in-process", "--output", "RUN"],
                                     ["pretrain", "gmm25"]])
def test_a_missing_prior_is_pretrained_with_the_configured_torch_threads(
        command, tmp_path, cache_dir, one_thread, monkeypatch):
    """By the driver (on Ray), by prepare (in process) or by `rtb-ray pretrain`: under
    torch_threads (3 here; this process runs on 1), not torch's default."""
    from pipelines.gmm25 import GMM25Task
    from rtb_ray.cli import main

    threads = []

    def pretrain(self: GMM25Task, progress: bool = True) -> dict:
        threads.append(torch.get_num_threads())
        raise ValueError("stopped before pretraining")  # exit 2: nothing else runs

    monkeypatch.setattr(GMM25Task, "pretrain", pretrain)
    args = [str(tmp_path / "run") if a == "RUN" else a for a in command]
    assert main([*args, "--set", "torch_threads=3"]) == 2
    assert threads == [3]


def test_no_progress_hides_the_pretraining_bars_too(tmp_path):
    """A missing prior is pretrained (task.prior()) before training: its bar shows unless
    --no-progress, which leaves no tqdm bar on stderr at all."""
    args = ["train", str(CONFIG), "--in-process", "--no-mlflow", *sets(TINY),
            "--set", "train.steps=1"]  # the prior is what matters here
    shown = rtb_ray(*args, "--output", str(tmp_path / "shown"), cache=tmp_path / "a", check=True)
    assert "pretrain prior:" in shown.stderr and "%|" in shown.stderr, shown.stderr[-2000:]
    quiet = rtb_ray(*args, "--no-progress", "--output", str(tmp_path / "quiet"),
                    cache=tmp_path / "b", check=True)
    assert list((tmp_path / "b" / "gmm25").glob("prior-*.pt"))  # it did pretrain
    assert "%|" not in quiet.stderr and "it/s" not in quiet.stderr, quiet.stderr[-2000:]


def test_help_explains_the_commands(tmp_path):
    out = rtb_ray("--help", cache=tmp_path).stdout
    for word in ("train", "pretrain", "sample", "examples"):
        assert word in out
    assert "--resume" in rtb_ray("train", "--help", cache=tmp_path).stdout


def test_ctrl_c_checkpoints_and_resume_continues(tmp_path, cache):
    run = tmp_path / "run"
    long = [o for o in TINY if not o.startswith(("train.steps", "checkpoint_every"))]
    args = ["train", str(CONFIG), "--in-process", "--no-progress", "--output", str(run), *sets(long),
            "--set", "train.steps=100000", "--set", "checkpoint_every_steps=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "rtb_ray.cli", *args], cwd=ROOT,
                            env=user_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    try:
        stopped_at = _interrupt_a_live_run(proc, run, long, cache)
    finally:  # a failing check must not leave the run training through the rest of the suite
        if proc.poll() is None:
            proc.kill()
    rtb_ray("train", str(CONFIG), "--in-process", "--no-progress", "--output", str(run), "--resume",
            *sets(long), "--set", f"train.steps={stopped_at + 10}", cache=cache, check=True)
    final = json.loads((run / "final_eval.json").read_text())
    assert final["step"] == stopped_at + 10


def _interrupt_a_live_run(proc: subprocess.Popen, run: Path, long: list[str], cache: Path) -> int:
    """Wait for training, check that the directory is the run's own, then Ctrl-C it."""
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run / "metrics.jsonl").exists() and '"train"' in (run / "metrics.jsonl").read_text()
    ):
        time.sleep(0.2)
    # while it runs, the directory is its own: neither runtime may resume or restart into it
    config_before = (run / "config.yaml").read_bytes()
    for extra in (["--in-process", "--resume"], ["--resume"], ["--in-process"]):
        busy = rtb_ray("train", str(CONFIG), *extra, "--output", str(run), *sets(long),
                       cache=cache)
        assert busy.returncode == 2 and "is in use by a live run (pid" in busy.stderr, busy.stderr
        assert len(busy.stderr.strip().splitlines()) == 1
    assert (run / "config.yaml").read_bytes() == config_before
    assert not (run / "runtime.json").exists()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "checkpoint saved" in out
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    stopped_at = ckpt["learner"]["step"]
    assert stopped_at >= 50
    return stopped_at


def test_train_resume_sample_end_to_end(tmp_path, cache):
    run = tmp_path / "run"
    half = [o if not o.startswith("train.steps") else "train.steps=10" for o in TINY]
    rtb_ray("train", str(CONFIG), "--in-process", "--no-progress", "--output", str(run),
            *sets(half), cache=cache, check=True)
    # a finished run is not overwritten by accident
    again = rtb_ray("train", str(CONFIG), "--output", str(run), *sets(TINY), cache=cache)
    assert again.returncode == 2 and "--resume" in again.stderr
    # nor continued with a network of another shape, by either runtime (before Ray starts)
    before = (run / "checkpoint.pt").read_bytes()
    for runtime in (["--in-process"], []):
        other = rtb_ray("train", str(CONFIG), *runtime, "--resume", str(run), *sets(TINY),
                        "--set", "task.hidden=16", cache=cache)
        assert other.returncode == 2 and "another shape" in other.stderr, other.stderr
    assert (run / "checkpoint.pt").read_bytes() == before
    # resume continues from step 10 to 20 (train.steps raised on the command line)
    rtb_ray("train", str(CONFIG), "--in-process", "--no-progress", "--output", str(run), "--resume",
            *sets(TINY), cache=cache, check=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20]
    final = json.loads((run / "final_eval.json").read_text())
    for key in ("tv_target", "tv_analytic", "modes_hit", "forbidden_mass", "elbo", "eubo",
                "elbo_gap", "iw_log_z", "ess_fraction", "mean_log_reward", "log_z_error",
                "sliced_w2_analytic"):
        assert np.isfinite(final[key]), key
    assert final["step"] == 20 and final["num_samples"] == 300
    assert (run / "eval" / "step_20.png").stat().st_size > 1000

    npz = tmp_path / "samples.npz"
    rtb_ray("sample", str(run), "--n", "123", "--out", str(npz), cache=cache, check=True)
    data = np.load(npz)
    assert data["x"].shape == (123, 2) and data["logw"].shape == (123,)
    assert np.isfinite(data["logw"]).all()
    bare = rtb_ray("sample", str(run), "--n", "5", "--out", str(tmp_path / "bare"), cache=cache)
    assert f"to {tmp_path / 'bare.npz'} " in bare.stdout  # the file numpy wrote, named as such


@pytest.mark.parametrize("content,expected", [
    ('{"run": "r", "namespace": "rtb-ray", "coordinator": "r/coordinator"}', "HOST:PORT"),
    ('{"run": "r", "namespace": "rtb-ray", "coordinator": "c", "address": "auto"}', "HOST:PORT"),
    ('{"run": "r", "namespace": "rtb-ray", "address": "127.0.0.1:1"}', "'coordinator'"),
    ("[1, 2]", "HOST:PORT"),
    ("{not json", "not JSON"),
    (None, "has no runtime.json"),
])
@pytest.mark.parametrize("command", [["status"], ["scale", "--role", "posterior=2"]])
def test_status_and_scale_refuse_a_bad_runtime_file(tmp_path, content, expected, command):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "runtime.json").write_text(content)
    before = sorted(p.name for p in run.iterdir())
    proc = rtb_ray(command[0], str(run), *command[1:], cache=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and expected in proc.stderr, proc.stderr
    assert sorted(p.name for p in run.iterdir()) == before


def test_scale_refuses_bad_counts_before_joining(tmp_path):
    """Nothing is joined (no runtime.json here): the counts are refused first."""
    for args, expected in ((["--workers", "99999999999999999999"], "--workers must be in"),
                           (["--workers", "0"], "--workers must be in"),
                           (["--role", "posterior=x"], "expected ROLE=N"),
                           (["--role", "critic=1"], "unknown role 'critic'"),
                           (["--role", "prior=1", "--role", "posterior=5000"], "0..1024")):
        proc = rtb_ray("scale", str(tmp_path), *args, cache=tmp_path)
        assert proc.returncode == 2 and expected in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1


BAD_CONFIG_FILES = {
    "duplicate_key.yaml": ("task: {name: gmm25}\nseed: 1\ntask: {name: digits}\n",
                           "duplicate key 'task'"),
    "bool_seed.yaml": ("task: {name: gmm25}\nseed: true\n", "seed: Input should be a valid integer"),
    "deep.yaml": ("[" * 20_000 + "]" * 20_000 + "\n", "nested too deeply"),
    "huge.yaml": ("# " + "x" * (2 << 20) + "\n", "not a config file"),
}


@pytest.mark.parametrize("name", [*BAD_CONFIG_FILES, "a_directory", "/dev/zero"])
def test_a_bad_config_file_is_one_clear_line(tmp_path, name):
    path = Path(name) if name.startswith("/") else tmp_path / name
    if name == "a_directory":
        path.mkdir()
        expected = "not a config file"
    elif name in BAD_CONFIG_FILES:
        text, expected = BAD_CONFIG_FILES[name]
        path.write_text(text)
    else:
        expected = "not a config file"
    proc = rtb_ray("train", str(path), "--in-process", "--output", str(tmp_path / "run"),
                   cache=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", [
    "train.lr=.inf", "train.objective.beta=.inf", "runtime.worker_num_cpus=.inf",
    "train.explore.start=.inf", "task.sigma=.inf", "train.objective.log_reward_floor=.nan",
    "train.sources={posterior: .nan}",
])
def test_non_finite_settings_are_refused(tmp_path, override):
    proc = rtb_ray("train", str(CONFIG), "--in-process", "--set", override, "--output",
                   str(tmp_path / "run"), cache=tmp_path)
    assert proc.returncode == 2 and "finite number" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and override.split("=")[0] in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,expected", [
    ("replay.capacity=10", "min_size_to_sample (1024) must be <= capacity (10)"),
    ("replay.segment_rows=1000000000", "segment_rows (1000000000) must be <= capacity"),
])
def test_a_store_that_could_never_fill_is_refused(tmp_path, override, expected):
    proc = rtb_ray("train", str(CONFIG), "--set", override, "--output", str(tmp_path / "run"),
                   cache=tmp_path)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


class _RunsCode:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned",))


def _bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    """Files a user might point a checkpoint setting at by mistake (or an attacker on purpose)."""
    files = {"random": os.urandom(4096), "empty": b"", "code": None}
    out = {}
    for name, data in files.items():
        path = tmp_path / f"{name}.pt"
        if data is None:
            torch.save({"format": "rtb-ray-prior/1", "x": _RunsCode()}, path)
        else:
            path.write_bytes(data)
        out[name] = path
    (tmp_path / "folder.pt").mkdir()
    out["folder"] = tmp_path / "folder.pt"
    out["passwd"] = Path("/etc/passwd")
    return out


def test_a_bad_prior_checkpoint_is_one_clear_line(tmp_path):
    for name, path in _bad_checkpoints(tmp_path).items():
        proc = rtb_ray("train", str(CONFIG), "--in-process", "--output", str(tmp_path / "run"),
                       "--set", f"task.prior_checkpoint={path}",
                       "--set", "task.pretrain_if_missing=false", cache=tmp_path)
        assert proc.returncode == 2, (name, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (name, proc.stderr)
        assert "is not an rtb-ray prior checkpoint" in proc.stderr, (name, proc.stderr)
        assert "weights_only=False" not in proc.stderr and "pwned" not in proc.stdout
        assert not (tmp_path / "run").exists()


def test_a_bad_run_checkpoint_is_one_clear_line(tmp_path, cache):
    from rtb_ray.config import config_to_dict, load_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(json.dumps(config_to_dict(load_config(CONFIG, TINY))))
    for name, path in _bad_checkpoints(tmp_path).items():
        target = run / "checkpoint.pt"
        if target.is_dir():
            target.rmdir()
        elif target.exists():
            target.unlink()
        if path.is_dir():
            target.mkdir()
        else:
            target.write_bytes(path.read_bytes())
        for args in (["sample", str(run), "--n", "5", "--out", str(tmp_path / "s.npz")],
                     ["train", str(CONFIG), "--in-process", "--resume", str(run), *sets(TINY)]):
            proc = rtb_ray(*args, cache=cache)
            assert proc.returncode == 2, (name, args[0], proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1, (name, args[0], proc.stderr)
            assert "checkpoint.pt is not an rtb-ray run checkpoint" in proc.stderr
            assert "weights_only=False" not in proc.stderr
    assert not (tmp_path / "s.npz").exists() and not (run / "metrics.jsonl").exists()


def test_an_output_that_cannot_be_created_is_one_clear_line(tmp_path, cache):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = rtb_ray("train", str(CONFIG), "--output", str(blocker / "run"), *sets(TINY),
                   cache=cache)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "a-file" in proc.stderr and "Traceback" not in proc.stderr


def test_a_local_run_never_joins_a_ray_already_running_here(tmp_path, cache):
    """Without --address a run starts its own Ray: Ray's default would join the newest cluster
    started on this machine (a user's `ray start`, another run's or test's) and share it."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        run = tmp_path / "run"
        rtb_ray("train", str(CONFIG), "--no-progress", "--output", str(run), *sets(TINY),
                cache=cache, check=True)
        assert json.loads((run / "runtime.json").read_text())["address"] != cluster.address
    finally:
        cluster.shutdown()
