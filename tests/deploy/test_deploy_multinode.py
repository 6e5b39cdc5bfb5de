"""`dippipe run --address` on a real two-node Ray cluster, and the loss of a node mid-run.

Two Ray nodes run on this machine as separate `ray start --block` processes, as on a real
cluster: a head (GCS, driver) and a second node, each with 2 logical GPUs and a custom resource.
The test stops the second node while it is fitting, and checks that every job still ends with
exactly one `ok` row: the jobs it held are retried on the head.

Isolation from other Ray instances on this machine:
- each node gets its own loopback IP. Not 127.0.0.1: Ray replaces 127.0.0.1 / localhost by the
  machine's outward address (`resolve_ip_for_localhost`), which would take the traffic off `lo`
  and give both nodes one address. 127.0.0.2 / .3 are kept as given, so the `node` column of
  the results (the worker's node IP) tells the nodes apart, as pod IPs do on Kubernetes;
- a private auth token (RAY_AUTH_MODE=token): no other cluster's ~/.ray/auth_token is used,
  and nothing else can join this cluster;
- free ports for every fixed-port service, private temp dirs, no RAY_ADDRESS inherited;
- each node in its own process group, which holds its raylet and all of its workers: the
  test stops exactly those (never a global `ray stop`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; Linux only"),
]

HEAD_IP, NODE_B_IP = "127.0.0.2", "127.0.0.3"
BIN = Path(sys.executable).parent  # the venv's `ray` and `dippipe`
JOBS = 24
# Stop node B once this many PNGs exist and it has finished a job of its own: with one job
# per worker (the default) its workers are then fitting their next ones.
KILL_AFTER_IMAGES = 8
# Steps per job: enough that the 16 jobs left when node B dies keep the head's two workers
# busy well past the 2 s grace below (at 60 steps a fast machine finished them within it).
STEPS = 300
PARAMS = json.dumps({"channels": 8, "depth": 3, "input_depth": 8})
# The whole run takes well under a minute here; once node B is gone, the rest takes seconds.
START_TIMEOUT_S, FINISH_TIMEOUT_S = 150, 120

# Asks the cluster, from a separate driver process, which nodes are alive and with what.
NODES_QUERY = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.monotonic() + float(sys.argv[3])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= int(sys.argv[2]) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps({n["NodeManagerAddress"]: n["Resources"] for n in alive}))
"""


def _free_port(ip: str) -> int:
    with socket.socket() as sock:
        sock.bind((ip, 0))
        return sock.getsockname()[1]


def _process_tree(root: int) -> set[tuple[int, int]]:
    """(pid, start time) of `root` and all its descendants, from /proc.

    Ray workers run in process groups of their own, so killing the node's group is not
    enough; the start time guards against signalling a PID reused by someone else later.
    """
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)  # fields[1]: parent PID
        started[pid] = int(fields[19])  # fields[19]: start time, in clock ticks since boot
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in started:
            tree.add((pid, started[pid]))
            todo += children.get(pid, [])
    return tree


def _start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except OSError:
        return None


