"""The task contract: the built-in tasks meet the protocols."""

from __future__ import annotations

from rtb_ray.config import load_config
from rtb_ray.tasks import Task, make_task
from rtb_ray.transitions import GuidedFamily, TransitionFamily
from test_cli import CONFIG, ROOT


def test_builtin_tasks_and_their_families_meet_the_protocols(cache_dir):
    gmm = make_task(load_config(CONFIG, ["task.num_steps=10", "task.hidden=8"]).task)
    digits = make_task(load_config(ROOT / "pipelines" / "configs" / "digits_even_smoke.yaml").task)
    for task in (gmm, digits):  # constructing a task loads no prior: the cache stays empty
        assert isinstance(task, Task) and isinstance(task.family, TransitionFamily)
        assert task.baseline_metric and task.progress_metrics
    assert isinstance(digits.family, GuidedFamily) and not isinstance(gmm.family, GuidedFamily)
    assert not cache_dir.exists()
