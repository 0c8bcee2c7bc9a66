"""Shared pytest fixtures: one redis-server per session, a fresh db per test, workers.

The processes come from :mod:`celery_flows.testing` and its pytest plugin (enabled
below, as a user would); these fixtures fit them to the suite:

- ``redis_server`` (session): the plugin's ``flows_redis``, a
  :class:`~celery_flows.testing.RedisServer`.
- ``redis_db`` (function): a :class:`~celery_flows.testing.RedisDatabase` whose db number
  no other running test uses, flushed before the test.
- ``flows_setup`` (function): the broker and pool this test runs on, a
  :class:`FlowsSetup`; ``redis/prefork`` unless the test is marked
  ``@pytest.mark.setups("rabbitmq/prefork", "redis/threads", ...)``, which runs it once
  per setup.  On ``rabbitmq`` the broker is a private RabbitMQ node (``rabbitmq``,
  session-scoped, started on first use) with a vhost per db; results, the bodies' log
  and the registry stay on this test's Redis db.
- ``import_app`` (function): ``import_app(module="tests.plain_app", broker_url=None)``
  imports a test app module afresh with ``FLOWS_TEST_BROKER`` set (default: this
  test's broker) and ``FLOWS_TEST_REDIS`` (this test's db, or ``broker_url`` when given)
  and closes its app afterwards.
- ``worker_factory`` (function): ``worker_factory(app="tests.plain_app", *, ...)``
  starts a :class:`~celery_flows.testing.Worker` on this test's broker, db and pool
  through the plugin's ``flows_worker`` (so a failing test's report carries the tail of
  every worker log), waits until it is ready, and tears it down at the end of the test.
- ``limited`` (function): ``tests.proj`` imported with the limiter groups and queue
  caps of :data:`tests.helpers.LIMITS`.
- ``cluster`` (module): the URL of a 3-master Redis Cluster on loopback.

With ``FLOWS_TEST_INSTALLED=1`` (set by ``.ci/run``) the session refuses to start unless
``celery_flows`` is imported from site-packages, here and in worker subprocesses: the
suite then tests the installed wheel, not a checkout.
"""

from __future__ import annotations

import gc
import importlib
import itertools
import os
import subprocess
import sys
import sysconfig
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import pytest

from celery_flows.testing import RedisDatabase, RedisServer, Worker
from celery_flows.testing import WorkerFactory as FlowsWorkerFactory
from tests.brokers import RabbitMQServer
from tests.helpers import BROKER_ENV, LIMITS, REDIS_ENV, ROOT
from tests.redis_cluster import LocalCluster

pytest_plugins = ["pytester", "celery_flows.testing.pytest_plugin"]

# db 0 is left alone so that a stray process that ignores the db number is noticed.
_DB_NUMBERS: Iterator[int] = itertools.cycle(range(1, 64))

#: one test's database on the session's redis-server (the name the tests import)
RedisDB = RedisDatabase


@dataclass
class FlowsSetup:
    """The broker (``redis`` or ``rabbitmq``) and worker pool of one test run."""

    broker: str
    pool: str
    broker_url: str
    #: queues the test's workers consumed, deleted from a RabbitMQ vhost afterwards
    queues: set[str]

    @property
    def id(self) -> str:
        return f"{self.broker}/{self.pool}"


SETUPS = ("redis/prefork", "rabbitmq/prefork", "redis/threads", "redis/solo",
          "rabbitmq/threads", "rabbitmq/solo")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "setups(*ids): run the test once per broker/pool setup, e.g. "
        "'rabbitmq/prefork', 'redis/threads' (default: redis/prefork only)")
    if os.environ.get("FLOWS_TEST_INSTALLED") == "1":
        _check_installed()


