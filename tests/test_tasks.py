"""The task contract: the built-in tasks meet the protocols, a task from outside the package
(docs/examples/ring_task.py) loads by module path and by file, here and on a second Ray node,
and a bad ``task.name`` is one clear line."""

from __future__ import annotations

import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from rtb_ray.config import ConfigError, RunConfig, config_to_dict, load_config, validate_config
from rtb_ray.tasks import Task, make_task, task_runtime_env
from rtb_ray.transitions import GuidedFamily, TransitionFamily
from test_cli import CONFIG, ROOT, user_env

RING = ROOT / "docs" / "examples" / "ring_task.py"


def test_builtin_tasks_and_their_families_meet_the_protocols(cache_dir):
    gmm = make_task(load_config(CONFIG, ["task.num_steps=10", "task.hidden=8"]).task)
    digits = make_task(load_config(ROOT / "pipelines" / "configs" / "digits_even_smoke.yaml").task)
    for task in (gmm, digits):  # constructing a task loads no prior: the cache stays empty
        assert isinstance(task, Task) and isinstance(task.family, TransitionFamily)
        assert task.baseline_metric and task.progress_metrics
        assert task_runtime_env(task.name) == {}  # on every node already
    assert isinstance(digits.family, GuidedFamily) and not isinstance(gmm.family, GuidedFamily)
    assert not cache_dir.exists()


@pytest.fixture
def outside(tmp_path):
    """The docs example copied outside the repository: as a package module and as a file."""
    pkg = tmp_path / "rtb_ring_tasks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(RING, pkg / "ring.py")
    shutil.copy(RING, tmp_path / "ring_task.py")
    return tmp_path


def check_ring(task: Task) -> None:
    assert isinstance(task, Task) and isinstance(task.family, TransitionFamily)
    # the example's exact log Z and mean radius, against exact prior samples (x_1 ~ N(0, σ² I))
    x = 2.0 * torch.randn(400_000, 2, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)
    log_r = task.log_reward(x)
    assert abs(math.log(log_r.exp().mean().item()) - task.reference_log_z()) < 0.02
    posterior = x[torch.multinomial(log_r.exp(), 20_000, replacement=True)].float()
    metrics = task.evaluate(posterior)
    assert metrics["radius_error"] < 0.02 and metrics["angle_tv"] < 0.03
    assert {*task.progress_metrics, task.baseline_metric} <= metrics.keys()
    states, _ = task.family.sample(task.prior(), 16)
    assert states.shape == (16, task.family.num_steps + 1, 2)


def test_a_task_outside_the_package_by_module_path(outside, monkeypatch):
    monkeypatch.syspath_prepend(str(outside))
    cfg = validate_config({"task": {"name": "rtb_ring_tasks.ring", "radius": 3.0}})
    check_ring(make_task(cfg.task))
    assert task_runtime_env(cfg.task.name) == {"py_modules": [str(outside / "rtb_ring_tasks")]}
    with pytest.raises(ConfigError, match=r"task.radus: unknown key"):
        validate_config({"task": {"name": "rtb_ring_tasks.ring", "radus": 3.0}})


def test_a_task_outside_the_package_by_file(outside, monkeypatch):
    monkeypatch.chdir(outside)
    cfg = validate_config({"task": {"name": "./ring_task.py"}})
    assert cfg.task.name == str(outside / "ring_task.py")  # absolute: what config.yaml keeps
    task = make_task(cfg.task)
    check_ring(task)
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # its Config class has an importable name
    # Ray nodes get a copy named as the module is here: they import it under that name
    [copy] = task_runtime_env(cfg.task.name)["py_modules"]
    assert Path(copy).stem == type(task).__module__ and Path(copy).read_text() == RING.read_text()
    check_ring(make_task(validate_config({"task": {"name": str(RING)}}).task))  # the docs copy


def test_an_outside_task_ships_to_a_second_ray_node(outside, monkeypatch):
    """Neither the package folder nor the file is on the second node's path (the file is even
    deleted): the job's runtime env brings both there."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from actors.session import init_ray

    monkeypatch.syspath_prepend(str(outside))
    names = ["rtb_ring_tasks.ring", str(outside / "ring_task.py")]
    # validated here, before the file is gone; sent as objects (pickled) and as plain settings
    configs = [validate_config({"task": {"name": name, "radius": 2.5}}) for name in names]
    env = {"py_modules": [m for n in names for m in task_runtime_env(n)["py_modules"]]}

    def load(cfg: Any) -> tuple[str, str, float, tuple]:
        import ray as ray_

        from rtb_ray.config import validate_config as validate
        from rtb_ray.tasks import make_task as make

        task = make((cfg if isinstance(cfg, RunConfig) else validate(cfg)).task)
        states, _ = task.family.sample(task.prior(), 4)
        return (ray_.get_runtime_context().get_node_id(), sys.modules[type(task).__module__]
                .__file__, task.config.radius, tuple(states.shape))

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    second = cluster.add_node(num_cpus=1, resources={"second_node": 1})
    try:
        cluster.wait_for_nodes()
        init_ray(cluster.address, runtime_env=env)
        (outside / "ring_task.py").unlink()
        remote = ray.remote(num_cpus=1, resources={"second_node": 1})(load)
        sent = configs + [config_to_dict(cfg) for cfg in configs]
        results = ray.get([remote.remote(cfg) for cfg in sent])
        for cfg, (node, file, radius, shape) in zip(sent, results):
            assert node == second.node_id and radius == 2.5 and shape == (4, 51, 2), cfg
            assert not file.startswith(str(outside)), file  # the shipped copy
    finally:
        ray.shutdown()
        cluster.shutdown()


NOT_A_TASK = "from pydantic import BaseModel\nclass Config(BaseModel):\n    name: str\n" \
             "def make_task(config):\n    return object()\n"


@pytest.mark.parametrize("name,files,expected", [
    ("rtb_no_such_pkg.ring", {}, "unknown task 'rtb_no_such_pkg.ring': no module "
                                 "rtb_no_such_pkg on sys.path"),
    ("rtb_bad_tasks.deps", {"rtb_bad_tasks/__init__.py": "", "rtb_bad_tasks/deps.py":
                            "import rtb_no_such_dependency\n"},
     "importing rtb_bad_tasks.deps failed: ModuleNotFoundError: No module named "
     "'rtb_no_such_dependency'"),
    ("./missing.py", {}, "missing.py does not exist"),
    ("./bad.py", {"bad.py": "def (:\n"}, "bad.py failed: SyntaxError: invalid syntax"),
    ("./empty.py", {"empty.py": "x = 1\n"}, "must define Config (a pydantic model) and make_task"),
    ("./nameless.py", {"nameless.py": NOT_A_TASK.replace("name: str", "radius: float = 1.0")},
     "Config has no 'name' field"),
    ("./not_a_task.py", {"not_a_task.py": NOT_A_TASK},
     "make_task returned a object, which is not a Task (missing: name, family, "),
])
def test_a_bad_task_name_is_one_clear_line(tmp_path, name, files, expected):
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    (tmp_path / "run.yaml").write_text(f"task: {{name: {name}}}\n")
    # the run's folder holds the bad tasks; this checkout's code, not an installed one
    env = {**user_env(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "rtb_ray.cli", "train", "run.yaml", "--in-process",
                           "--output", "run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert name.removeprefix("./") in lines[0]  # names what was tried
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
