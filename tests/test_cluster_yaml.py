"""cluster.yaml passes Ray's own launcher preparation and schema, without contacting a cloud;
tests/cluster_local.yaml, its local twin for Ray's fake autoscaler, keeps its node types."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent


def raw() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def prepared(config: dict | None = None) -> dict:
    """What `ray up` does before it asks the provider anything: merge the provider's defaults,
    merge setup commands, fill per-type worker bounds; then the schema check."""
    config = prepare_config(copy.deepcopy(config or raw()))
    validate_config(config)
    return config


def test_cluster_yaml_is_a_valid_launcher_config():
    config = prepared()
    assert config["head_node_type"] == "head"
    assert set(config["available_node_types"]) == {"head", "rollout", "learner"}
    # our setup replaces Ray's AWS defaults (which would install a nightly Ray wheel)
    ours = raw()
    assert config["worker_setup_commands"] == ours["setup_commands"]
    assert config["head_setup_commands"] == ours["setup_commands"] + ours["head_setup_commands"]


def test_node_types_have_their_roles_and_bounds():
    config = prepared()
    types = config["available_node_types"]
    head, rollout, learner = types["head"], types["rollout"], types["learner"]
    assert learner["resources"]["GPU"] == 1 and learner["resources"]["learner"] == 1
    assert rollout["resources"]["rollout"] == rollout["resources"]["CPU"] >= 1
    assert "GPU" not in rollout["resources"] and "GPU" not in head["resources"]
    assert (head["min_workers"], head["max_workers"]) == (0, 0)
    assert (rollout["min_workers"], rollout["max_workers"]) == (0, 8)
    assert (learner["min_workers"], learner["max_workers"]) == (0, 1)
    assert rollout["max_workers"] + learner["max_workers"] <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    assert rollout["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in learner["node_config"]  # the learner is on demand
    # GPU image on the learner, CPU image elsewhere, one Ray version for all
    assert learner["docker"]["worker_image"].endswith("-gpu")
    assert config["docker"]["image"].endswith("-cpu")
    tags = {re.search(r":(\d+\.\d+\.\d+)-", image).group(1)
            for image in (learner["docker"]["worker_image"], config["docker"]["image"])}
    assert len(tags) == 1


def test_setup_installs_the_synced_package_with_the_constraints_file():
    config = raw()
    assert config["file_mounts"]["~/rtb-ray"] == "."
    assert (ROOT / ".ci" / "constraints.txt").is_file() and (ROOT / "pyproject.toml").is_file()
    installs = [c for c in config["setup_commands"]
                if re.search(r"cd ~/rtb-ray && pip install .*-c \.ci/constraints\.txt -e \.$", c)]
    assert len(installs) == 1
    # token authentication on every node; the dashboard only on the head's loopback
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_the_local_twin_has_the_same_node_types_and_custom_resources():
    """tests/cluster_local.yaml stands in for cluster.yaml on one machine (Ray's fake multi-node
    provider, tests/test_elastic.py): what placement sees must be the same, the sizes not."""
    twin = yaml.safe_load((ROOT / "tests" / "cluster_local.yaml").read_text())
    validate_config(copy.deepcopy(twin))  # what Ray's autoscaler does when it loads the file
    assert twin["provider"]["type"] == "fake_multinode"
    real = prepared()
    # the fake provider's head type is always named ray.head.default
    assert twin["head_node_type"] == "ray.head.default"
    types = {real["head_node_type"] if name == twin["head_node_type"] else name: node
             for name, node in twin["available_node_types"].items()}
    assert set(types) == set(real["available_node_types"]) == {"head", "rollout", "learner"}
    builtin = {"CPU", "memory", "object_store_memory"}
    for name, node in real["available_node_types"].items():
        ours = {k: v for k, v in types[name]["resources"].items() if k not in builtin}
        theirs = {k: v for k, v in node["resources"].items() if k not in builtin}
        assert set(ours) == set(theirs), name  # rollout; GPU + learner; nothing on the head
        assert types[name].get("min_workers", 0) == node["min_workers"], name
        assert 0 < types[name]["max_workers"] <= node["max_workers"] or name == "head"
    # one learner and one GPU per learner node, as on the cloud; rollout slots are whole
    assert {k: types["learner"]["resources"][k] for k in ("GPU", "learner")} == {
        k: real["available_node_types"]["learner"]["resources"][k] for k in ("GPU", "learner")}
    assert types["rollout"]["resources"]["rollout"] >= 1
    assert types["rollout"]["max_workers"] + types["learner"]["max_workers"] <= twin[
        "max_workers"]
    assert 0 < twin["idle_timeout_minutes"] < 1  # tests see idle nodes go within seconds


@pytest.mark.parametrize("break_it,error", [
    (lambda c: c["available_node_types"]["learner"].update(min_worker=1),  # misspelt key
     "Additional properties are not allowed"),
    (lambda c: c["available_node_types"]["rollout"]["resources"].update(rollout=0.5),
     "is not of type 'integer'"),
    (lambda c: c["available_node_types"]["rollout"].update(min_workers=20),
     "smaller than the sum of `min_workers`"),
], ids=["misspelt-key", "fractional-resource", "min-above-max"])
def test_rays_validation_rejects_a_broken_config(break_it, error):
    config = raw()
    break_it(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(error)):
        prepared(config)