def _check_installed() -> None:
    """celery_flows must come from site-packages, here and in a worker's interpreter."""
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    here = subprocess.run(
        [sys.executable, "-c", "import celery_flows; print(celery_flows.__file__)"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60,
    )
    import celery_flows

    for where, path in (("pytest", celery_flows.__file__ or ""),
                        ("a worker subprocess", here.stdout.strip() or here.stderr)):
        parents = set(Path(path).resolve().parents)
        if not parents & site:
            raise pytest.UsageError(
                f"FLOWS_TEST_INSTALLED=1 but {where} imports celery_flows from {path!r}, "
                f"not from site-packages {sorted(map(str, site))}: run the tests from a "
                "copy of tests/ outside the checkout (bash .ci/run does)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("setups")
    if marker is None or "flows_setup" not in metafunc.fixturenames:
        return
    unknown = set(marker.args) - set(SETUPS)
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown setups "
                                f"{sorted(unknown)}; known: {SETUPS}")
    metafunc.parametrize("flows_setup", marker.args, indirect=True, ids=list(marker.args))


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
        pool: str | None = None,
    ) -> Worker: ...


@pytest.fixture(scope="session")
def redis_server(flows_redis: RedisServer) -> Generator[RedisServer, None, None]:
    try:
        yield flows_redis
    finally:
        # before the plugin stops the server
        gc.collect()
        for app in _SEEN_APPS:
            _close_result_backend(app)


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Generator[RedisDB, None, None]:
    database = redis_server.database(next(_DB_NUMBERS))
    try:
        yield database
    finally:
        database.close()


@pytest.fixture(scope="session")
def rabbitmq() -> Generator[RabbitMQServer, None, None]:
    server = RabbitMQServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def flows_setup(
    request: pytest.FixtureRequest, redis_db: RedisDB
) -> Generator[FlowsSetup, None, None]:
    broker, pool = getattr(request, "param", "redis/prefork").split("/")
    server: RabbitMQServer | None = None
    if broker == "rabbitmq":
        server = request.getfixturevalue("rabbitmq")
        url = server.url(redis_db.db)
    else:
        url = redis_db.celery_url
    setup = FlowsSetup(broker=broker, pool=pool, broker_url=url, queues={"celery"})
    yield setup
    if server is not None:
        # after the workers stopped (they are torn down first): nothing a test left in
        # its vhost reaches a later test that gets the same db number
        server.delete_queues(redis_db.db, setup.queues)


@pytest.fixture
def import_app(
    redis_db: RedisDB, flows_setup: FlowsSetup, monkeypatch: pytest.MonkeyPatch
) -> Generator[ImportApp, None, None]:
    imported: list[ModuleType] = []

    def _import(module: str = "tests.plain_app", broker_url: str | None = None) -> ModuleType:
        # an explicit broker_url is a Redis of the test's own that carries everything
        monkeypatch.setenv(BROKER_ENV, broker_url or flows_setup.broker_url)
        monkeypatch.setenv(REDIS_ENV, broker_url or redis_db.celery_url)
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
def flows_celery_env(redis_db: RedisDB, flows_setup: FlowsSetup) -> dict[str, str]:
    """The plugin's fixture, overridden: the suite's app modules read their URLs from
    ``FLOWS_TEST_BROKER`` and ``FLOWS_TEST_REDIS`` (``import_app`` sets them here)."""
    return {BROKER_ENV: flows_setup.broker_url, REDIS_ENV: redis_db.celery_url}


@pytest.fixture
def worker_factory(
    flows_worker: FlowsWorkerFactory, redis_db: RedisDB, flows_setup: FlowsSetup
) -> WorkerFactory:
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
        pool: str | None = None,
    ) -> Worker:
        flows_setup.queues.update(queues)
        urls = {BROKER_ENV: broker_url or flows_setup.broker_url,
                REDIS_ENV: broker_url or redis_db.celery_url}
        return flows_worker(
            app,
            flows=False,  # the tests say extra_args=FLOWS where they want --flows
            pool=pool or flows_setup.pool,
            concurrency=concurrency,
            queues=queues,
            extra_args=extra_args,
            env={**(env or {}), **urls},
            name=name or f"w{next(counter)}-{redis_db.db}",
            cwd=ROOT,
            ready_timeout=ready_timeout,
        )

    return _start


@pytest.fixture
def limited(import_app: ImportApp, monkeypatch: pytest.MonkeyPatch) -> Any:
    for k, v in LIMITS.items():
        monkeypatch.setenv(k, v)
    return import_app("tests.proj")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    local = LocalCluster(masters=3).start()
    try:
        yield local.url
    finally:
        local.stop()
