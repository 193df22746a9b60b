"""A run's Ray session: what Ray reads on import, starting or joining Ray, and
``<run>/runtime.json`` for ``rtb-ray status/scale``. No heavy imports (no torch): status answers
in about two seconds."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

NAMESPACE = "rtb-ray"
RUNTIME_FILE = "runtime.json"


def prepare_ray(address: str | None) -> dict[str, str]:
    """Set what Ray reads on import; call before anything imports Ray. Returns what it set.

    - Token authentication: Ray enables it for the instances it starts, but a process joining one
      (``--address``, ``rtb-ray status/scale``) must ask for it (RAY_AUTH_MODE=disabled: join a
      cluster without authentication).
    - A local Ray serves this machine only: the single-node switch binds every server to
      127.0.0.1, and a process joining on loopback must set it too to find its raylet.
    """
    wanted = {"RAY_AUTH_MODE": "token"}
    host = None if address is None else address.rpartition(":")[0]
    if address is None or host in ("127.0.0.1", "localhost"):
        wanted["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    missing = {k: v for k, v in wanted.items() if k not in os.environ}
    if missing and "ray" in sys.modules:
        raise RuntimeError(f"Ray was imported before prepare_ray could set {sorted(missing)}")
    os.environ.update(missing)
    return missing


def init_ray(address: str | None, namespace: str = NAMESPACE,
             runtime_env: dict[str, Any] | None = None) -> None:
    """Start a new local Ray (address None) or join one. No dashboard: nothing listens that a
    run does not need. ``runtime_env``: the job's, for every worker on every node (a task from
    outside this project ships with it: rtb_ray.tasks.task_runtime_env)."""
    prepare_ray(address)
    import ray

    # "local": Ray's own default (None) joins the newest cluster started on this machine, e.g.
    # another run's or a test's, and a run would then silently share (and outlive) it
    ray.init(address=address or "local", namespace=namespace, include_dashboard=False,
             log_to_driver=False, logging_level="ERROR", runtime_env=runtime_env or None)


def read_runtime(output: Path) -> dict[str, Any]:
    """``<run>/runtime.json``; ValueError naming the file when it is not one the driver wrote."""
    path = Path(output) / RUNTIME_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{output} has no {RUNTIME_FILE}: not a run of the Ray runtime")
    try:
        info = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    address = info.get("address") if isinstance(info, dict) else None
    host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if not host or not port.isdigit():
        raise ValueError(f"{path}: 'address' must be the run's HOST:PORT (got {address!r})")
    for key in ("run", "namespace", "coordinator"):
        if not isinstance(info.get(key), str):
            raise ValueError(f"{path}: {key!r} is missing")
    return info


def connect(output: Path) -> tuple[dict[str, Any], Any]:
    """Join the Ray cluster of a live run; returns (runtime.json, its coordinator). Fails fast
    (RuntimeError) when the run has ended or its cluster is unreachable."""
    info = read_runtime(output)
    if "ended" in info:
        raise RuntimeError(f"run {info['run']} ended ({info['ended']}); its final status is in "
                           f"{Path(output) / 'runtime_status.json'}")
    host, _, port = info["address"].rpartition(":")
    try:  # ray.init would retry an unreachable address for a minute
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError:
        raise RuntimeError(f"run {info['run']} is not running (nothing answers at "
                           f"{info['address']})") from None
    init_ray(info["address"], info["namespace"])
    import ray

    try:
        return info, ray.get_actor(info["coordinator"], namespace=info["namespace"])
    except ValueError:
        raise RuntimeError(f"run {info['run']} is not running (no coordinator on "
                           f"{info['address']})") from None
