"""A private RabbitMQ node for tests: Debian's ``rabbitmq-server``, started and stopped here.

The node gets its own name, AMQP and distribution ports, its own ``epmd`` (on a port of
its own, run by us so that nothing lingers after the node stops), and keeps mnesia,
logs, config and Erlang cookie under one temporary directory. A definitions file
creates one virtual host per Redis db number (``/1`` … ``/63``), so each test's broker
state is as separate as its Redis db. It does not import ``celery_flows``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

#: where Debian's package puts the real start script (``/usr/sbin/rabbitmq-server`` is a
#: wrapper that switches to the ``rabbitmq`` user and logs to /var/log)
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
VHOSTS = range(1, 64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_rabbitmq_server() -> str:
    for candidate in (os.environ.get("FLOWS_TEST_RABBITMQ_SERVER"), RABBITMQ_SERVER):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(
        f"no rabbitmq-server at {RABBITMQ_SERVER}: install Debian's package "
        "(apt-get install rabbitmq-server; bash .ci/run does it when run as root) or set "
        "FLOWS_TEST_RABBITMQ_SERVER to its rabbitmq-server script"
    )


class RabbitMQServer:
    """One private RabbitMQ node on 127.0.0.1; :meth:`url` gives a vhost's AMQP URL."""

    def __init__(self) -> None:
        self.executable = find_rabbitmq_server()
        self.dir = Path(tempfile.mkdtemp(prefix="cf-rmq-", dir="/tmp"))
        self.port = _free_port()
        self.dist_port = _free_port()
        self.epmd_port = _free_port()
        self.nodename = f"cf-{uuid.uuid4().hex[:10]}@localhost"
        self.log_path = self.dir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<RabbitMQServer {self.nodename} port={self.port}>"

    def url(self, vhost: int | str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"

    def _write_config(self) -> Path:
        names = [str(v) for v in VHOSTS]
        definitions = {
            "users": [{"name": "guest", "password": "guest", "tags": ["administrator"],
                       "limits": {}}],
            "vhosts": [{"name": name} for name in names],
            "permissions": [{"user": "guest", "vhost": name, "configure": ".*",
                             "write": ".*", "read": ".*"} for name in names],
        }
        (self.dir / "definitions.json").write_text(json.dumps(definitions))
        (self.dir / "enabled_plugins").write_text("[].\n")
        config = self.dir / "rabbitmq.conf"
        config.write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "definitions.import_backend = local_filesystem\n"
            f"definitions.local.path = {self.dir / 'definitions.json'}\n"
            # the tests' kill -9s and restarts must not trip the memory/disk alarms of a
            # busy shared machine
            "disk_free_limit.absolute = 1MB\n"
            "vm_memory_high_watermark.relative = 0.9\n"
        )
        return config

    def start(self, timeout: float = 120.0) -> None:
        config = self._write_config()
        env = {
            **os.environ,
            "HOME": str(self.dir),  # the Erlang cookie goes here, not in /root
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbit.pid"),
        }
        epmd = shutil.which("epmd") or "epmd"
        self.epmd = subprocess.Popen(
            [epmd, "-port", str(self.epmd_port)], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [self.executable], env=env, cwd=self.dir, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._accepts_amqp():
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self.process.returncode}:"
                                   f"\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"rabbitmq-server not ready after {timeout}s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def _accepts_amqp(self) -> bool:
        # the listener opens only once the broker (definitions included) has booted
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"AMQP\x00\x00\x09\x01")
                return s.recv(1) == b"\x01"  # Connection.Start frame
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def delete_queues(self, vhost: int | str, names: set[str]) -> None:
        """Drop what a test left in its vhost (undelivered and unacked messages)."""
        from kombu import Connection

        with Connection(self.url(vhost), connect_timeout=10) as conn:
            channel = conn.channel()
            for name in sorted(names):
                channel.queue_delete(name)

    def stop(self, timeout: float = 30.0) -> None:
        for proc in (self.process, self.epmd):
            if proc is None:
                continue
            if proc.poll() is None:
                # SIGTERM stops an Erlang node cleanly (init:stop)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            try:  # helpers of the VM (erl_child_setup, inet_gethost) share the group
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RabbitMQServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
