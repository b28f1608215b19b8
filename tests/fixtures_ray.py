"""A two-node Ray cluster started as a user starts one: `ray start --head` and `ray start --address`
in separate processes, the second node marked with the custom resource `node_b`.

Each `ray start` runs in a session of its own, and its daemons (GCS, raylet, agents, workers) stay
in that session after `ray start` returns, so stopping the cluster signals exactly those processes
(never `ray stop`, which stops every Ray on the machine). Ray's gRPC servers listen on every
interface, and Ray has no setting to bind them to loopback; so, where the kernel lets us (root,
util-linux `unshare`/`nsenter`, iproute2), the nodes and every driver of the test run in a private
network namespace whose only interface is loopback. Elsewhere they run on the host network, with
the node address 127.0.0.1. The cluster authenticates with a token of its own, passed in the
environment (`RAY_AUTH_TOKEN`), so nothing is written to ~/.ray.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from fixtures_processes import free_port, start, stop, stop_session, tail, wait_until

NODE_ARGS = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats", "--object-store-memory", "80000000"]
START_TIMEOUT = 180  # seconds for one `ray start` on a loaded machine
NODES = """
import json, ray
ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)
print(json.dumps({{node["NodeID"]: sorted(node["Resources"]) for node in ray.nodes() if node["Alive"]}}))
"""


def ray_command() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


class LoopbackNetwork:
    """A network namespace with only `lo`, held open by a sleeping process; `prefix` runs a command
    in it. `prefix` is empty where no namespace could be made."""

    def __init__(self, workdir: Path) -> None:
        self.holder: subprocess.Popen | None = None
        self.prefix: list[str] = []
        if os.geteuid() != 0 or not all(map(shutil.which, ("unshare", "nsenter", "ip"))):
            return
        # Ray names its node by the host name's address when it finds no route: make that address local too
        address = socket.gethostbyname(socket.gethostname())
        extra = "" if address.startswith("127.") else f" && ip addr add {address}/32 dev lo"
        log = workdir / "netns.log"
        holder = start(["unshare", "--net", "--", "sh", "-c", f"ip link set lo up{extra} && echo ready && exec sleep 3600"], log)
        try:
            wait_until(lambda: "ready" in log.read_text(), 30, "network namespace", alive=holder)
        except (RuntimeError, TimeoutError):  # not permitted here (a container without CAP_SYS_ADMIN)
            stop(holder)
            return
        self.holder = holder
        self.prefix = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]

    def close(self) -> None:
        if self.holder is not None:
            stop(self.holder)


class RayCluster:
    """Head and second node; `address` is what `--address` takes."""

    def __init__(self, workdir: Path) -> None:
        # short: Ray's Unix socket paths under it must stay below 108 bytes
        self.temp = Path(tempfile.mkdtemp(prefix="ap-ray-"))
        self.workdir = workdir
        self.network = LoopbackNetwork(workdir)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.sessions: list[int] = []

    @property
    def isolated(self) -> bool:
        return bool(self.network.prefix)

    def run(self, command: list[str], log: Path, timeout: float, cwd: Path | None = None) -> subprocess.Popen:
        """Run a command in the cluster's network, in a session of its own, until it exits."""
        process = start([*self.network.prefix, *command], log, env=self.env, cwd=cwd or self.workdir)
        self.sessions.append(process.pid)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{' '.join(command[:3])} ... still running after {timeout:.0f} s; log:\n{tail(log)}") from None
        return process

    def start(self) -> None:
        ray = ray_command()
        head = self.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                         "--include-dashboard", "false", "--temp-dir", str(self.temp / "head"), *NODE_ARGS],
                        self.workdir / "ray-head.log", START_TIMEOUT)
        assert head.returncode == 0, tail(self.workdir / "ray-head.log")
        second = self.run([ray, "start", "--address", self.address, "--resources", json.dumps({"node_b": 1}),
                           "--temp-dir", str(self.temp / "node_b"), *NODE_ARGS],
                          self.workdir / "ray-node_b.log", START_TIMEOUT)
        assert second.returncode == 0, tail(self.workdir / "ray-node_b.log")

    def nodes(self) -> dict[str, list[str]]:
        """Live node id -> its resource names, asked of the cluster by a driver of its own."""
        log = self.workdir / "ray-nodes.log"
        listing = self.run([sys.executable, "-c", NODES.format(address=self.address)], log, 120)
        assert listing.returncode == 0, tail(log)
        return json.loads(log.read_text().strip().splitlines()[-1])

    def stop(self) -> None:
        """Stop every process this cluster started, session by session, then its network."""
        try:
            for session in self.sessions:
                stop_session(session, grace=5)
        finally:
            self.network.close()
            shutil.rmtree(self.temp, ignore_errors=True)
