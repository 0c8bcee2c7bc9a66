"""The app both sides of the benchmark run on: one Celery app with celery-flows attached,
so plain canvas messages and flow nodes go through the same worker processes.

The tasks are plain ``@app.task`` tasks (flows accept them as nodes) and as cheap as a
task can be, so what is measured is the orchestration, not the work. Broker, result
backend and flow registry share the Redis named by ``BENCH_REDIS_URL``.
``BENCH_ACKS_LATE=1`` gives the worker ``task_acks_late=True`` and
``worker_prefetch_multiplier=1`` (the T1/T2 rows run under both configurations).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery

from celery_flows import Flows

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://localhost:6379/0")

app = Celery("bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    # Finished benchmark flows need not outlive the run.
    flows_retention=3600,
    result_expires=3600,
    # benchmarks/limits.py: the limiter groups under test; "fair": the fair-share row
    # of run.py (benchmarks/fair.py)
    flows_rate_limits={"fair": "20/s",
                       **json.loads(os.environ.get("BENCH_RATE_LIMITS", "{}"))},
)
if os.environ.get("BENCH_ACKS_LATE") == "1":
    app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1)
flows = Flows(app)


@app.task
def inc(x: int) -> int:
    return x + 1


@app.task
def tsum(values: list[int]) -> int:
    return sum(values)


_trip_client: Any = None


def trip() -> None:
    """One round trip to the registry's Redis that runs a script doing nothing: what a
    flow node adds to a task at the least (the "floor" rows of run.py: a start before
    the body, a completion after it, and no work in either)."""
    global _trip_client
    if _trip_client is None:
        _trip_client = app.backend.client.register_script("return 1")
    _trip_client()


@app.task
def inc_trips(x: int) -> int:
    """``inc`` with the two round trips of a flow node around its body, and nothing
    else of celery-flows."""
    trip()
    y = x + 1
    trip()
    return y


@app.task
def tsum_trips(values: list[int]) -> int:
    trip()
    y = sum(values)
    trip()
    return y


@app.task
def noop_trips() -> None:
    trip()
    trip()


@app.task
def noop() -> None:
    return None


@app.task
def collect(*results: object) -> int:
    """A fan-in sink that takes its dependencies' results (``.s()``): how many came."""
    return len(results[0]) if results and isinstance(results[0], list) else len(results)


@app.task
def nap(seconds: float) -> None:
    # A root that holds its dependents back long enough to reset SLOWLOG first.
    time.sleep(seconds)


@app.task
def boom() -> None:
    raise RuntimeError("benchmark failure, on purpose")
