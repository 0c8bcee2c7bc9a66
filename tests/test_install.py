"""What users get: the built wheel and sdist, installed into a fresh venv, run for real.

``.ci/run`` builds the wheel and sdist once (``python -m build``, ``twine check``) and
names their folder in ``FLOWS_TEST_DIST``; without it this module builds them itself
from the checkout (``FLOWS_TEST_SOURCE``, default: the repository root). The fresh venv
gets only the wheel and what pip resolves for it; its worker and producer run in a
directory holding nothing but a small app module, so no checkout can shadow the
installed package. The flow there goes through every part a missing file would break:
the flow scripts, the global scripts (heartbeat, limiter), a flow rate limit, a worker
``kill -9`` and the recovery of its node as a new attempt, and ``celery flows``
through its entry point.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_flows.testing import Worker, wait_until
from tests.conftest import RedisDB
from tests.helpers import ROOT

DIST_ENV = "FLOWS_TEST_DIST"
SOURCE_ENV = "FLOWS_TEST_SOURCE"
LEASE = 2.0

APP = textwrap.dedent('''
    import os
    import time

    import redis
    from celery import Celery

    from celery_flows import Flows, current_flow

    URL = os.environ["FLOWS_TEST_BROKER"]
    app = Celery("installed_app", broker=URL, backend=URL)
    app.conf.update(broker_connection_retry_on_startup=True, worker_prefetch_multiplier=1,
                    flows_lease_timeout=float(os.environ["LEASE"]))
    flows = Flows(app)
    log = redis.Redis.from_url(os.environ["REDIS_PY_URL"])


    def mark():
        log.rpush("runs", f"{current_flow.node_id}|{current_flow.attempt}")


    @flows.task
    def hold(key):
        mark()
        while not log.exists(key):
            time.sleep(0.05)
        return key


    @flows.task
    def double(x):
        mark()
        return 2 * x


    @flows.task
    def total(values):
        mark()
        return sum(v for v in values if isinstance(v, int))
''')

DRIVER = textwrap.dedent('''
    import json
    import sys

    import celery_flows
    from celery_flows import Flow
    from installed_app import double, flows, hold, total

    if sys.argv[1] == "submit":
        f = Flow("installed", id="installed-1", rate_limit="5/s")
        held = f.add(hold.si("go"), id="hold")
        ds = [f.add(double.si(i), id=f"d{i}") for i in range(6)]
        f.add(total.s(), id="total", after=[held, *ds])
        handle = flows.submit(f)
        print(json.dumps({"id": handle.id, "module": celery_flows.__file__}))
    else:
        handle = flows.get(sys.argv[2])
        state = handle.wait(timeout=90)
        print(json.dumps({"state": str(state.value), "results": handle.results(),
                          "nodes": handle.inspect()["nodes"]}))
''')


def _source() -> Path:
    source = Path(os.environ.get(SOURCE_ENV) or ROOT)
    if not (source / "celery_flows").is_dir():
        raise RuntimeError(f"{source} holds no celery_flows/: set {SOURCE_ENV} to the "
                           f"checkout, or {DIST_ENV} to a folder with the built wheel")
    return source


def _run(*args: str | Path, cwd: Path | None = None, timeout: float = 600,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited with {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _venv(path: Path) -> Path:
    _run(sys.executable, "-m", "venv", path)
    return path / "bin" / "python"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding the wheel and the sdist."""
    given = os.environ.get(DIST_ENV)
    if given:
        return Path(given)
    # build from a copy: building writes build/ and *.egg-info next to the sources
    work = tmp_path_factory.mktemp("build")
    src = work / "src"
    shutil.copytree(_source(), src, ignore=shutil.ignore_patterns(
        ".git", ".*venv*", "venv", "dist", "build", "*.egg-info", "__pycache__",
        ".*_cache"))
    python = Path(sys.executable)
    if importlib.util.find_spec("build") is None:
        python = _venv(work / "venv")
        _run(python, "-m", "pip", "install", "--quiet", "build")
    _run(python, "-m", "build", "--outdir", work / "dist", src, cwd=work)
    return work / "dist"


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, found {found}"
    return found[0]


