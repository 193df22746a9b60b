"""Rollout actors on a real local Ray: roles, pulled versioned weights, the Arrow store."""

from __future__ import annotations

import os

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
import torch

ray = pytest.importorskip("ray")

from actors.replay import start_store  # noqa: E402
from actors.rollout import RolloutWorker  # noqa: E402
from actors.weights import WeightStore  # noqa: E402
from rtb_ray.config import load_config  # noqa: E402
from rtb_ray.tasks import make_task  # noqa: E402
from test_cli import CONFIG, TINY  # noqa: E402


@pytest.fixture(scope="module")
def local_ray(cache):
    # workers inherit the driver's environment: they find the tiny prior in the same cache
    saved = os.environ.get("RTB_RAY_CACHE")
    os.environ["RTB_RAY_CACHE"] = str(cache)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("RTB_RAY_CACHE")
    else:
        os.environ["RTB_RAY_CACHE"] = saved


def test_workers_fill_the_store_with_versioned_trajectories_of_every_role(local_ray, tmp_path):
    config = load_config(CONFIG, [*TINY, "replay.capacity=10000", "replay.segment_rows=64",
                                  "replay.samples_per_insert=null", "replay.min_size_to_sample=1"])
    store = start_store(config, str(tmp_path / "replay"), "test")
    weights = WeightStore.remote()
    posterior = RolloutWorker.options(num_cpus=0.5).remote(config, "posterior", "post-0", store,
                                                           weights, seed=1)
    prior = RolloutWorker.options(num_cpus=0.5).remote(config, "prior", "prior-0", store,
                                                       weights, seed=2)
    # before anything is published the posterior samples with its initial (prior) weights,
    # exploring as the schedule says at the start (train.explore.start = 0.05)
    first = ray.get(posterior.step.remote(32))
    assert first["status"] == "inserted" and first["version"] == -1

    # publish version 3: a posterior that differs from the prior
    net = make_task(load_config(CONFIG, TINY).task).prior()
    with torch.no_grad():
        net.trunk[-1].bias.add_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    assert ray.get(weights.publish.remote(3, [ray.put(net.state_dict())]))
    assert not ray.get(weights.publish.remote(2, [ray.put(net.state_dict())]))  # older: ignored
    results = ray.get([posterior.step.remote(32) for _ in range(2)] + [prior.step.remote(32)])
    assert [r["version"] for r in results[:2]] == [3, 3]
    assert all(r["status"] == "inserted" and r["inserted"] == 32 for r in results)

    backward = RolloutWorker.options(num_cpus=0.5).remote(config, "backward", "back-0", store,
                                                          weights, seed=3)
    assert ray.get(backward.step.remote(16))["inserted"] == 16

    # a killed worker loses nothing that was already inserted
    before = ray.get(store.stats.remote())["inserted"]
    ray.kill(prior)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(prior.step.remote(32))
    assert ray.get(store.stats.remote())["inserted"] == before == 32 * 4 + 16
    ray.get(store.close.remote())

    # the persisted store, read with plain pyarrow: every role is there, with its version
    table = ds.dataset(tmp_path / "replay", format="ipc").to_table()
    assert table.num_rows == before
    by_source = {}
    for source, version in zip(table.column("source").to_pylist(),
                               table.column("policy_version").to_pylist()):
        by_source.setdefault(source, set()).add(version)
    assert by_source == {"explore": {-1, 3}, "prior": {-1}, "backward": {-1}}
    # version 3 moved the drift by +3 along x: its terminal states sit to the right
    states = table.filter(pc.equal(table.column("policy_version"), 3)).column("states")
    assert states.combine_chunks().to_numpy_ndarray()[:, -1, 0].mean() > 1.0


def test_both_runtimes_make_batches_with_the_same_role_functions(local_ray, tmp_path):
    """A rollout worker (its own process) and the in-process source, given the same seed and
    weights, make the same trajectories for each role: one batch path, not two."""
    from rtb_ray.batches import InlineBatches
    from rtb_ray.rollout import Sampler
    from rtb_ray.trajectory import Source

    config = load_config(CONFIG, [*TINY, "replay.samples_per_insert=null",
                                  "replay.min_size_to_sample=1"])
    task = make_task(config.task)
    inline = InlineBatches(config, Sampler(task, task.prior(), task.prior()))
    weights = WeightStore.remote()
    for role in ("prior", "posterior"):
        directory = tmp_path / role
        store = start_store(config, str(directory), "test")
        worker = RolloutWorker.options(num_cpus=0.5).remote(config, role, role, store, weights,
                                                            seed=11)
        assert ray.get(worker.step.remote(64))["inserted"] == 64
        ray.get(store.close.remote())
        theirs = ds.dataset(directory, format="ipc").to_table().sort_by("id")
        inline.context.generator.manual_seed(11)
        inline.context.policy_version = -1  # what the worker holds: nothing published yet
        mine = next(r for r in inline.turns if r.name == role).rollout(inline.context, 64)
        states = torch.tensor(theirs.column("states").combine_chunks().to_numpy_ndarray())
        assert theirs.column("source").to_pylist() == [Source(code).name.lower()
                                                       for code in mine.source.tolist()]
        torch.testing.assert_close(states, mine.states, rtol=1e-4, atol=1e-4)
        ray.kill(worker)
