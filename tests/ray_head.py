"""A Ray head started as a user starts one (`ray start --head`), for the tests that drive a
cluster from the outside: tests/test_elastic.py (with Ray's fake autoscaler) and
tests/test_ray_job.py (with the dashboard, Ray's job server). On ports and a temp dir of its
own, so another Ray on this machine is left alone; torn down by ending exactly the processes it
started."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from test_cli import user_env
from test_runtime import wait_for

VENV_BIN = Path(sys.executable).parent
RAY_CLI = str(VENV_BIN / "ray")


def free_ports(n: int) -> list[int]:
    """n distinct free ports: the sockets are held together, so the OS cannot hand one out twice
    (one at a time it may: a port freed a moment ago is free again)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                if fields[0] != "Z":
                    out[int(entry)] = int(fields[1])
            except OSError:  # gone meanwhile
                pass
    return out


def session_pids(sid: int) -> list[int]:
    """The live processes of one session, what a `ray start` in a session of its own started
    (the fake nodes of its autoscaler included), and their descendants in sessions of their
    own: a job's entrypoint, which Ray's job supervisor starts in a new session."""
    parents = _parents()
    pids = set()
    for pid in parents:
        try:
            if os.getsid(pid) == sid:
                pids.add(pid)
        except OSError:
            pass
    while more := {p for p, parent in parents.items() if parent in pids} - pids:
        pids |= more
    return sorted(pids)


@dataclass
class RayHead:
    address: str  # the GCS, HOST:PORT (`--address` of rtb-ray train)
    job_server: str | None  # the dashboard: http://127.0.0.1:PORT, where `ray job` goes
    env: dict[str, str]  # a user's environment, which it was started with
    logs: Path  # its session's logs: job-driver-<id>.log, jobs/supervisor-<id>.log, ...
    pid: int  # `ray start`'s, the leader of the session of its processes (session_pids)


def head_env(cache: Path | str) -> dict[str, str]:
    """A user's environment (test_cli.user_env, with ``cache`` as the prior cache) who has
    activated the venv, so that a job's entrypoint finds `rtb-ray`, and set Ray's token
    authentication (README: `export RAY_AUTH_MODE=token`)."""
    env = user_env(cache)
    return {**env, "RAY_AUTH_MODE": "token", "VIRTUAL_ENV": str(VENV_BIN.parent),
            "PATH": os.pathsep.join(filter(None, [str(VENV_BIN), env.get("PATH")]))}


@contextmanager
def ray_head(tmp_path: Path, cache: Path | str, *, ports: list[int] | None = None,
             dashboard: bool = False, env: dict[str, str] | None = None,
             args: list[str] | tuple[str, ...] = (), name: str = "rtb-ray-") -> Iterator[RayHead]:
    """``ray start --head --block`` on 127.0.0.1 with 2 CPUs, in a session of its own, with
    ``args`` added and ``env`` over :func:`head_env`; ``ports`` (GCS, dashboard, client
    server, dashboard agent; default: free ones) when the caller must know the GCS port first.
    ``dashboard``: with the job server on http://127.0.0.1:<dashboard port> (only there)."""
    port, dashboard_port, client_port, agent_port = ports or free_ports(4)
    env = {**head_env(cache), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only
           **(env or {})}
    # `ray start` joins token authentication only with a token: the README's step, which makes
    # one only where none exists (a local ray.init makes it by itself; CI may not have one yet)
    subprocess.run([RAY_CLI, "get-auth-token", "--generate"], env=env, capture_output=True,
                   check=True)
    shown = (["--include-dashboard=true", "--dashboard-host=127.0.0.1"] if dashboard
             else ["--include-dashboard=false"])
    log_path = tmp_path / "head.log"
    log = open(log_path, "w")
    temp = tempfile.mkdtemp(prefix=name)  # short: Ray's socket paths are bounded
    head = subprocess.Popen(
        [RAY_CLI, "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         *shown, f"--dashboard-port={dashboard_port}",
         f"--ray-client-server-port={client_port}",
         f"--dashboard-agent-listen-port={agent_port}", "--disable-usage-stats",
         f"--temp-dir={temp}", *args],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    job_server = f"http://127.0.0.1:{dashboard_port}" if dashboard else None
    try:
        def head_up() -> bool:
            if head.poll() is not None:
                raise AssertionError(f"ray start exited ({head.returncode}):\n"
                                     f"{log_path.read_text()[-3000:]}")
            return "Ray runtime started" in log_path.read_text()

        wait_for("the head", head_up, timeout=120)
        if job_server is not None:
            wait_for("the job server", lambda: _answers(f"{job_server}/api/version"),
                     timeout=60)
        yield RayHead(f"127.0.0.1:{port}", job_server, env,
                      Path(temp) / "session_latest" / "logs", head.pid)
    finally:
        # SIGKILL: on SIGTERM `ray start` first drains its node, seconds for nothing here;
        # the cluster's state dies with it and its temp dir is removed below
        deadline = time.time() + 30
        while (pids := session_pids(head.pid)) and time.time() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _answers(url: str) -> bool:
    """The HTTP server answers (401 included: it asks for the token, as it should)."""
    try:
        urllib.request.urlopen(url, timeout=5).close()
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
