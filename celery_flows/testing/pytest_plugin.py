"""pytest fixtures to test flows against a real Redis and real Celery workers.

Enable them in your ``conftest.py`` (they are not registered automatically)::

    pytest_plugins = ["celery_flows.testing.pytest_plugin"]

Fixtures:

``flows_redis`` (session)
    A :class:`~celery_flows.testing.RedisServer`, started once for the session.
``flows_redis_db``
    A :class:`~celery_flows.testing.RedisDatabase`: database 0 of ``flows_redis``,
    emptied before the test.  It is the same database in every test, so an app that
    connected in an earlier test still reaches it.
``flows_celery_env``
    The environment that points Celery at ``flows_redis_db``: ``CELERY_BROKER_URL`` and
    ``CELERY_RESULT_BACKEND``, which Celery reads before any broker or backend the app
    names.  They are set in this process for the test and passed to every worker
    ``flows_worker`` starts; the flow registry follows the broker unless your app sets
    ``flows_redis_url``.  Override this fixture to run on another broker or to set the
    variables your own settings read.
``flows_worker``
    A factory, ``flows_worker("proj", concurrency=2, queues=["celery"], ...)``, that
    starts a :class:`~celery_flows.testing.Worker` (``--flows`` by default) with
    ``flows_celery_env``, waits until it is ready and stops it after the test.  A failing
    test's report shows the tail of every such worker's log.

Apps are read at first use: import your app at module level as usual, but let it
connect (send a task, submit a flow) only inside tests.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from .redis_server import RedisDatabase, RedisServer
from .worker import Worker, WorkerFactory, stop_all

__all__ = [
    "flows_celery_env",
    "flows_redis",
    "flows_redis_db",
    "flows_worker",
]

#: how long a worker may take for its warm shutdown at teardown before it is killed
STOP_TIMEOUT = 15.0

_WORKERS = pytest.StashKey[list[Worker]]()


@pytest.fixture(scope="session")
def flows_redis() -> Iterator[RedisServer]:
    """A private ``redis-server`` for the session (see :class:`RedisServer`)."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def flows_redis_db(flows_redis: RedisServer) -> Iterator[RedisDatabase]:
    """Database 0 of ``flows_redis``, emptied before the test."""
    database = flows_redis.database(0)
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def flows_celery_env(
    flows_redis_db: RedisDatabase, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` naming ``flows_redis_db``,
    set in this process for the test and given to the workers of ``flows_worker``."""
    env = {
        "CELERY_BROKER_URL": flows_redis_db.celery_url,
        "CELERY_RESULT_BACKEND": flows_redis_db.celery_url,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def flows_worker(
    request: pytest.FixtureRequest, flows_celery_env: dict[str, str], tmp_path: Path
) -> Iterator[WorkerFactory]:
    """Start Celery workers for this test; they are stopped (warm, then killed) after it.

    Their logs are ``celery-<name>.log`` files in the test's ``tmp_path``.
    """
    workers: list[Worker] = []
    request.node.stash[_WORKERS] = workers
    counter = itertools.count(1)

    def start(
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
        name = name or f"worker{next(counter)}"
        worker = Worker(
            app,
            flows=flows,
            pool=pool,
            concurrency=concurrency,
            queues=queues,
            name=name,
            loglevel=loglevel,
            extra_args=extra_args,
            env={**flows_celery_env, **(env or {})},
            cwd=cwd,
            log_path=tmp_path / f"celery-{name}.log",
        )
        workers.append(worker)
        worker.start()
        if ready_timeout is not None:
            worker.wait_ready(ready_timeout)
        return worker

    try:
        yield start
    finally:
        stop_all(workers, timeout=STOP_TIMEOUT)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Add the tail of every ``flows_worker`` worker's log to a failing test's report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed:
        return
    for worker in item.stash.get(_WORKERS, []):
        report.sections.append(
            (f"worker {worker.name} log tail ({worker.log_path})", worker.log_tail(80))
        )
