"""``celery_flows.testing`` as a user meets it.

The plugin test writes a small project (an app module with two tasks, a ``conftest.py``
with nothing but ``pytest_plugins = [...]``, a test module) into a temporary folder and
runs pytest on it in a subprocess: the fixtures must start a real Redis and real
workers, run a flow, give every test an empty database, stop every process they started
and show the worker's log when a test fails.  The other tests use the classes directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from celery_flows.testing import RedisServer, Worker, find_redis_server, wait_until
from tests.conftest import ImportApp, RedisDB
from tests.helpers import BROKER_ENV, ROOT, pid_alive

APP = '''
import os

from celery import Celery

from celery_flows import Flows, current_flow

# nothing listens there: in the tests CELERY_BROKER_URL and CELERY_RESULT_BACKEND win
app = Celery("tinyapp", broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/0")
app.conf.broker_connection_retry_on_startup = True
flows = Flows(app)


@flows.task
def add(x, y):
    return x + y


@flows.task
def where(previous=None):
    return {"pid": os.getpid(), "flow": current_flow.id, "previous": previous}
'''

TESTS = '''
import os

from celery_flows import Flow, FlowState
from celery_flows.testing import RedisDatabase, RedisServer, WorkerFactory

import tinyapp


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def record(kind, value):
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write(f"{kind} {value}\\n")


def test_a_flow_runs_on_a_real_worker(flows_worker: WorkerFactory,
                                      flows_redis_db: RedisDatabase) -> None:
    worker = flows_worker("tinyapp")
    assert "--flows" in worker.command
    children = worker.wait_children()
    record("worker", worker.pid)
    for pid in children:
        record("child", pid)
    f = Flow("sum")
    a = f.add(tinyapp.add.s(1, 2), id="a")
    b = f.add(tinyapp.add.s(10), id="b", after=[a])
    f.add(tinyapp.where.s(), id="where", after=[b])
    handle = tinyapp.flows.submit(f)
    assert handle.wait(timeout=60) is FlowState.SUCCEEDED
    results = handle.results()
    assert (results["a"], results["b"]) == (3, 13)
    assert results["where"] == {"pid": results["where"]["pid"], "flow": handle.id,
                                "previous": 13}
    assert results["where"]["pid"] in children  # a pool process of that worker ran it
    assert results["where"]["pid"] != os.getpid()
    assert flows_redis_db.client.dbsize() > 0  # the flow's state is in this database
    flows_redis_db.client.set("left-behind", 1)


def test_each_test_gets_an_empty_database(flows_redis_db: RedisDatabase,
                                          flows_redis: RedisServer) -> None:
    assert flows_redis_db.client.dbsize() == 0
    assert flows_redis_db.server is flows_redis
    record("redis", flows_redis.pid)
    record("dir", flows_redis.dir)


def test_workers_of_earlier_tests_are_gone(flows_worker: WorkerFactory,
                                           flows_celery_env: dict) -> None:
    assert os.environ["CELERY_BROKER_URL"] == flows_celery_env["CELERY_BROKER_URL"]
    with open(os.environ["RECORD_FILE"]) as f:
        started = [int(line.split()[1]) for line in f if line.split()[0] in ("worker", "child")]
    assert started
    assert not [pid for pid in started if alive(pid)]
    threads = flows_worker("tinyapp", flows=False, pool="threads", concurrency=1,
                           queues=["io"], name="io-only")
    assert "--flows" not in threads.command and threads.nodename.startswith("io-only@")
    assert tinyapp.add.apply_async((20, 22), queue="io").get(timeout=30) == 42


def test_a_failing_test_shows_the_worker_log(flows_worker: WorkerFactory) -> None:
    flows_worker("tinyapp", name="doomed")
    assert tinyapp.add.delay(2, 2).get(timeout=30) == 5
'''


def test_the_pytest_plugin_as_a_user_enables_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = pytester.path / "record.txt"
    monkeypatch.setenv("RECORD_FILE", str(record))
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", BROKER_ENV):
        monkeypatch.delenv(name, raising=False)
    pytester.makepyfile(tinyapp=APP, test_user=TESTS)
    pytester.makeconftest('pytest_plugins = ["celery_flows.testing.pytest_plugin"]\n')
    pytester.makeini(textwrap.dedent("""
        [pytest]
        filterwarnings =
            error
            ignore:Call to deprecated setex\\.:DeprecationWarning:celery\\.backends\\.redis
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", timeout=600)
    out = result.stdout.str()
    result.assert_outcomes(passed=3, failed=1)
    for passed in ("test_a_flow_runs_on_a_real_worker", "test_each_test_gets_an_empty_database",
                   "test_workers_of_earlier_tests_are_gone"):
        assert f"PASSED test_user.py::{passed}" in out, out
    assert "FAILED test_user.py::test_a_failing_test_shows_the_worker_log" in out
    # the failing test's report carries the worker's log, up to its "ready." line
    assert "worker doomed log tail" in out
    assert "doomed@" in out and " ready." in out

    recorded = [line.split(" ", 1) for line in record.read_text().splitlines()]
    kinds = {kind for kind, _ in recorded}
    assert kinds == {"worker", "child", "redis", "dir"}, recorded
    for kind, value in recorded:
        if kind == "dir":
            assert not Path(value).exists(), f"{value} was not removed"
        else:
            assert not pid_alive(int(value)), f"{kind} {value} outlived the session"


