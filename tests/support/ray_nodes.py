"""A real Ray head for the tests: `ray start --head --block` on a loopback address of its own.

Isolated from any other Ray instance on the machine, as tests/deploy/test_deploy_multinode.py
does it (its docstring gives the reasons):
- its own loopback IP (not 127.0.0.1, which Ray swaps for the machine's outward address);
- a private token (RAY_AUTH_MODE=token): no other cluster's ~/.ray/auth_token is used;
- free ports for every fixed-port service, a private short temp dir (Unix socket paths are
  limited to 107 bytes), no RAY_* variable inherited;
- stopped through the process tree of the `ray start` process we started: SIGTERM first,
  then SIGKILL for whatever is left (Ray workers and job drivers run in sessions of their
  own, so a process group is not enough). Never `ray stop`, which stops every Ray here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's `ray` and `dippipe`


def free_port(ip: str) -> int:
    with socket.socket() as sock:
        sock.bind((ip, 0))
        return sock.getsockname()[1]


def _start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except OSError:
        return None


def process_tree(root: int) -> set[tuple[int, int]]:
    """(pid, start time) of `root` and every descendant; the start time guards against
    signalling a PID that was reused by another process meanwhile."""
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        started[int(entry.name)] = int(fields[19])
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in started:
            tree.add((pid, started[pid]))
            todo += children.get(pid, [])
    return tree


def kill_tree(processes: set[tuple[int, int]]) -> None:
    for pid, start in processes:
        if _start_time(pid) == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def ray_env(**extra: str) -> dict[str, str]:
    """This process's environment without RAY_* (and without the AWS_* keys, which a test
    hands to its Ray jobs explicitly), plus a private token and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        OMP_NUM_THREADS="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


@dataclass
class RayHead:
    ip: str
    env: dict[str, str]
    temp_dir: Path
    process: subprocess.Popen
    gcs_port: int
    dashboard_port: int
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.temp_dir.with_suffix(".log")

    @property
    def dashboard(self) -> str:
        return f"http://{self.ip}:{self.dashboard_port}"

    def wait_ready(self, seconds: float) -> None:
        """Until the Jobs API answers (the dashboard's job module is the last to come up)."""
        deadline = time.monotonic() + seconds
        request = urllib.request.Request(
            f"{self.dashboard}/api/jobs/",
            headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"},
        )
        while True:
            assert self.process.poll() is None, f"ray start exited:\n{self.log_tail()}"
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    json.load(answer)
                    return
            except OSError as error:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no Jobs API after {seconds}s: {error}\n"
                                         f"{self.log_tail()}") from None  # fmt: skip
                time.sleep(0.5)

    def stop(self, grace: float = 10) -> None:
        """SIGTERM to `ray start` (it stops its node), SIGKILL for what is left after `grace`
        seconds (measured here: `ray start --block` took 30 s and more to exit on SIGTERM)."""
        processes = process_tree(self.process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)
        kill_tree(processes | process_tree(self.process.pid))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.log.unlink(missing_ok=True)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def start_head(ip: str, env: dict[str, str], num_cpus: int) -> RayHead:
    """A head with its dashboard (the Jobs API that `ray job submit` and KubeRay use)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="dpjs-", dir="/tmp"))
    gcs_port, dashboard_port = free_port(ip), free_port(ip)
    args = [
        str(BIN / "ray"), "start", "--head", "--block",
        f"--node-ip-address={ip}", f"--port={gcs_port}",
        "--include-dashboard=true", f"--dashboard-host={ip}", f"--dashboard-port={dashboard_port}",
        f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
        f"--dashboard-agent-listen-port={free_port(ip)}",
        f"--dashboard-agent-grpc-port={free_port(ip)}",
        f"--metrics-export-port={free_port(ip)}",
        f"--runtime-env-agent-port={free_port(ip)}",
        f"--ray-client-server-port={free_port(ip)}",
    ]  # fmt: skip
    log = temp_dir.with_suffix(".log").open("wb")
    process = subprocess.Popen(
        args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return RayHead(ip, env, temp_dir, process, gcs_port, dashboard_port)
