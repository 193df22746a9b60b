"""What a user sees in the MLflow UI: two short real training runs started in one directory
with no tracking flags or variables, then ``mlflow ui`` in that directory, looked at in a
headless Chromium (Playwright driving the system's browser).

Checked as a person would: the experiments page lists the task's experiment, which lists both
runs by name; a run's page says Finished and lists its logged model ``posterior``; a metric's
chart has one point per evaluation; the evaluation picture and the run's ``summary.png`` render
in the artifact view; the experiment's models page lists a ready ``posterior`` per run.
Screenshots of each page go to ``test-artifacts/mlflow_ui/``.

Needs Playwright (``pip install playwright``, in the ``test`` extra) and a Chromium (Debian:
``apt-get install chromium``; elsewhere point ``RTB_RAY_CHROMIUM`` at a Chrome or Chromium);
skipped without them, unless ``RTB_RAY_BROWSER_TESTS=required`` (CI) makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from test_cli import CONFIG, ROOT, TINY, sets, user_env

pytestmark = pytest.mark.browser

SHOTS = ROOT / "test-artifacts" / "mlflow_ui"
SEEDS = (0, 1)
STEPS = 2  # evaluations at steps 0 and 2: two points per metric chart, two pictures
# the CLI tests' tiny config, shorter still: what the UI shows does not need a good prior
SETTINGS = [o for o in TINY if not o.startswith(("train.steps", "eval.every_steps",
                                                  "task.pretrain.steps"))] + [
    f"train.steps={STEPS}", f"eval.every_steps={STEPS}", "task.pretrain.steps=10"]
TIMEOUT_MS = 30_000  # per UI step: the machine may be slow and loaded
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
NO_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes: a UI only
INSTALL = ("pip install playwright (in the test extra: pip install -e '.[test]') and a Chromium "
           "(Debian/Ubuntu: apt-get install chromium; or RTB_RAY_CHROMIUM=/path/to/chrome)")


def _missing(what: str) -> None:
    if os.environ.get("RTB_RAY_BROWSER_TESTS") == "required":
        pytest.fail(f"{what}, and RTB_RAY_BROWSER_TESTS=required: {INSTALL}")
    pytest.skip(f"{what}: {INSTALL}")


def chromium() -> str:
    path = os.environ.get("RTB_RAY_CHROMIUM") or next(
        (p for name in ("chromium", "chromium-browser", "google-chrome")
         if (p := shutil.which(name))), None)
    if path is None:
        _missing("no Chromium found")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_width(path: Path) -> int:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">I", head[16:20])[0]


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow ui`` in ``workdir`` (its default store: ./mlflow.db) on 127.0.0.1 and a free
    port, in its own process group; returns once it answers ``/health``."""
    port = free_port()
    log = open(workdir / "mlflow-server.log", "w")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "ui", "--port", str(port),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **QUIET, **NO_JOBS}, start_new_session=True)
    log.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as response:
                if response.status == 200:
                    return proc, base
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise AssertionError("mlflow server did not answer /health:\n"
                         + (workdir / "mlflow-server.log").read_text()[-3000:])


