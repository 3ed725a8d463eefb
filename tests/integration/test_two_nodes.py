"""One training job spreads its Ray Train workers over two Ray nodes, both on this machine and on loopback.

The head starts as infra/local-stack.sh starts it (`ray start --head`, node address 127.0.0.1 through
RAY_LOOPBACK_ENV=0). The second node is not a second `ray start`, because Ray 2.60's `ray start --address`
cannot join a loopback head on the same host: with RAY_LOOPBACK_ENV=0 it refuses to start a worker node
("Multi-node Ray clusters are not supported on Windows and OSX"), and without it it replaces 127.0.0.1 in
--address and --node-ip-address by the host's address, where the loopback head does not listen (a node on any
other address binds every interface). So the second node runs the call that `ray start --address ... --block`
makes once past those two checks, `ray._private.node.Node(head=False)` (as `ray.cluster_utils` adds nodes), in a
process of its own: a raylet, object store and agents of its own, joining the head over its GCS port.

Token auth (RAY_AUTH_MODE=token), as a real cluster runs, with a token of this test's own in RAY_AUTH_TOKEN for
every process: ~/.ray/auth_token, which other clusters on this machine read, is neither read nor written.

Never `ray stop` here: it stops every Ray process on the machine (the session's own cluster, other users'). Each
node starts in a session of its own and is stopped by signalling its process group.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Iterator

import pytest

from pipelines.settings import DATA_DIR_ENV, RAY_LOOPBACK_ENV

BIN = Path(sys.executable).parent

# The second node: what `ray start --address=GCS --block` runs after its command-line checks.
JOIN_NODE = """
import signal, sys, time
from ray._private.node import Node
from ray._private.parameter import RayParams
gcs, temp_dir, agent_port = sys.argv[1:]
node = Node(RayParams(gcs_address=gcs, node_ip_address="127.0.0.1", num_cpus=1, num_gpus=0, temp_dir=temp_dir,
                      dashboard_agent_listen_port=int(agent_port)),
            head=False, shutdown_at_exit=True, spawn_reaper=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # atexit: the node stops its raylet and agents
print(node.node_id, flush=True)
while True:
    time.sleep(3600)
"""

# Every RayTrainWorker actor the cluster has seen (dead ones too: the job has ended) and the cluster's nodes.
LIST_WORKERS = """
import json, sys
from ray.util.state import list_actors, list_nodes
address = sys.argv[1]
actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
print(json.dumps({"workers": [{"node_id": a.node_id, "state": a.state} for a in actors],
                  "nodes": sorted(n.node_id for n in list_nodes(address=address) if n.state == "ALIVE")}))
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _group_alive(pgid: int) -> bool:
    return subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).returncode == 0


def _stop_groups(groups: list[int], children: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM to each process group, SIGKILL to what is left after `grace` s (the GCS server outlasts 20 s).
    `children` (ours, in those groups) are reaped on the way: a zombie still counts as a member of its group."""
    def alive() -> bool:
        for child in children:
            child.poll()
        return any(_group_alive(g) for g in groups)

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)


def _listeners(groups: list[int]) -> list[str]:
    """Local addresses (host:port) that the processes of these groups listen on."""
    pids = {p for g in groups for p in subprocess.run(["pgrep", "-g", str(g)], capture_output=True,
                                                      text=True).stdout.split()}
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line.split()[3] for line in lines if any(f"pid={p}," in line for p in pids)]


class TwoNodes:
    """A head and one more node on 127.0.0.1, one CPU each, with their own temp dir, ports and auth token."""

    def __init__(self, root: Path):
        self.root = root
        self.gcs_port, self.dashboard_port, self.head_agent_port, self.client_port, self.node_agent_port = (
            _free_ports(5))
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MLFLOW_TRACKING_URI"}
        # RAY_ADDRESS for the nodes too: Ray Train's own state-API calls inside the cluster (its placement group
        # cleaner) look for "the" cluster of this machine otherwise, and several run here under other temp dirs.
        self.env = {**env, RAY_LOOPBACK_ENV: "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_ADDRESS": self.address}
        self.groups: list[int] = []
        self.node_process: subprocess.Popen | None = None

    def _log(self, name: str):
        return open(self.root / f"{name}.log", "w")

    def start(self) -> None:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
             "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(self.root / "head"),
             "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
             "--dashboard-agent-listen-port", str(self.head_agent_port),
             "--ray-client-server-port", str(self.client_port), "--disable-usage-stats"],
            env=self.env, stdout=self._log("head"), stderr=subprocess.STDOUT, start_new_session=True)
        self.groups.append(head.pid)
        assert head.wait(timeout=180) == 0, (self.root / "head.log").read_text()[-3000:]

        self.node_process = subprocess.Popen(
            [sys.executable, "-c", JOIN_NODE, self.address, str(self.root / "node"), str(self.node_agent_port)],
            env=self.env, stdout=subprocess.PIPE, stderr=self._log("node"), text=True, start_new_session=True)
        self.groups.append(self.node_process.pid)
        node_id = self.node_process.stdout.readline().strip()  # printed once the node has registered
        assert node_id, (self.root / "node.log").read_text()[-3000:]

    def stop(self) -> None:
        _stop_groups(self.groups, [self.node_process] if self.node_process else [])


@pytest.fixture
def two_nodes() -> Iterator[TwoNodes]:
    # A short path of our own: Ray's socket paths under it must stay within the 107-byte limit of AF_UNIX.
    root = Path(tempfile.mkdtemp(prefix="effnet-2n-", dir="/tmp"))
    cluster = TwoNodes(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        left = [g for g in cluster.groups if _group_alive(g)]
        if not left:
            shutil.rmtree(root, ignore_errors=True)  # the nodes' logs, sockets and spilled objects
        assert not left, f"processes left in groups {left} (logs under {root})"


def test_one_job_spreads_over_two_nodes(two_nodes: TwoNodes, staged_dataset: Path, tmp_path: Path) -> None:
    non_loopback = [a for a in _listeners(two_nodes.groups) if not a.startswith(("127.", "[::ffff:127."))]
    assert not non_loopback, f"Ray listens beyond loopback: {non_loopback}"

    env = {**two_nodes.env, DATA_DIR_ENV: str(tmp_path / "data")}  # its RAY_ADDRESS: the job joins these nodes
    train = subprocess.run(
        [sys.executable, "-m", "cli.effnet", "train", "--recipe", "demo", "--epochs", "1", "--data",
         str(staged_dataset)],
        env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert train.returncode == 0, train.stderr[-5000:]
    # Every process of the job reached this cluster with its token (Ray's own lookups of "the" cluster included).
    assert "AuthenticationError" not in train.stderr, train.stderr[-5000:]
    result = json.loads(train.stdout)
    assert result["epochs_run"] == 1 and result["version"]
    # The raylets' worker processes (the idle ones are still there) bound loopback as well.
    non_loopback = [a for a in _listeners(two_nodes.groups) if not a.startswith(("127.", "[::ffff:127."))]
    assert not non_loopback, f"Ray's workers listen beyond loopback: {non_loopback}"

    state = subprocess.run([sys.executable, "-c", LIST_WORKERS, two_nodes.dashboard_url], env=two_nodes.env,
                           capture_output=True, text=True, timeout=120)
    assert state.returncode == 0, state.stderr[-3000:]
    seen = json.loads(state.stdout)
    assert len(seen["nodes"]) == 2, seen
    # The demo recipe's two workers x 1 CPU fit only one per node: the job ran on both.
    assert sorted({w["node_id"] for w in seen["workers"]}) == seen["nodes"], seen