def _kill(processes: set[tuple[int, int]]) -> None:
    for pid, start in processes:
        if _start_time(pid) == start:  # still the process we saw, not a reused PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class RayNode:
    name: str
    ip: str
    temp_dir: Path
    process: subprocess.Popen

    def kill_now(self) -> None:
        """Every process of the node at once, as when a machine or a pod is lost."""
        _kill(_process_tree(self.process.pid))
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """Graceful first (Ray drains and exits on SIGTERM), then whatever is left."""
        processes = _process_tree(self.process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        _kill(processes | _process_tree(self.process.pid))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        log = self.temp_dir.with_suffix(".log")
        return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def _start_node(name: str, ip: str, env: dict[str, str], gcs: str | None) -> RayNode:
    temp_dir = Path(tempfile.mkdtemp(prefix=f"dpmn-{name}-", dir="/tmp"))  # short: socket paths
    args = [
        str(BIN / "ray"),
        "start",
        "--block",
        f"--node-ip-address={ip}",
        "--num-cpus=4",
        "--num-gpus=2",  # logical GPUs: Ray schedules on them; torch sees none and uses CPU
        f"--resources={json.dumps({name: 100})}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--dashboard-agent-listen-port={_free_port(ip)}",
        f"--dashboard-agent-grpc-port={_free_port(ip)}",
        f"--metrics-export-port={_free_port(ip)}",
        f"--runtime-env-agent-port={_free_port(ip)}",
    ]
    if gcs is None:
        args += [
            "--head",
            f"--port={_free_port(ip)}",
            "--include-dashboard=false",
            f"--dashboard-port={_free_port(ip)}",
        ]
    else:
        args.append(f"--address={gcs}")
    log = temp_dir.with_suffix(".log").open("wb")
    process = subprocess.Popen(
        args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return RayNode(name, ip, temp_dir, process)


def _gcs_address(head: RayNode) -> str:
    port = next(a.split("=", 1)[1] for a in head.process.args if a.startswith("--port="))
    return f"{head.ip}:{port}"


def _alive_nodes(gcs: str, env: dict[str, str], want: int, seconds: float = 90) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", NODES_QUERY, gcs, str(want), str(seconds)],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class Cluster:
    head: RayNode
    node_b: RayNode
    env: dict[str, str]

    @property
    def gcs(self) -> str:
        return _gcs_address(self.head)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        OMP_NUM_THREADS="1",
    )
    nodes: list[RayNode] = []
    try:
        nodes.append(_start_node("node_head", HEAD_IP, env, gcs=None))
        nodes.append(_start_node("node_b", NODE_B_IP, env, gcs=_gcs_address(nodes[0])))
        alive = _alive_nodes(_gcs_address(nodes[0]), env, want=2)
        assert sorted(alive) == [HEAD_IP, NODE_B_IP], (alive, [n.log_tail() for n in nodes])
        assert alive[HEAD_IP].get("node_head") == 100 and alive[HEAD_IP]["GPU"] == 2
        assert alive[NODE_B_IP].get("node_b") == 100 and alive[NODE_B_IP]["GPU"] == 2
        yield Cluster(nodes[0], nodes[1], env)
    finally:
        for node in reversed(nodes):
            node.stop()
            shutil.rmtree(node.temp_dir, ignore_errors=True)
            node.temp_dir.with_suffix(".log").unlink(missing_ok=True)


def _write_manifest(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    images = []
    for i in range(JOBS):
        size = (16, 20, 24)[i % 3]
        images.append(folder / f"noisy-{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(images[-1])
    table = pa.table(
        {
            "id": [f"job-{i:02d}" for i in range(JOBS)],
            "task": ["denoise"] * JOBS,
            "image": [str(p) for p in images],
            "iterations": pa.array([STEPS] * JOBS, pa.int32()),
            "params": [PARAMS] * JOBS,
        }
    )
    manifest = folder / "manifest.parquet"
    pq.write_table(table, manifest)
    return manifest


def _wait_for_both_nodes(
    out: Path, count: int, log: Path, run: subprocess.Popen, seconds: float
) -> None:
    """Until ``count`` images exist and node B has finished a job (the driver's log says so):
    the head alone may finish the first images when node B's workers start later."""
    node_b_done = re.compile(rf"job \S+ ok on \S+ on node {re.escape(NODE_B_IP)}\b")
    deadline = time.monotonic() + seconds
    while len(list(out.glob("images/*/*.png"))) < count or not node_b_done.search(
        log.read_text(errors="replace")
    ):
        assert run.poll() is None, "dippipe ended before node B could be stopped mid-run"
        assert time.monotonic() < deadline, (
            f"not {count} images and a job done on node B after {seconds}s"
        )
        time.sleep(0.1)


def test_run_spans_both_nodes_and_survives_losing_one(cluster: Cluster, tmp_path: Path):
    manifest, out = _write_manifest(tmp_path), tmp_path / "out"
    command = [str(BIN / "dippipe"), "run", str(manifest), "--out", str(out)]
    command += ["--gpus", "4", "--address", cluster.gcs, "--no-progress"]
    # A local OUT with a second machine in the cluster is refused before any work: node B's
    # workers would write their images on their own disk.
    refused = subprocess.run(command, env=cluster.env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=START_TIMEOUT_S)  # fmt: skip
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and "--shared-out" in said and NODE_B_IP in said, said[-3000:]
    assert not list(out.glob("results/*.parquet")) and not list(out.glob("images/*/*")), said
    # Both "machines" are this one: the path is shared, as an NFS mount would be.
    command.append("--shared-out")
    log_path = tmp_path / "dippipe.log"
    with log_path.open("wb") as log:
        run = subprocess.Popen(
            command, env=cluster.env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_for_both_nodes(out, KILL_AFTER_IMAGES, log_path, run, seconds=START_TIMEOUT_S)
        # Every process of node B at once, not `ray stop`: the node vanishes as a lost
        # machine or a preempted pod does, with its two workers in the middle of a fit.
        cluster.node_b.kill_now()
        killed_at = datetime.now(timezone.utc)
        code = run.wait(timeout=FINISH_TIMEOUT_S)
    except (AssertionError, subprocess.TimeoutExpired) as error:
        run.kill()
        run.wait()
        if isinstance(error, subprocess.TimeoutExpired):
            error = f"dippipe was still running {FINISH_TIMEOUT_S}s after node B was lost"
        pytest.fail(f"{error}\n--- dippipe log ---\n{log_path.read_text()[-6000:]}")
    output = log_path.read_text()
    assert code == 0, output[-5000:]

    results = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("results/*.parquet")))
    rows = results.to_pylist()
    # Everything landed, once: one ok row and one PNG per job.
    assert sorted(r["id"] for r in rows) == [f"job-{i:02d}" for i in range(JOBS)], output
    assert {r["status"] for r in rows} == {"ok"}, [r["error"] for r in rows]
    assert len(list(out.glob("images/*/*.png"))) == JOBS

    # Both nodes did work; after node B was gone, only the head did.
    nodes = {r["node"] for r in rows}
    assert nodes == {HEAD_IP, NODE_B_IP}, nodes
    # (2 s of grace: a result node B sent just before it died may be collected just after.)
    after = [r for r in rows if r["finished_at"] > killed_at + timedelta(seconds=2)]
    assert after and {r["node"] for r in after} == {HEAD_IP}
    # The jobs node B held were not lost: they were retried (attempt 2) on the head.
    retried = [r for r in rows if r["attempts"] > 1]
    assert retried and {r["node"] for r in retried} == {HEAD_IP}, output[-5000:]
    summary = json.loads((out / "run.json").read_text())["summary"]
    assert summary["worker_deaths"] >= 1 and summary["failed"] == 0