def test_wheel_and_sdist_carry_every_file_of_the_package(dist: Path) -> None:
    source = _source()
    package = {
        p.relative_to(source).as_posix()
        for p in (source / "celery_flows").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert {"celery_flows/registry/lua/global/heartbeat.lua", "celery_flows/py.typed"} <= package
    wheel = set(zipfile.ZipFile(_one(dist, "celery_flows-*.whl")).namelist())
    assert sorted(package - wheel) == []
    assert {name.split("/")[0] for name in wheel} == {
        "celery_flows", next(n.split("/")[0] for n in wheel if ".dist-info/" in n)}
    with tarfile.open(_one(dist, "celery_flows-*.tar.gz")) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers()
                   if m.isfile() and "/" in m.name}
    assert sorted(package - members) == []
    assert {"tests/conftest.py", "setup.cfg", "pyproject.toml", "MANIFEST.in"} <= members


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv's python with the wheel installed (dependencies from the index)."""
    python = _venv(tmp_path_factory.mktemp("fresh") / "venv")
    _run(python, "-m", "pip", "install", "--quiet", _one(dist, "celery_flows-*.whl"))
    return python


@pytest.fixture
def app_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "installed_app.py").write_text(APP)
    (folder / "driver.py").write_text(DRIVER)
    yield folder


def test_installed_wheel_runs_a_flow_through_a_worker_kill_and_recovery(
    installed: Path, app_dir: Path, redis_db: RedisDB, tmp_path: Path
) -> None:
    env = {**os.environ, "FLOWS_TEST_BROKER": redis_db.celery_url,
           "REDIS_PY_URL": redis_db.redis_url, "LEASE": str(LEASE), "PYTHONPATH": ""}
    workers: list[Worker] = []

    def worker(name: str) -> Worker:
        w = Worker("installed_app", python=str(installed), cwd=app_dir, flows=True,
                   env={k: env[k] for k in ("FLOWS_TEST_BROKER", "REDIS_PY_URL", "LEASE",
                                            "PYTHONPATH")},
                   name=f"{name}-{redis_db.db}", log_path=tmp_path / f"celery-{name}.log")
        workers.append(w)
        return w.start().wait_ready(60)

    try:
        doomed = worker("doomed")
        submitted = json.loads(_run(installed, "driver.py", "submit", cwd=app_dir,
                                    env=env).stdout)
        # the producer imported the installed package, not a checkout
        assert Path(submitted["module"]).resolve().is_relative_to(installed.parent.parent)
        fid = submitted["id"]
        wait_until(lambda: b"hold|1" in redis_db.client.lrange("runs", 0, -1),
                   "hold to start", timeout=30)
        doomed.kill9()
        redis_db.client.set("go", 1)  # attempt 2 of hold returns at once
        worker("survivor")
        done = json.loads(_run(installed, "driver.py", "wait", fid, cwd=app_dir,
                               env=env, timeout=120).stdout)
        cli = _run(installed.parent / "celery", "-A", "installed_app", "flows", "inspect",
                   fid, "--json", cwd=app_dir, env=env, timeout=120)
    finally:
        for w in workers:
            w.kill9()
    assert done["state"] == "succeeded", json.dumps(done, indent=1)
    results = done["results"]
    assert results == {"hold": "go", **{f"d{i}": 2 * i for i in range(6)},
                       "total": sum(2 * i for i in range(6))}
    hold = done["nodes"]["hold"]
    assert hold["attempts"] == 2 and hold["recoveries"] == 1
    runs = [r.decode() if isinstance(r, bytes) else r
            for r in redis_db.client.lrange("runs", 0, -1)]
    assert [r for r in runs if r.startswith("hold|")] == ["hold|1", "hold|2"]
    assert sorted(runs) == sorted(["hold|1", "hold|2", "total|1",
                                   *(f"d{i}|1" for i in range(6))])
    # the flow's 5/s limit: six releases at least 0.2 s apart (Redis TIME)
    released = sorted(done["nodes"][f"d{i}"]["queued_at"] for i in range(6))
    assert released[-1] - released[0] >= 0.95
    assert json.loads(cli.stdout)["state"] == "succeeded"
