"""Celery worker processes to test flows against.

:class:`Worker` runs ``python -m celery -A <app> worker`` in its own session and process
group, with its output in a log file: a test can wait for a log line, SIGKILL the main
process, one pool child or the whole group, and no pool child outlives
:meth:`~Worker.stop` or :meth:`~Worker.kill9`.  It runs in its own session, so a Ctrl-C
in the terminal reaches only the Python process that started it, which then stops the
workers before Redis (their warm shutdown still needs Redis).  Process listing
(:meth:`Worker.child_pids`, :meth:`Worker.group_pids`) reads ``/proc`` and so works on
Linux only.
"""


from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

from ._common import _import_roots, _live_pids, _tail

__all__ = ["Worker", "WorkerFactory", "stop_all"]

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
        self._stopping = False
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
        self._stopping = False
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

    def begin_stop(self) -> None:
        """Start a warm shutdown (SIGTERM, once) without waiting for it: several
        workers then shut down side by side (see :func:`stop_all`)."""
        if self.process is not None and self.process.poll() is None and not self._stopping:
            self._stopping = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Warm shutdown: SIGTERM, and wait until the running tasks finished and the
        worker exited; after ``timeout`` seconds SIGKILL the whole process group.

        Whatever is left of the group afterwards is SIGKILLed too.  Returns the main
        process's exit code (None if it was never started).
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.begin_stop()
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


def stop_all(workers: Sequence[Worker], timeout: float = 15.0) -> None:
    """Warm-shut down several workers side by side, within one ``timeout`` for all."""
    for worker in workers:
        worker.begin_stop()
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.stop(timeout=max(deadline - time.monotonic(), 0.1))


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
