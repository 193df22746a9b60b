"""MLflow tracking against a real SQLite store: what is logged lands there and reads back."""

from __future__ import annotations

import importlib.metadata
import json
import math
import subprocess
import time
from pathlib import Path

import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient

from rtb_ray.cli import build_parser, main, tracking_overrides
from rtb_ray.config import ConfigError, load_config, validate_config
from rtb_ray.networks import TimeMLP
from rtb_ray.tracking import (
    MAX_PARAM_VALUE,
    RUN_FILE,
    MlflowTracker,
    TrackingError,
    download_model_files,
    normalize_tracking_uri,
    open_run_tracker,
    run_tags,
    sqlite_path,
    sqlite_uri,
    tracking_request,
)
from test_cli import CONFIG, ROOT, TINY, rtb_ray, sets


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module: creating one runs MLflow's migrations (seconds)."""
    return sqlite_uri(tmp_path_factory.mktemp("store") / "mlflow.db")


def make_tracker(store: str, **kwargs) -> MlflowTracker:
    return MlflowTracker(store, "exp", run_name="r", **kwargs)


def slow_store(monkeypatch, seconds: float) -> None:
    """Every metric write of the SQLite store takes ``seconds`` longer (tags and params do not)."""
    write = SqlAlchemyStore._log_metrics

    def slow(self, run_id, metrics):
        if metrics:
            time.sleep(seconds)
        return write(self, run_id, metrics)

    monkeypatch.setattr(SqlAlchemyStore, "_log_metrics", slow)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_params_tags_metrics_and_artifacts_land_in_the_store(store, tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # nothing may land in the working directory (./mlruns)
    tracker = MlflowTracker(store, "params-tags", run_name="r1")
    tracker.set_tags(run_tags(ray_address="ray://head:10001"))
    tracker.log_params({"train": {"lr": 0.001, "sources": {"posterior": 0.5}},
                        "task": {"name": "gmm25", "prior_checkpoint": None}, "long": "x" * 7000})
    for step in range(0, 100, 10):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/log_z": 0.1 * step}, step)
    png, js = tmp_path / "step_10.png", tmp_path / "step_10.json"
    png.write_bytes(b"\x89PNG fake image bytes")
    js.write_text('{"tv_target": 0.1}')
    tracker.log_artifact(png, "eval")
    tracker.log_artifact(js, "eval")
    tracker.close()

    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    params = run.data.params
    assert params["train.lr"] == "0.001" and params["train.sources.posterior"] == "0.5"
    assert params["task.name"] == "gmm25" and params["task.prior_checkpoint"] == "null"
    assert len(params["long"]) == MAX_PARAM_VALUE and params["long"].startswith("xxxx")
    assert "truncated, 7000 chars" in params["long"]

    tags = run.data.tags
    for package in ("rtb-ray", "torch", "ray", "mlflow", "pyarrow", "numpy"):
        assert tags[f"version.{package}"] == importlib.metadata.version(package)
    assert tags["ray.address"] == "ray://head:10001" and tags["host"]
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert tags["mlflow.source.git.commit"] == head
        assert tags["git.dirty"] in ("true", "false")
    assert tags["tracking.metrics_logged"] == "20" and tags["tracking.failed"] == "0"
    assert tags["tracking.artifacts_logged"] == "2" and tags["tracking.artifacts_failed"] == "0"

    assert history(client, tracker.run_id, "train/loss") == [
        (s, pytest.approx(1.0 / (s + 1))) for s in range(0, 100, 10)]
    names = sorted(a.path for a in client.list_artifacts(tracker.run_id, "eval"))
    assert names == ["eval/step_10.json", "eval/step_10.png"]
    got = Path(client.download_artifacts(tracker.run_id, "eval/step_10.png", str(tmp_path / "dl")))
    assert got.read_bytes() == png.read_bytes()
    # artifacts live next to the SQLite file, never in the working directory
    db = Path(store.removeprefix("sqlite:///"))
    assert client.get_experiment(run.info.experiment_id).artifact_location == \
        (db.parent / "mlartifacts").as_uri()
    assert (db.parent / "mlartifacts").is_dir() and list(elsewhere.iterdir()) == []


def test_log_metrics_returns_while_the_store_is_slow(store, monkeypatch):
    slow_store(monkeypatch, 0.25)
    tracker = make_tracker(store)
    calls, per_call = 20, 50
    times = []
    for step in range(calls):
        t0 = time.perf_counter()
        tracker.log_metrics({f"m{k}": step + k for k in range(per_call)}, step)
        times.append(time.perf_counter() - t0)
    # all 20 calls together took less than one write: none of them waited on the store ...
    assert sum(times) < 0.25, times
    assert not tracker.flush(timeout=0)  # ... which is still writing them
    assert tracker.flush(timeout=300)
    counters = tracker.close()
    assert counters.metrics_logged == calls * per_call and counters.failed == 0
    client = MlflowClient(tracker.tracking_uri)
    assert history(client, tracker.run_id, "m7") == [(s, s + 7) for s in range(calls)]


def test_non_finite_values_are_skipped_and_counted(store):
    tracker = make_tracker(store)
    tracker.log_metrics({"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1.5}, step=3)
    tracker.log_metrics({"d": torch.tensor(2.5)}, step=4)  # tensors and numpy scalars work
    counters = tracker.close()
    assert counters.skipped_non_finite == 3 and counters.metrics_logged == 2
    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert set(run.data.metrics) == {"d"} and run.data.tags["tracking.skipped_non_finite"] == "3"
    assert history(client, tracker.run_id, "d") == [(3, 1.5), (4, 2.5)]


def test_close_drains_everything_and_ends_the_run(store, monkeypatch):
    slow_store(monkeypatch, 0.05)
    tracker = make_tracker(store)
    for step in range(30):
        tracker.log_metrics({f"k{k}": step * k for k in range(100)}, step)
    assert tracker.counters().metrics_logged < 3000  # still being written when close begins
    counters = tracker.close("FAILED")
    assert counters.metrics_logged == 3000 and counters.failed == 0
    client = MlflowClient(tracker.tracking_uri)
    assert all(len(client.get_metric_history(tracker.run_id, f"k{k}")) == 30 for k in range(100))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.tags["tracking.metrics_logged"] == "3000"
    assert tracker.close() == counters  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        tracker.log_metrics({"late": 1.0}, step=31)


def test_a_failing_store_counts_failed_points_and_keeps_the_last_error(store, monkeypatch,
                                                                       tmp_path):
    write = SqlAlchemyStore._log_metrics

    def flaky(self, run_id, metrics):
        if any(m.step == 1 for m in metrics):
            raise MlflowException("store is down\nTraceback: more lines")
        return write(self, run_id, metrics)

    monkeypatch.setattr(SqlAlchemyStore, "_log_metrics", flaky)
    tracker = make_tracker(store)
    for step in range(3):
        tracker.log_metrics({"a": step, "b": step, "c": step}, step)
    assert tracker.flush(timeout=300)
    assert tracker.last_error == "MlflowException: store is down"

    def refuse(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(MlflowClient, "log_artifact", refuse)
    (tmp_path / "plot.png").write_bytes(b"png")
    tracker.log_artifact(tmp_path / "plot.png", "eval")  # counted, not raised into the loop
    assert tracker.last_error == "OSError: disk full"
    with pytest.raises(FileNotFoundError):
        tracker.log_artifact(tmp_path / "missing.png")
    counters = tracker.close()
    assert (counters.metrics_logged, counters.failed) == (6, 3)
    assert (counters.artifacts_logged, counters.artifacts_failed) == (0, 1)
    run = MlflowClient(store).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["tracking.failed"] == "3"
    assert history(MlflowClient(store), tracker.run_id, "a") == [(0, 0.0), (2, 2.0)]


def test_resume_continues_the_same_mlflow_run(store, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("task: {name: gmm25}\n")
    cfg = validate_config({"task": {"name": "gmm25"}, "train": {"steps": 10},
                           "tracking": {"experiment": "resume"}})
    first = open_run_tracker(out, cfg, "gmm25", resume=False,
                             request=tracking_request(store))
    record = json.loads((out / RUN_FILE).read_text())
    assert record["run_id"] == first.run_id and record["tracking_uri"] == store
    for step in range(5):
        first.log_metrics({"train/loss": float(step)}, step)
    first.close("KILLED")

    # no --tracking-uri: the store recorded in the run directory, not the environment's
    more = validate_config({"task": {"name": "gmm25"}, "train": {"steps": 20}})
    second = open_run_tracker(out, more, "gmm25", resume=True,
                              request=tracking_request(environ={}, cwd=tmp_path))
    client = MlflowClient(second.tracking_uri)
    assert second.run_id == first.run_id and second.resumed
    assert client.get_run(second.run_id).info.status == "RUNNING"
    for step in range(5, 10):
        second.log_metrics({"train/loss": float(step)}, step)
    second.close()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == list(range(10))
    assert run.data.params["train.steps"] == "10"  # MLflow params never change ...
    assert run.data.tags["changed_on_resume.train.steps"] == "20"  # ... so the change is a tag
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert client.get_experiment(run.info.experiment_id).name == "resume"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    assert run.data.tags["method"] == "rtb" and run.data.tags["seed"] == "0"
    assert not (tmp_path / "mlflow.db").exists()


def test_resuming_a_run_the_store_does_not_hold_is_one_clear_error(store, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_FILE).write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": store}))
    cfg = validate_config({"task": {"name": "gmm25"}})
    with pytest.raises(TrackingError) as err:
        open_run_tracker(out, cfg, "gmm25", resume=True)
    message = str(err.value)
    assert "MLflow at sqlite:" in message and "0" * 32 in message and "\n" not in message


def test_the_posterior_logs_with_the_pytorch_flavour_and_loads_back(store, monkeypatch,
                                                                    tmp_path):
    torch.manual_seed(0)
    net = TimeMLP(2, 20, hidden=16, depth=1, time_features=8, out_dim=4)
    torch.nn.init.normal_(net.trunk[-1].weight)  # not the zero drift, so outputs differ by input
    tracker = make_tracker(store)
    example = {"x": torch.randn(8, 2), "t_index": torch.arange(8)}
    (tmp_path / "config.yaml").write_text("task: {name: gmm25}\n")
    uri = tracker.log_pytorch_model(net, example, name="posterior", step=7,
                                    extra_files={"rtb_ray/config.yaml": tmp_path / "config.yaml"})
    # a registered name gets a version per registration, with the tags given
    first = tracker.register_model("flavour-test", uri, {"eval/elbo": -1.25, "eval/step": 7})
    second = tracker.register_model("flavour-test", uri, {"eval/elbo": -1.0})
    assert (first, second) == ("models:/flavour-test/1", "models:/flavour-test/2")
    tracker.close()
    version = MlflowClient(store).get_model_version("flavour-test", "1")
    assert version.tags == {"eval/elbo": "-1.25", "eval/step": "7"}
    logged = MlflowClient(store).get_logged_model(uri.removeprefix("models:/"))
    assert version.run_id == tracker.run_id and version.source == logged.artifact_location
    for model_uri in ("models:/flavour-test/1", "models:/flavour-test/latest", uri):
        files = download_model_files(model_uri, store, "rtb_ray", tmp_path / model_uri[8:])
        assert (files / "config.yaml").read_text() == "task: {name: gmm25}\n"
    for missing in ("models:/flavour-test/3", "models:/no-such-model/1"):
        with pytest.raises(TrackingError) as err:
            download_model_files(missing, store, "rtb_ray", tmp_path / "missing")
        assert str(err.value).startswith(missing) and "\n" not in str(err.value)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)
    client = MlflowClient(tracker.tracking_uri)
    model = client.get_logged_model(uri.removeprefix("models:/"))
    assert model.status == LoggedModelStatus.READY
    assert model.source_run_id == tracker.run_id and model.name == "posterior"
    outputs = client.get_run(tracker.run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(model.model_id, 7)]
    x, t = torch.randn(5, 2), torch.tensor([0, 3, 7, 19, 11])  # another batch size
    for model_uri in (uri, f"runs:/{tracker.run_id}/posterior"):
        loaded = mlflow.pytorch.load_model(model_uri)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, t), net(x, t))


def test_bad_tracking_flags_are_one_clear_line(tmp_path, capsys):
    assert normalize_tracking_uri("sqlite:///rel/mlflow.db") == \
        f"sqlite:///{Path('rel/mlflow.db').resolve()}"
    assert normalize_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    with pytest.raises(ConfigError, match="--tracking-uri: expected a URI"):
        normalize_tracking_uri("runs/mlflow")
    for flags, expected in [
        (["--tracking-uri", "runs/mlflow"], "--tracking-uri: expected a URI"),
        (["--experiment", ""], "tracking.experiment: String should have at least 1 character"),
        (["--set", "tracking.log_model=maybe"], "tracking.log_model: Input should be a valid bool"),
        # MLflow's rules for registered model names, before anything trains
        (["--register", "a/b"], "tracking.register_as: Invalid model name 'a/b'"),
        (["--register", "x:1"], "tracking.register_as: Invalid model name 'x:1'"),
        (["--register", " "], "tracking.register_as: Missing value for required parameter"),
        (["--register", ".."], "tracking.register_as: Invalid value \"..\" for parameter"),
        (["--register", "x", "--no-mlflow"], "register_as ('x') needs the posterior logged"),
        (["--register", "x", "--set", "tracking.log_model=false"], "needs the posterior logged"),
    ]:
        assert main(["train", str(CONFIG), "--output", str(tmp_path / "run"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_tracking_flags_are_config_settings():
    args = build_parser().parse_args(["train", str(CONFIG), "--no-mlflow", "--experiment", "123"])
    cfg = load_config(CONFIG, tracking_overrides(args))
    assert cfg.tracking.enabled is False and cfg.tracking.experiment == "123"  # a string
    args = build_parser().parse_args(["train", str(CONFIG), "--register", "2024"])
    assert load_config(CONFIG, tracking_overrides(args)).tracking.register_as == "2024"
    with pytest.raises(SystemExit):  # argparse: they exclude each other
        build_parser().parse_args(["train", str(CONFIG), "--no-mlflow", "--tracking-uri", "x:"])


def test_train_writes_one_mlflow_run_across_resume(tmp_path, cache, monkeypatch, mlflow_store):
    run = tmp_path / "run"
    # TINY, shorter still: 4 steps, a train row every step, evaluations at 0, 2 and 4
    tiny = [*TINY, "train.steps=4", "train.log_every_steps=1", "eval.every_steps=2",
            "checkpoint_every_steps=2", "tracking.system_metrics_every_s=0.5"]
    half = [*tiny, "train.steps=2"]
    out = rtb_ray("train", str(CONFIG), "--in-process", "--no-progress", "--output", str(run), "--experiment",
                  "tiny", *sets(half), cache=cache, check=True).stdout
    # the store of the environment (conftest.py: the suite's, as a user's MLFLOW_TRACKING_URI)
    assert f"mlflow ui --backend-store-uri {mlflow_store}" in out and "127.0.0.1" in out
    again = rtb_ray("train", str(CONFIG), "--in-process", "--no-progress", "--output", str(run), "--resume",
                    *sets(tiny), cache=cache, check=True).stdout
    record = json.loads((run / RUN_FILE).read_text())
    assert f"continues run {record['run_id']}" in again and record["tracking_uri"] == mlflow_store

    client = MlflowClient(record["tracking_uri"])
    mlrun = client.get_run(record["run_id"])
    experiment = client.get_experiment(mlrun.info.experiment_id)
    assert experiment.name == "tiny" and len(client.search_runs([experiment.experiment_id])) == 1
    artifacts = sqlite_path(mlflow_store).parent / "mlartifacts"  # beside the SQLite file
    assert experiment.artifact_location == artifacts.as_uri()
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["resumed_at_step"] == "2"
    assert mlrun.data.params["train.batch_size"] == "32"
    assert mlrun.data.tags["changed_on_resume.train.steps"] == "4"
    rid = record["run_id"]
    assert [s for s, _ in history(client, rid, "train/loss")] == [1, 2, 3, 4]
    assert [s for s, _ in history(client, rid, "eval/tv_target")] == [0, 2, 4]
    final = json.loads((run / "final_eval.json").read_text())
    assert history(client, rid, "eval/tv_target")[-1][1] == pytest.approx(final["tv_target"])
    assert history(client, rid, "eval/tracking_s")[-1][1] == pytest.approx(final["tracking_s"])
    assert 0 < final["tracking_s"] < final["train_s"]
    artifacts = {a.path for a in client.list_artifacts(rid)}
    assert {"config.yaml", "final_eval.json", "metrics.jsonl", "eval", "summary.png"} <= artifacts
    summary = Path(client.download_artifacts(rid, "summary.png", str(tmp_path / "dl")))
    assert summary.read_bytes() == (run / "summary.png").read_bytes()
    assert summary.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # MLflow's system metrics of the learner's machine, in both halves: steps continue on resume
    cpu = [s for s, _ in history(client, rid, "system/cpu_utilization_percentage")]
    assert len(cpu) >= 2 and cpu == list(range(len(cpu))), cpu
    assert history(client, rid, "system/system_memory_usage_megabytes")
    evals = {a.path for a in client.list_artifacts(rid, "eval")}
    assert {f"eval/step_{s}.{ext}" for s in (0, 2, 4) for ext in ("png", "json")} == evals
    assert mlrun.data.tags["tracking.failed"] == "0"
    assert mlrun.data.tags["tracking.artifacts_failed"] == "0"

    # the logged model is the final posterior of the checkpoint
    from rtb_ray.tasks import make_task

    monkeypatch.setenv("RTB_RAY_CACHE", str(cache))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", record["tracking_uri"])
    cfg = load_config(run / "config.yaml")
    posterior = make_task(cfg.task).prior()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    posterior.load_state_dict(ckpt["learner"]["posterior"])
    loaded = mlflow.pytorch.load_model(f"runs:/{rid}/posterior")
    x, t = torch.randn(6, 2), torch.tensor([0, 1, 5, 9, 14, 19])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), posterior(x, t))


def test_futures_of_an_mlflow_without_the_private_attribute_still_count():
    """tracking._futures reads MLflow 3.x's RunOperations._operation_futures; without it, it
    waits on the public wait() and still reports success or the error."""
    from types import SimpleNamespace

    from rtb_ray.tracking import _futures

    ok = _futures(SimpleNamespace(wait=lambda: None))
    assert len(ok) == 1 and ok[0].done() and ok[0].exception() is None

    def fail() -> None:
        raise RuntimeError("store down")

    bad = _futures(SimpleNamespace(wait=fail))
    assert str(bad[0].exception()) == "store down"


# -- one store per project: what a user who has set nothing gets -------------------------------
NO_STORE = {"MLFLOW_TRACKING_URI": None}  # MLflow's default: ./mlflow.db
# TINY, two steps: evaluations at 0 and 2; no model, which takes seconds to export
SHORT = [*TINY, "train.steps=2", "eval.every_steps=2", "checkpoint_every_steps=2",
         "train.log_every_steps=1", "tracking.log_model=false"]


def test_runs_started_in_one_directory_share_its_store(tmp_path, cache):
    """Two runs from one directory, one in process and one on Ray (whose learner runs in
    another directory): both in ./mlflow.db there, under the task's experiment, tagged for
    MLflow's compare view; `status` and `--resume` find the store from anywhere."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    outs = {
        "a": rtb_ray("train", str(CONFIG), "--in-process", "--no-progress", "--output", "runs/a",
                     *sets(SHORT), "--set", "seed=1", cache=cache, cwd=project, env=NO_STORE,
                     check=True).stdout,
        "b": rtb_ray("train", str(CONFIG), "--no-progress", "--output", "runs/b", *sets(SHORT),
                     "--set", "seed=2", "--set", "train.objective.kind=rtb", cache=cache,
                     cwd=project, env=NO_STORE, check=True).stdout,
    }
    store = sqlite_uri(project / "mlflow.db")
    records = {n: json.loads((project / "runs" / n / RUN_FILE).read_text()) for n in outs}
    for name, out in outs.items():
        assert f"mlflow ui --backend-store-uri {store}" in out, out
        assert records[name]["tracking_uri"] == store
    assert sorted(p.name for p in project.iterdir()) == ["mlartifacts", "mlflow.db", "runs"]

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("gmm25")  # the task's name
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {r["run_id"] for r in records.values()}
    tags = {n: runs[records[n]["run_id"]].data.tags for n in outs}
    assert (tags["a"]["method"], tags["a"]["seed"]) == ("vargrad", "1")  # the config's
    assert (tags["b"]["method"], tags["b"]["seed"]) == ("rtb", "2")

    # the ended Ray run: status says so, and where its MLflow run is
    status = rtb_ray("status", str(project / "runs" / "b"), cache=cache, cwd=elsewhere,
                     env=NO_STORE)
    assert status.returncode == 1 and "ended" in status.stderr, status.stderr
    assert f"mlflow ui --backend-store-uri {store}" in status.stdout
    assert (f"#/experiments/{experiment.experiment_id}/runs/{records['b']['run_id']}"
            in status.stdout)

    # resumed from another directory: the same MLflow run, in the store it started in
    again = rtb_ray("train", str(CONFIG), "--in-process", "--no-progress", "--resume",
                    str(project / "runs" / "a"), *sets(SHORT), "--set", "seed=1",
                    "--set", "train.steps=4", cache=cache, cwd=elsewhere, env=NO_STORE,
                    check=True).stdout
    assert f"continues run {records['a']['run_id']}" in again
    assert list(elsewhere.iterdir()) == []
    assert len(client.search_runs([experiment.experiment_id])) == 2
    assert [s for s, _ in history(client, records["a"]["run_id"], "eval/elbo")] == [0, 2, 4]


def test_the_environment_names_the_store_and_a_bad_one_is_one_line(tmp_path, cache):
    project = tmp_path / "project"
    project.mkdir()
    elsewhere = tmp_path / "elsewhere.db"
    rtb_ray("train", str(CONFIG), "--in-process", "--no-progress", "--output", "run",
            *sets(SHORT), cache=cache, cwd=project, check=True,
            env={"MLFLOW_TRACKING_URI": f"sqlite:///{elsewhere}",
                 "MLFLOW_EXPERIMENT_NAME": "from-the-environment"})
    record = json.loads((project / "run" / RUN_FILE).read_text())
    assert record["tracking_uri"] == sqlite_uri(elsewhere) and elsewhere.is_file()
    client = MlflowClient(record["tracking_uri"])
    experiment_id = client.get_run(record["run_id"]).info.experiment_id
    assert client.get_experiment(experiment_id).name == "from-the-environment"

    for value in ("notauri", "runs/mlflow.db"):
        bad = rtb_ray("train", str(CONFIG), "--in-process", "--output", "bad", *sets(SHORT),
                      cache=cache, cwd=project, env={"MLFLOW_TRACKING_URI": value})
        assert bad.returncode == 2, bad.stderr[-2000:]
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and "MLFLOW_TRACKING_URI: expected a URI" in lines[0], lines
        assert repr(value) in lines[0]
    assert sorted(p.name for p in project.iterdir()) == ["run"]  # no run directory, no store


def test_a_registered_posterior_samples_as_its_run_does(tmp_path, cache):
    project, empty = tmp_path / "project", tmp_path / "empty"
    project.mkdir()
    empty.mkdir()
    with_model = [*SHORT, "tracking.log_model=true"]
    out = rtb_ray("train", str(CONFIG), "--in-process", "--no-progress", "--output", "run",
                  *sets(with_model), "--register", "tiny-gmm", cache=cache, cwd=project,
                  env=NO_STORE, check=True).stdout
    assert "MLflow: posterior registered as models:/tiny-gmm/1" in out, out
    client = MlflowClient(sqlite_uri(project / "mlflow.db"))
    version = client.get_model_version("tiny-gmm", "1")
    record = json.loads((project / "run" / RUN_FILE).read_text())
    final = json.loads((project / "run" / "final_eval.json").read_text())
    assert version.run_id == record["run_id"]
    assert float(version.tags["eval/step"]) == final["step"] == 2
    assert float(version.tags["eval/elbo"]) == pytest.approx(final["elbo"])

    # the registered model and the run directory give the same samples
    for source, name in (("models:/tiny-gmm/1", "model.npz"), ("run", "run.npz")):
        rtb_ray("sample", source, "--n", "100", "--out", name, cache=cache, cwd=project,
                env=NO_STORE, check=True)
    model, run = np.load(project / "model.npz"), np.load(project / "run.npz")
    assert model["x"].shape == (100, 2) and np.isfinite(model["logw"]).all()
    for key in ("x", "logw", "log_reward"):
        np.testing.assert_array_equal(model[key], run[key])

    # a model the store does not hold, or no store at all: one line, nothing made
    for source, cwd, expected in (("models:/tiny-gmm/2", project, "models:/tiny-gmm/2 (MLflow"),
                                  ("models:/no-such-model/1", project, "no-such-model"),
                                  ("models:/tiny-gmm/1", empty, "no MLflow store at")):
        missing = rtb_ray("sample", source, "--n", "5", "--out", "m.npz", cache=cache, cwd=cwd,
                          env=NO_STORE)
        assert missing.returncode == 2, missing.stderr[-2000:]
        lines = missing.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
    assert not (project / "m.npz").exists() and list(empty.iterdir()) == []
