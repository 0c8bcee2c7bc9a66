"""Shared pytest fixtures: one redis-server per session, a fresh db per test, workers.

Fixtures:

- ``redis_server`` (session): the :class:`~tests.harness.RedisServer`.
- ``redis_db`` (function): a :class:`RedisDB` whose db number no other running test
  uses, flushed before the test.
- ``import_app`` (function): ``import_app(module="tests.plain_app", broker_url=None)``
  imports a test app module afresh with ``FLOWS_TEST_BROKER`` set (default: this test's
  db) and closes its app afterwards.
- ``worker_factory`` (function): ``worker_factory(app="tests.plain_app", *, ...)``
  starts a :class:`~tests.harness.WorkerProcess` on this test's db, waits until it is
  ready, and tears it down at the end of the test.  A failing test's report carries the
  tail of every worker log.
"""

from __future__ import annotations

import gc
import importlib
import itertools
import sys
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import pytest
import redis

from tests.harness import BROKER_ENV, RedisServer, WorkerProcess

# db 0 is left alone so that a stray process that ignores the db number is noticed.
_DB_NUMBERS: Iterator[int] = itertools.cycle(range(1, 64))

_WORKERS = pytest.StashKey[list[WorkerProcess]]()


@dataclass
class RedisDB:
    """One test's database on the session's redis-server."""

    server: RedisServer
    db: int
    client: redis.Redis

    @property
    def redis_url(self) -> str:
        return self.server.redis_url(self.db)

    @property
    def celery_url(self) -> str:
        return self.server.celery_url(self.db)


class ImportApp(Protocol):
    def __call__(
        self, module: str = "tests.plain_app", broker_url: str | None = None
    ) -> ModuleType: ...


class WorkerFactory(Protocol):
    def __call__(
        self,
        app: str = "tests.plain_app",
        *,
        concurrency: int = 2,
        queues: Sequence[str] = ("celery",),
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        broker_url: str | None = None,
        name: str | None = None,
        ready_timeout: float | None = 30.0,
    ) -> WorkerProcess: ...


@pytest.fixture(scope="session")
def redis_server() -> Generator[RedisServer, None, None]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        gc.collect()
        for app in _SEEN_APPS:
            _close_result_backend(app)
        server.cleanup()


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Generator[RedisDB, None, None]:
    db = next(_DB_NUMBERS)
    client = redis_server.client(db, decode_responses=False)
    client.flushdb()
    try:
        yield RedisDB(server=redis_server, db=db, client=client)
    finally:
        client.close()


@pytest.fixture
def import_app(
    redis_db: RedisDB, monkeypatch: pytest.MonkeyPatch
) -> Generator[ImportApp, None, None]:
    imported: list[ModuleType] = []

    def _import(module: str = "tests.plain_app", broker_url: str | None = None) -> ModuleType:
        monkeypatch.setenv(BROKER_ENV, broker_url or redis_db.celery_url)
        sys.modules.pop(module, None)
        mod = importlib.import_module(module)
        imported.append(mod)
        return mod

    yield _import

    # AsyncResults left by the test unsubscribe from the result backend when collected:
    # collect them now, while their app is open, then close the backend's connections.
    _SEEN_APPS.extend(getattr(mod, "app", None) for mod in imported)
    gc.collect()
    for seen in _SEEN_APPS:
        _close_result_backend(seen)
    for mod in reversed(imported):
        app: Any = getattr(mod, "app", None)
        flows: Any = getattr(app, "flows", None)
        if flows is not None:
            flows.close()
        log_client: Any = getattr(mod, "_log", None)
        if log_client is not None:
            log_client.close()
        if app is not None:
            app.close()
        # The next test imports it again with its own broker URL.
        if sys.modules.get(mod.__name__) is mod:
            del sys.modules[mod.__name__]


# apps of earlier tests: their leftover AsyncResults may be collected later
_SEEN_APPS: list[Any] = []


def _close_result_backend(app: Any) -> None:
    backend = getattr(getattr(app, "_local", None), "backend", None)
    consumer = getattr(backend, "result_consumer", None)
    # results collected later (at exit, after redis-server stopped) then have nothing to
    # unsubscribe from, instead of reconnecting to a server that is gone
    subscribed = getattr(consumer, "subscribed_to", None)
    if subscribed is not None:
        subscribed.clear()
    pubsub = getattr(consumer, "_pubsub", None)
    if pubsub is not None:
        pubsub.close()
    client = getattr(backend, "client", None)
    if client is not None:
        client.close()


@pytest.fixture
def worker_factory(
    request: pytest.FixtureRequest, redis_db: RedisDB, tmp_path: Path
) -> Generator[WorkerFactory, None, None]:
    workers: list[WorkerProcess] = []
    request.node.stash[_WORKERS] = workers
    counter = itertools.count(1)

    def _start(
        app: str = "tests.plain_app",
        *,
        concurrency: int = 2,
        queues: Sequence[str] = ("celery",),
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        broker_url: str | None = None,
        name: str | None = None,
        ready_timeout: float | None = 30.0,
    ) -> WorkerProcess:
        worker = WorkerProcess(
            app,
            broker_url=broker_url or redis_db.celery_url,
            concurrency=concurrency,
            queues=queues,
            extra_args=extra_args,
            env=env,
            name=name or f"w{next(counter)}-{redis_db.db}",
            log_dir=tmp_path,
        )
        workers.append(worker)
        worker.start()
        if ready_timeout is not None:
            worker.wait_ready(ready_timeout)
        return worker

    try:
        yield _start
    finally:
        for worker in workers:
            worker.stop(timeout=10.0)
            # Make sure no pool child outlives the test, whatever the test did.
            worker.kill9()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed:
        return
    for worker in item.stash.get(_WORKERS, []):
        report.sections.append(
            (f"worker {worker.name} log tail ({worker.log_path})", worker.log_tail(80))
        )