def test_worker_finds_the_app_where_this_process_imports_it(
    import_app: ImportApp, redis_db: RedisDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)
    plain_app = import_app("tests.plain_app")
    # started elsewhere, at WARNING (no "ready." line): it still imports tests.plain_app
    # and is ready once it answers a ping
    worker = Worker("tests.plain_app", flows=False, cwd=tmp_path, loglevel="warning",
                    env={BROKER_ENV: redis_db.celery_url}, log_path=tmp_path / "w.log")
    assert worker.pythonpath == [str(ROOT)]
    with pytest.raises(ValueError, match="pass app="):
        worker.wait_ready()
    try:
        worker.start().wait_ready(app=plain_app.app)
        assert plain_app.add.delay(20, 22).get(timeout=30) == 42
        children = worker.wait_children(2)
        pids = worker.group_pids()
        assert pids == sorted([worker.pid, *children])
    finally:
        assert worker.stop() == 0
    assert not any(pid_alive(pid) for pid in pids)
    assert " ready." not in worker.log()


def test_worker_as_a_context_manager_reports_a_broken_app(redis_db: RedisDB,
                                                         tmp_path: Path) -> None:
    (tmp_path / "broken_app.py").write_text("raise RuntimeError('no such thing')\n")
    worker = Worker("broken_app", cwd=tmp_path, log_path=tmp_path / "w.log",
                    env={BROKER_ENV: redis_db.celery_url})
    with pytest.raises(RuntimeError, match="before it was ready") as failed:
        with worker:
            raise AssertionError("not reached")
    assert "no such thing" in str(failed.value)  # the log's tail
    assert not worker.is_running()


def test_redis_server_context_manager_and_start_errors() -> None:
    with RedisServer() as server:
        client = server.client(3, decode_responses=True)
        try:
            client.set("k", "v")
            assert client.get("k") == "v"
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
            assert client.config_get("appendonly") == {"appendonly": "no"}
        finally:
            client.close()
        assert server.running and server.celery_url(3).endswith("?virtual_host=3")
        folder = server.dir
    assert not server.running and not folder.exists()
    broken = RedisServer(["--no-such-option", "1"])
    try:
        with pytest.raises(RuntimeError, match="redis-server exited"):
            broken.start()
        assert not broken.running
    finally:
        broken.cleanup()


def test_redis_server_env_reaches_the_server_process_only(tmp_path: Path) -> None:
    # benchmarks/harness.py preloads jemalloc this way. The dynamic loader of the
    # server's process reads LD_DEBUG (redis-server overwrites its own environ area on
    # start, so /proc/<pid>/environ cannot show it)
    out = tmp_path / "ld"
    with RedisServer(env={"LD_DEBUG": "statistics", "LD_DEBUG_OUTPUT": str(out)}) as server:
        pid = server.pid
        assert server.client().ping()  # the rest of the environment is kept: it runs
    assert "runtime linker statistics" in Path(f"{out}.{pid}").read_text()
    assert "LD_DEBUG" not in os.environ


def test_the_redis_server_binary_can_be_chosen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    # CELERY_FLOWS_REDIS_SERVER runs a suite against the Redis one deploys (.ci/run runs
    # the engine's tests again on Debian's redis-server 7)
    chosen = tmp_path / "chosen-redis-server"
    chosen.symlink_to(find_redis_server())
    monkeypatch.setenv("CELERY_FLOWS_REDIS_SERVER", str(chosen))
    assert find_redis_server() == str(chosen)
    with RedisServer() as server:
        assert server.client().ping()
        # redis-server titles its process with the path it was started as
        assert str(chosen) in Path(f"/proc/{server.pid}/cmdline").read_text()
    monkeypatch.setenv("CELERY_FLOWS_REDIS_SERVER", str(tmp_path / "none"))
    with pytest.raises(RuntimeError, match="CELERY_FLOWS_REDIS_SERVER=.* is not an executable"):
        RedisServer()


def test_wait_until_returns_the_value_or_names_what_it_waited_for() -> None:
    values = iter([0, None, "", 7])
    assert wait_until(lambda: next(values), "a value") == 7
    with pytest.raises(AssertionError, match="waiting for the impossible"):
        wait_until(lambda: False, "the impossible", timeout=0.1)


def test_the_package_does_not_import_pytest() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, celery_flows.testing; "
         "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', '_pytest')))"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
