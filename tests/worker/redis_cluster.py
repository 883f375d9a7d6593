"""A local Redis Cluster for tests and benchmarks: primaries with a replica each, on free
loopback ports in a temporary folder, no persistence (`--appendonly no --save ''`), a short
node timeout so that a killed primary's replica takes over within seconds."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis as redis_py

NODE_TIMEOUT_MS = 3000  # 1 s made nodes of a loaded 2-core CI host fail each other over


class RedisCluster:
    def __init__(self, primaries: int = 3, replicas: int = 1) -> None:
        self.binary = shutil.which("redis-server")
        self.cli = shutil.which("redis-cli")
        self.primaries, self.replicas = primaries, replicas
        self.dir = tempfile.mkdtemp(prefix="mii-test-cluster-")
        self.ports = _free_ports(primaries * (1 + replicas))
        self.processes: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def _create(self) -> None:
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        if len(nodes) == 1:  # redis-cli wants three primaries: one node takes every slot
            self.node(self.ports[0]).execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
            return
        subprocess.run(
            [self.cli, "--cluster", "create", *nodes, "--cluster-replicas",
             str(self.replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip

    def start(self) -> RedisCluster:
        atexit.register(self.stop)  # even if a session's teardown does not run
        for port in self.ports:
            self._start_node(port)
        self._create()
        self.wait_ok()
        _wait(self._replicas_in_sync, 30)  # else a killed primary has no replica to promote
        return self

    def _replicas_in_sync(self) -> bool:
        replicas = [self.node(p).info("replication") for p in self.live_ports()]
        replicas = [r for r in replicas if r["role"] == "slave"]
        return len(replicas) == self.primaries * self.replicas and all(
            r["master_link_status"] == "up" for r in replicas
        )

    def _start_node(self, port: int) -> None:
        folder = os.path.join(self.dir, str(port))
        os.makedirs(folder, exist_ok=True)
        cmd = [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", folder,
               "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
               "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--appendonly", "no",
               "--save", ""]  # fmt: skip
        self.processes[port] = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, start_new_session=True
        )
        _wait(lambda: self.node(port).ping(), 10)

    def node(self, port: int) -> redis_py.Redis:
        return redis_py.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def info(self, port: int) -> dict:
        return {k: str(v) for k, v in self.node(port).cluster("INFO").items()}

    def live_ports(self) -> list[int]:
        return [p for p, proc in self.processes.items() if proc.poll() is None]

    def wait_ok(self, timeout_s: float = 30) -> None:
        """Until every live node says `cluster_state:ok` and the slots all have a primary."""

        def ok() -> bool:
            return all(self.info(p).get("cluster_state") == "ok" for p in self.live_ports())

        _wait(ok, timeout_s)

    def primary_of(self, key: str) -> int:
        """The port of the primary that serves `key`'s slot."""
        slot = self.node(self.live_ports()[0]).execute_command("CLUSTER KEYSLOT", key)
        return self._slot_owner(int(slot))

    def _slot_owner(self, slot: int) -> int:
        for start, end, primary, *_ in self.node(self.live_ports()[0]).execute_command(
            "CLUSTER SLOTS"
        ):
            if start <= slot <= end:
                return int(primary[1])
        raise LookupError(slot)

    def kill(self, port: int) -> None:
        """SIGKILL a node: a primary's replica is promoted after the node timeout."""
        process = self.processes[port]
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def wait_failover(self, dead: int, timeout_s: float = 30) -> None:
        """Until no live node lists `dead` as a primary and the cluster is ok again."""

        def promoted() -> bool:
            for port in self.live_ports():
                for _, _, primary, *_ in self.node(port).execute_command("CLUSTER SLOTS"):
                    if int(primary[1]) == dead:
                        return False
            return True

        _wait(promoted, timeout_s)
        self.wait_ok(timeout_s)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_ports(n: int) -> list[int]:
    """Ports whose cluster bus port (port + 10000) is free too; at most 55535."""
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(20000, 45000)
        if port not in ports and _free(port) and _free(port + 10000):
            ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except (redis_py.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{condition} not met in {timeout_s}s")
        time.sleep(0.05)
