"""The vision task on sklearn's 8×8 digits: config checks, reward and evaluation, the guidance
baseline, and the CI-sized even-digit run on the Ray runtime (digits_even_smoke.yaml)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rtb_ray.config import ConfigError, load_config
from test_cli import user_env

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "pipelines" / "configs" / "digits_even_smoke.yaml"


def rtb_ray(*args: str, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtb_ray.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    """The smoke config's prior and classifiers, pretrained once for this module."""
    env = user_env(tmp_path_factory.mktemp("cache"))
    done = rtb_ray("pretrain", str(SMOKE), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reward_classifier_accuracy" in done.stdout
    return env


@pytest.fixture
def task(cache, monkeypatch):
    from rtb_ray.tasks import make_task

    monkeypatch.setenv("RTB_RAY_CACHE", cache["RTB_RAY_CACHE"])
    cfg = load_config(SMOKE, ["task.pretrain_if_missing=false"])
    return make_task(cfg.task)


def test_bad_image_configs_name_the_field():
    with pytest.raises(ConfigError, match="task.allowed_classes"):
        load_config(SMOKE, ["task.allowed_classes=[2, 11]"])
    with pytest.raises(ConfigError, match="data_root"):
        load_config(SMOKE, ["task.dataset=mnist"])
    with pytest.raises(ConfigError, match="task.combine"):
        load_config(SMOKE, ["task.combine=mean"])


def test_classifiers_reward_and_target_statistics(task):
    stats = task.stats
    assert stats["reward_classifier_accuracy"] > 0.9  # on held-out real digits
    assert stats["judge_accuracy"] > 0.9
    images = task.images.reshape(len(task.images), -1)
    log_r = task.log_reward(images)
    assert log_r.shape == (len(images),) and torch.all(log_r <= 0)
    even = task.labels % 2 == 0
    # real even digits are rewarded, real odd ones are not
    assert log_r[even].mean() > -0.3 and log_r[~even].mean() < -2.0
    # log Σ over the allowed classes ≥ log max
    task.config.combine = "sum"
    assert torch.all(task.log_reward(images) >= log_r - 1e-6)
    task.config.combine = "max"
    # log Z = log E_prior[r]: between the prior's E[log r] (Jensen) and 0
    assert task.evaluate(images[:50])["prior_mean_log_reward"] <= task.reference_log_z(1.0) <= 0


def test_evaluation_of_real_images_is_what_it_should_be(task):
    even = task.labels % 2 == 0
    x = task.images[even].reshape(int(even.sum()), -1)
    m = task.evaluate(x)
    assert m["outside_share"] < 0.05  # the judge finds real even digits even
    assert m["allowed_classes_present"] == 5
    assert m["frechet_distance"] < 1e-2  # the reference set itself
    odd = task.evaluate(task.images[~even].reshape(int((~even).sum()), -1))
    assert odd["outside_share"] > 0.95
    assert odd["frechet_distance"] > 1.0
    assert 0 < m["diversity"] <= 2
    assert abs(sum(m[f"class_share_{c}"] for c in range(10)) - 1) < 1e-9


def test_guidance_baseline_raises_the_reward(cache, tmp_path):
    out = tmp_path / "guidance"
    done = rtb_ray("guidance", str(SMOKE), "--output", str(out), "--scales", "0,1",
                   "--n", "400", env=cache)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "guidance_eval.json").read_text())
    plain, guided = result["scales"]
    assert guided["mean_log_reward"] > plain["mean_log_reward"] + 0.5
    assert result["best"] == min(result["scales"], key=lambda r: r["frechet_distance"])
    assert (out / "eval" / "guidance_scale_1.png").stat().st_size > 1000
    from mlflow.tracking import MlflowClient

    record = json.loads((out / "mlflow_run.json").read_text())  # in the suite's store
    tags = MlflowClient(record["tracking_uri"]).get_run(record["run_id"]).data.tags
    assert tags["method"] == "guidance" and tags["baseline"] == "guidance"
    again = rtb_ray("guidance", str(SMOKE), "--output", str(out), env=cache)
    assert again.returncode == 2 and "already holds" in again.stderr


def test_smoke_run_on_ray_raises_the_reward_above_the_prior(cache, tmp_path):
    """The CI-sized even-digit posterior through the whole runtime."""
    out = tmp_path / "run"
    done = rtb_ray("train", str(SMOKE), "--output", str(out), "--no-progress", env=cache,
                   timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    final = json.loads(next(out.glob("*eval*.json")).read_text())
    assert final["step"] == 600
    for key in ("mean_log_reward", "prior_mean_log_reward", "class_tv", "outside_share",
                "frechet_distance", "diversity", "elbo", "eubo"):
        assert key in final, key
    assert final["mean_log_reward"] > final["prior_mean_log_reward"] + 0.3
    first = json.loads((out / "eval" / "step_0.json").read_text())
    assert final["outside_share"] < first["outside_share"]
    assert (out / "eval" / "step_600.png").exists()
