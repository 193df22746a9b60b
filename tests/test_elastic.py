"""Elastic rollout nodes: `rtb-ray train` on an autoscaling cluster, driven as a user would.

The cluster is Ray's fake multi-node autoscaler with tests/cluster_local.yaml, cluster.yaml's
twin: the head starts as `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`, and
Ray's autoscaler adds and removes rollout "nodes" (Ray processes on this machine) from the
workers' demand for the `rollout` resource (runtime.worker_resources). Ray's own
AutoscalingCluster helper is not used: it reads the provider's example.yaml, which the Ray wheel
does not ship, and runs `ray stop --force`, which stops every Ray on the machine."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from rtb_ray.cli import format_status  # noqa: E402
from ray_head import free_ports, ray_head  # noqa: E402
from test_cli import CONFIG, ROOT, rtb_ray  # noqa: E402
from test_runtime import (  # noqa: E402
    RUNTIME, check_nothing_lost, learner_step, start, status, stop, wait_for,
)

TWIN = ROOT / "tests" / "cluster_local.yaml"


@pytest.fixture
def fake_cluster(tmp_path: Path) -> Iterator[str]:
    """The twin's head, on ports and a temp dir of its own (another Ray on this machine is left
    alone); yields its address. Torn down by ending exactly the processes it started."""
    ports = free_ports(4)
    config = yaml.safe_load(TWIN.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{ports[0]}"  # where the fake nodes join
    config_path = tmp_path / "cluster_local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {"RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1"}  # the autoscaler looks every second, not 5
    with ray_head(tmp_path, tmp_path, ports=ports, env=env, name="rtb-elastic-",
                  args=[f"--autoscaling-config={config_path}"]) as head:
        yield head.address


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def nodes_sampling(s: dict) -> set[str]:
    return {w["node"] for w in s["workers"] if w["calls"] > 0 and not w["retiring"]}


def test_rollout_nodes_come_and_go_with_scale(tmp_path, cache, fake_cluster):
    """Workers ask for `rollout`, which only rollout nodes have: the autoscaler starts one for
    the first worker; `scale` past the cluster's capacity leaves a worker pending (shown by
    `rtb-ray status`) while a second node is added and workers sample there; scaling down
    retires them and the idle node goes. The learner keeps training throughout."""
    from actors.session import init_ray

    init_ray(fake_cluster, "rtb-ray-elastic-test")  # to watch the nodes
    try:
        run, node_b, took = elastic_run(tmp_path, cache, fake_cluster)
    finally:
        ray.shutdown()
    final = check_nothing_lost(run)
    assert final["inserted_by_node"].get(node_b, 0) > 0 and len(final["inserted_by_node"]) == 2
    # never stalled: train rows kept coming while nodes came and went
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall_s"] for r in rows if r["kind"] == "train"]
    gaps = [b - a for a, b in zip(walls, walls[1:])]
    print(f"scale-up {took['up']:.1f}s, scale-down to node removed {took['down']:.1f}s, "
          f"rtb-ray status while scaling up: up to {took['status']:.1f}s, largest gap "
          f"between train rows {max(gaps):.1f}s over {len(walls)} rows")
    assert max(gaps) < 15, gaps


def elastic_run(tmp_path: Path, cache: Path, address: str) -> tuple[Path, str, dict]:
    """The run of the test above, up to its Ctrl-C; returns the run, node B and timings."""
    run, took, status_s = tmp_path / "run", {}, [0.0]

    def timed_status() -> dict:
        t0 = time.monotonic()
        s = status(run, cache)
        status_s.append(time.monotonic() - t0)
        return s

    head = alive_nodes()
    assert len(head) == 1
    proc = start(run, cache, "--address", address, overrides=RUNTIME + [
        "train.sources={posterior: 1}", "runtime.workers={posterior: 1, prior: 0, backward: 0}",
        "runtime.worker_resources={rollout: 1}"])
    try:
        # no node has `rollout` at first: the autoscaler adds node A, the worker samples there
        wait_for("training", lambda: learner_step(run) >= 25, proc)
        (node_a,) = alive_nodes() - head

        # 5 workers, 4 rollout slots on at most 2 nodes: node B comes, one worker stays pending
        t_scale, step = time.monotonic(), learner_step(run)
        assert rtb_ray("scale", str(run), "--role", "posterior=5", cache=cache).returncode == 0
        s = wait_for("workers sampling on a new node, one pending", lambda: (lambda s: s if len(
            nodes_sampling(s) - {node_a}) == 1 and [w["state"] for w in s["workers"]].count(
            "sampling") == 4 else None)(timed_status()), proc)
        took["up"], took["status"] = time.monotonic() - t_scale, max(status_s)
        (node_b,) = nodes_sampling(s) - {node_a}
        assert node_b not in head and alive_nodes() == head | {node_a, node_b}
        pending = [w for w in s["workers"] if w["state"] == "pending"]
        assert len(pending) == 1 and pending[0]["node"] is None and pending[0]["calls"] == 0
        assert "posterior workers 5/5 (1 pending)" in format_status(s)  # what `status` prints
        assert learner_step(run) >= step + 25  # the learner trained on while the node came

        # back to one worker: the pending one and the newest go, node B idles and is removed
        t_scale, step = time.monotonic(), learner_step(run)
        assert rtb_ray("scale", str(run), "--role", "posterior=1", cache=cache).returncode == 0
        # the pending worker goes at once (it holds no rows), not after it is finally placed
        assert pending[0]["name"] not in {w["name"] for w in status(run, cache)["workers"]}
        wait_for("node B removed", lambda: alive_nodes() == head | {node_a}, proc, timeout=90)
        took["down"] = time.monotonic() - t_scale
        s = wait_for("one worker left", lambda: (lambda s: s if len(s["workers"]) == 1 else None)(
            status(run, cache)), proc)
        assert s["totals"]["retired"] == 4 and s["totals"]["replaced"] == 0  # none lost
        assert nodes_sampling(s) == {node_a}
        wait_for("training after the scale-down", lambda: learner_step(run) >= step + 25, proc)
    finally:
        out = stop(proc) if proc.poll() is None else proc.stdout.read()
    assert "checkpoint saved" in out
    # ~2 s on two idle cores; the bound only tells a slow status from a hung one
    assert took["status"] < 15
    return run, node_b, took


@pytest.mark.parametrize("resources,message", [
    ("{CPU: 1}", "'CPU' is not a custom resource"),
    ("{rollout: 1.5}", "'rollout': an amount in (0, 1] or a whole number"),
])
def test_worker_resources_are_checked_before_anything_starts(resources, message):
    from rtb_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(f"runtime.worker_resources: {message}")):
        load_config(CONFIG, [f"runtime.worker_resources={resources}"])
