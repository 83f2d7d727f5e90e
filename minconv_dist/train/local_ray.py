"""A throw-away Ray head on this machine, for tests, benchmarks and one-machine jobs: every service on
127.0.0.1 (Ray's single-machine mode, `LOCAL_ONLY`), token authentication on with a token of its own, in its
own temporary folder with its own free ports, and stopped by the PIDs of its own processes (never
`ray stop`, which stops every Ray of this user on the machine)."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

# Ray's single-machine mode: the node address is 127.0.0.1, so GCS, raylet, workers and agents listen on
# loopback only (without it Ray 2.60 binds them to every interface, whatever --node-ip-address says). Ray
# reads it when first imported, so it goes into the environment of the processes that start Ray.
LOCAL_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_executable() -> str:
    """The `ray` command beside this Python (a venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


@dataclass
class LocalHead:
    address: str  # the dashboard / job server, e.g. http://127.0.0.1:8265
    env: dict[str, str]  # the environment for `ray job submit` (token included)
    temp_dir: str
    gcs_address: str  # what `ray status --address` and drivers (RAY_ADDRESS) connect to

    def job_client(self) -> Any:
        """A JobSubmissionClient that shows the head's token itself (Ray reads RAY_AUTH_* once per process)."""
        from ray.job_submission import JobSubmissionClient

        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {token}"})

    def processes(self) -> list[psutil.Process]:
        """This head's processes, and those of the nodes it started."""
        return processes_under(self.temp_dir)


def processes_under(temp_dir: str) -> list[psutil.Process]:
    """The Ray daemons (GCS, raylets, agents) of a Ray whose temp dir is `temp_dir`: every process whose command line
    names it."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _stage(proc: psutil.Process) -> int:
    """When `stop` signals a Ray daemon: first the helpers (autoscaler, dashboard, log monitor: on SIGTERM they
    report to the GCS, and wait for it), then raylets (their workers go with them), then the GCS."""
    with suppress(psutil.Error):
        cmdline = " ".join(proc.cmdline())
        if "/raylet/raylet" in cmdline:
            return 1
        if "/gcs/gcs_server" in cmdline:
            return 2
    return 0


def stop(procs: list[psutil.Process], grace_s: float = 15) -> None:
    """SIGTERM `procs` stage by stage (`_stage`), SIGKILLing those of a stage still there after `grace_s`. In that
    order a head stops in ~6 s; signalled all at once, its daemons waited for each other until the grace ended."""
    stages = {proc: _stage(proc) for proc in procs}
    for stage in range(3):
        batch = [proc for proc in procs if stages[proc] == stage]
        for proc in batch:
            with suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGTERM)
        for proc in psutil.wait_procs(batch, timeout=grace_s)[1]:
            with suppress(psutil.NoSuchProcess):
                proc.kill()


@contextmanager
def local_ray_head(num_cpus: int, num_gpus: int = 0, env: dict[str, str] | None = None, port: int | None = None,
                   args: Sequence[str] = ()) -> Iterator[LocalHead]:
    """`ray start --head` on 127.0.0.1 with `num_cpus` / `num_gpus`, its GCS on `port` (default: a free one) and
    `args` (more `ray start` flags), yielding where to submit jobs and the environment (token included) that a job
    client needs. Every process of the head, and of nodes it starts (an autoscaler's), is stopped by PID."""
    port = port or free_port()
    temp_dir = tempfile.mkdtemp(prefix="mcr", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    dashboard = free_port()
    env = dict(os.environ if env is None else env, **LOCAL_ONLY, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_TMPDIR=temp_dir, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    head = LocalHead(f"http://127.0.0.1:{dashboard}", env, temp_dir, f"127.0.0.1:{port}")
    try:
        started = subprocess.run(
            [ray_executable(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--temp-dir={temp_dir}", "--disable-usage-stats", *args],
            env=env, capture_output=True, text=True, timeout=180,
        )
        if started.returncode:
            raise RuntimeError(f"ray start --head failed (exit {started.returncode}): {started.stderr[-3000:]}")
        yield head
    finally:
        stop(head.processes())
        shutil.rmtree(temp_dir, ignore_errors=True)