def stop_server(proc: subprocess.Popen) -> None:
    """The server and what it started (its whole process group): TERM, then KILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:  # workers that outlived the server, or a server that ignored TERM
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def train(seed: int, project: Path) -> subprocess.Popen:
    """``rtb-ray train`` of the tiny gmm25 config, as a user runs it in ``project`` with no
    tracking flag and no MLFLOW_* variable: into MLflow's default store there, ./mlflow.db (the
    runs share one prior cache: the first pretrains it). This tree goes first on PYTHONPATH, as
    it would for ``python -m`` run from the repository."""
    env = {**user_env(project / "cache"), **QUIET}
    env.pop("MLFLOW_TRACKING_URI")  # the suite's store (conftest.py); a user may have none
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "rtb_ray.cli", "train", str(CONFIG), "--in-process",
         "--no-progress", "--output", f"runs/seed{seed}", *sets(SETTINGS),
         "--set", f"seed={seed}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=project)


def finished(proc: subprocess.Popen, run: Path) -> dict:
    """Wait for a training run; what the UI should show of it."""
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "MLflow: posterior logged as models:/" in out, out[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {**json.loads((run / "mlflow_run.json").read_text()), "dir": run,
            "eval_steps": [r["step"] for r in rows if r["kind"] == "eval"]}


@pytest.fixture
def browser_kit():
    """Playwright's sync API and a Chromium, or a skip saying how to install them (checked
    before the runs are made)."""
    try:
        from playwright import sync_api
    except ImportError:
        _missing("no Playwright")
    return sync_api, chromium()


@pytest.fixture
def served(tmp_path: Path, browser_kit) -> Iterator[dict]:
    """Two real runs (seeds 0, 1) from one directory, served by ``mlflow ui`` there (started
    while the second run trains; stopped, with its process group, at teardown)."""
    t0 = time.monotonic()
    server = second = None
    try:
        runs = {"seed0": finished(train(0, tmp_path), tmp_path / "runs/seed0")}
        second = train(1, tmp_path)  # the store exists now: the server may open it meanwhile
        server, base = start_server(tmp_path)
        runs["seed1"] = finished(second, tmp_path / "runs/seed1")
        print(f"two training runs and the server: {time.monotonic() - t0:.0f}s")
        yield {"base": base, "db": tmp_path / "mlflow.db", "runs": runs}
    finally:
        if second is not None and second.poll() is None:
            second.kill()
            second.wait()
        if server is not None:
            stop_server(server)


def test_the_mlflow_ui_shows_runs_metrics_pictures_and_models(browser_kit, served):
    sync_api, browser_path = browser_kit
    expect = sync_api.expect
    expect.set_options(timeout=TIMEOUT_MS)
    base, runs = served["base"], served["runs"]
    # both runs went to ./mlflow.db of their directory, under the task's experiment
    assert {r["tracking_uri"] for r in runs.values()} == {f"sqlite:///{served['db']}"}
    (experiment,) = {r["experiment_id"] for r in runs.values()}
    models = {name: _model_id(served["db"], r["run_id"]) for name, r in runs.items()}
    run = runs["seed0"]
    assert run["eval_steps"] == [0, STEPS], run["eval_steps"]
    picture = f"step_{STEPS}.png"
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    t0 = time.monotonic()
    saved: list[str] = []

    def shot(page, label: str) -> None:
        path = SHOTS / f"{len(saved) + 1}_{label}.png"
        page.screenshot(path=str(path))
        saved.append(path.name)
        print(f"screenshot ({time.monotonic() - t0:.0f}s in the browser): {path}")

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            # the experiments page lists the task's; it lists both runs by name
            page.goto(f"{base}/#/experiments")
            _model_training_view(page)
            expect(page.get_by_role("link", name="gmm25", exact=True)).to_have_attribute(
                "href", f"#/experiments/{experiment}")
            shot(page, "experiments")
            page.goto(f"{base}/#/experiments/{experiment}/runs")  # its training runs
            expect(page.get_by_role("link", name="seed0", exact=True)).to_be_visible()
            _model_training_view(page)
            for name, r in runs.items():
                expect(page.get_by_role("link", name=name, exact=True)).to_have_attribute(
                    "href", f"#/experiments/{experiment}/runs/{r['run_id']}")
            shot(page, "experiment_runs")

            # a run's page: Finished, and its logged model posterior
            page.get_by_role("link", name="seed0", exact=True).click()
            expect(page.get_by_test_id("key-value-Run ID")).to_contain_text(run["run_id"])
            expect(page.get_by_test_id("key-value-Status")).to_contain_text("Finished")
            shot(page, "run_overview")
            model = page.get_by_role("link", name="posterior", exact=True)
            expect(model).to_have_attribute(
                "href", f"#/experiments/{experiment}/models/{models['seed0']}")
            model.scroll_into_view_if_needed()
            expect(page.get_by_text("Logged models (1)", exact=True)).to_be_visible()
            shot(page, "run_logged_model")

            # a metric's chart: one point per evaluation
            page.get_by_role("tab", name="Model metrics", exact=True).click()
            page.get_by_placeholder("Search metric charts").fill("tv_target")
            chart = page.get_by_test_id("experiment-view-compare-runs-card").filter(
                has=page.locator('[title="eval/tv_target"]'))
            expect(chart).to_have_count(1)
            expect(chart.locator(".scatterlayer path.point")).to_have_count(len(run["eval_steps"]))
            shot(page, "metric_chart")

            # the evaluation picture renders in the artifact view, at the file's own size
            page.get_by_role("tab", name="Artifacts", exact=True).click()
            _tree_node(page, "eval").click()
            _tree_node(page, picture).click()
            img = page.locator(f'img[alt="eval/{picture}"]')
            expect(img).to_be_visible()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                   arg=img.element_handle())
            assert img.evaluate("img => img.naturalWidth") == png_width(
                run["dir"] / "eval" / picture)
            shot(page, "eval_picture")

            # the run at a glance: summary.png, as drawn in the run directory
            _tree_node(page, "summary.png").click()
            img = page.locator('img[alt="summary.png"]')
            expect(img).to_be_visible()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                   arg=img.element_handle())
            assert img.evaluate("img => img.naturalWidth") == png_width(
                run["dir"] / "summary.png")
            shot(page, "summary")

            # the experiment's models: a posterior from each run, Ready, linked to its run
            page.goto(f"{base}/#/experiments/{experiment}/models")
            posteriors = page.get_by_role("link", name="posterior", exact=True)
            expect(posteriors).to_have_count(len(runs))
            assert sorted(posteriors.evaluate_all("links => links.map(a => a.hash)")) == sorted(
                f"#/experiments/{experiment}/models/{m}" for m in models.values())
            expect(page.get_by_text("Ready", exact=True)).to_have_count(len(runs))
            for name, r in runs.items():
                expect(page.get_by_role("link", name=name, exact=True)).to_have_attribute(
                    "href", f"#/experiments/{experiment}/runs/{r['run_id']}")
            shot(page, "models")
        except BaseException:
            page.screenshot(path=str(SHOTS / "failed.png"))
            print(f"screenshot of the failure: {SHOTS / 'failed.png'}")
            raise
        finally:
            browser.close()
    assert saved == ["1_experiments.png", "2_experiment_runs.png", "3_run_overview.png",
                     "4_run_logged_model.png", "5_metric_chart.png", "6_eval_picture.png",
                     "7_summary.png", "8_models.png"]


def _model_training_view(page) -> None:
    """MLflow 3 opens in its GenAI view: switch to "Model training" (as a user of a training
    run would) and close the assistant panel, where this MLflow has them."""
    toggle = page.get_by_role("button", name="Model training", exact=True)
    if toggle.count():
        toggle.click()
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count() and close.first.is_visible():
        close.first.click()


def _tree_node(page, name: str):
    return page.locator(f'[data-testid="artifact-tree-node"][aria-label="{name}"]')


def _model_id(db: Path, run_id: str) -> str:
    """The id of the model ``posterior`` that ``run_id`` logged, from the store itself."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiment_id = client.get_run(run_id).info.experiment_id
    models = [m for m in client.search_logged_models(experiment_ids=[experiment_id])
              if m.source_run_id == run_id and m.name == "posterior"]
    assert len(models) == 1, models
    return models[0].model_id
