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


_scripts: dict[str, Any] = {}

# the result store complete.lua makes for a node (celery_flows/worker/results.py): the
# stored value read (complete.lua keeps a SUCCESS it finds there), the value the
# backend would store written with its expiry, and published
_STORE = """
local kept = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


def _script(name: str, text: str) -> Any:
    if name not in _scripts:
        _scripts[name] = app.backend.client.register_script(text)
    return _scripts[name]


def trip() -> None:
    """One round trip to the registry's Redis that runs a script doing nothing: what a
    flow node adds to a task at the least before its body (the "floor" rows of run.py:
    a start before the body, a completion after it)."""
    _script("trip", "return 1")()


def trip_storing(task: Any, result: Any) -> None:
    """The completion's round trip at the least: one script that stores the task's
    result as Celery's Redis backend would (built by the backend, written and
    published by the script), the tracer then skipping its own store, as a flow
    node's does (celery_flows/worker/results.py)."""
    backend, request = app.backend, task.request
    meta = backend._get_result_meta(result=backend.encode_result(result, "SUCCESS"),
                                    state="SUCCESS", traceback=None, request=request)
    meta["task_id"] = request.id
    _script("store", _STORE)(keys=[backend.get_key_for_task(request.id)],
                             args=[backend.encode(meta), int(backend.expires)])
    request.ignore_result = True


@app.task(bind=True)
def inc_trips(self: Any, x: int) -> int:
    """``inc`` with the two round trips of a flow node around its body, and nothing
    else of celery-flows."""
    trip()
    y = x + 1
    trip_storing(self, y)
    return y


@app.task(bind=True)
def tsum_trips(self: Any, values: list[int]) -> int:
    trip()
    y = sum(values)
    trip_storing(self, y)
    return y


@app.task(bind=True)
def noop_trips(self: Any) -> None:
    trip()
    trip_storing(self, None)


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
