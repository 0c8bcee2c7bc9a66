"""The Flows app the tests run on workers (tasks are ``shared=False``: every test
imports this module afresh, and shared tasks would be re-registered on earlier apps).
 The broker comes from
``FLOWS_TEST_BROKER``, backend and registry from ``FLOWS_TEST_REDIS`` (default: the
broker); task bodies log their executions to Redis so tests can count
them (key ``runs``: a list of "<flow>|<node>|<attempt>")."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import redis
from celery import Celery
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from celery_flows import Flows, current_flow
from celery_flows.registry.connection import to_redis_py_url

BROKER_URL = os.environ["FLOWS_TEST_BROKER"]
# results, the bodies' log and the registry live on the test's Redis, which is also the
# broker unless the test runs on another broker (RabbitMQ)
REDIS_URL = os.environ.get("FLOWS_TEST_REDIS") or BROKER_URL

app = Celery("proj", broker=BROKER_URL, backend=REDIS_URL)
# the bodies' own bookkeeping must survive the Redis restart of the chaos test
_log = redis.Redis.from_url(
    to_redis_py_url(REDIS_URL),
    retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 20),
    retry_on_error=[redis.ConnectionError, redis.exceptions.BusyLoadingError],
)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
    worker_prefetch_multiplier=1,
    task_acks_late=os.environ.get("FLOWS_TEST_ACKS_LATE") == "1",
    # without it Celery fails a task whose result it cannot store while Redis restarts
    result_backend_always_retry=True,
    broker_transport_options={
        "visibility_timeout": float(os.environ.get("FLOWS_TEST_VISIBILITY", "3600")),
        "unacked_restore_interval": float(os.environ.get("FLOWS_TEST_RESTORE_INTERVAL", "1")),
    },
    flows_max_result_bytes=int(os.environ.get("FLOWS_TEST_MAX_RESULT", "1048576")),
    flows_lease_timeout=float(os.environ.get("FLOWS_TEST_LEASE", "60")),
    worker_log_format=os.environ.get("FLOWS_TEST_LOG_FORMAT")
    or "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s",
    flows_events_maxlen=int(os.environ.get("FLOWS_TEST_EVENTS_MAXLEN", "100000")),
    flows_dashboard_token=os.environ.get("FLOWS_TEST_DASHBOARD_TOKEN") or None,
    flows_rate_limits=json.loads(os.environ.get("FLOWS_TEST_RATE_LIMITS", "{}")),
    flows_queue_limits=json.loads(os.environ.get("FLOWS_TEST_QUEUE_LIMITS", "{}")),
    flows_concurrency_limits=json.loads(os.environ.get("FLOWS_TEST_CONCURRENCY", "{}")),
    flows_webhook_secret=os.environ.get("FLOWS_TEST_WEBHOOK_SECRET") or None,
    flows_webhook_url=os.environ.get("FLOWS_TEST_WEBHOOK_URL") or None,
    # a separate registry (a Redis Cluster node) when set; else the test's Redis, named
    # only when the broker is not that Redis (so the broker default is tested too)
    flows_redis_url=os.environ.get("FLOWS_TEST_REGISTRY")
    or (REDIS_URL if REDIS_URL != BROKER_URL else None),
    flows_redis_cluster=bool(os.environ.get("FLOWS_TEST_REGISTRY_CLUSTER")),
)


flows = Flows(app)



def _mark(tag: str = "") -> None:
    if current_flow:
        _log.rpush("runs", f"{current_flow.id}|{current_flow.node_id}|{current_flow.attempt}"
                   f"{tag}")


@flows.task(shared=False)
def add(x: int, y: int) -> int:
    _mark()
    return x + y


@flows.task(shared=False)
def mul(x: int, y: int) -> int:
    _mark()
    return x * y


@flows.task(shared=False)
def tsum(values: list[int]) -> int:
    _mark()
    return sum(v for v in values if v is not None)


@flows.task(shared=False)
def ident(x: Any) -> Any:
    _mark()
    return x


@flows.task(shared=False)
def collect(*args: Any) -> list[Any]:
    _mark()
    return list(args)


@flows.task(shared=False)
def ctx_value(key: str) -> Any:
    _mark()
    return current_flow.context.get(key)


@flows.task(shared=False)
def deps() -> dict[str, Any]:
    _mark()
    return current_flow.results()


@flows.task(shared=False)
def boom(msg: str = "boom") -> None:
    _mark()
    raise ValueError(msg)


@flows.task(shared=False)
def sleepy(seconds: float, value: Any = None) -> Any:
    _mark()
    time.sleep(seconds)
    return value


@app.task(shared=False)
def plain_add(x: int, y: int) -> int:
    _mark()
    return x + y


@flows.task(queue="other", shared=False)
def on_other(x: Any) -> Any:
    _mark()
    return x


@flows.task(shared=False)
def big(n: int) -> str:
    _mark()
    return "x" * n


@flows.task(shared=False)
def unserialisable() -> object:
    _mark()
    return object()


# -- outcomes without a plain success/failure signal (tests/test_outcomes.py) ----------


@app.task(bind=True, shared=False, max_retries=3, default_retry_delay=0.1)
def flaky(self: Any, fail_times: int) -> int:
    _mark()
    if self.request.retries < fail_times:
        raise self.retry(exc=RuntimeError(f"try {self.request.retries}"))
    return self.request.retries


@app.task(shared=False)
def ignorer() -> None:
    _mark()
    from celery.exceptions import Ignore

    raise Ignore()


@app.task(bind=True, shared=False)
def replacer(self: Any, x: int) -> Any:
    _mark("|replaced")
    return self.replace(add.s(x, 100))


@flows.task(shared=False)
def reporter(steps: int) -> str:
    for i in range(steps):
        current_flow.progress(100 * (i + 1) / steps, f"step {i + 1}")
    _mark()
    return "reported"


@flows.task(shared=False)
def chatty(message: str) -> str:
    """Logs ``message`` through a plain logger (tests/test_logging.py)."""
    logging.getLogger("tests.proj.chatty").warning("chatty says %s", message)
    return message


@app.task(shared=False, time_limit=1)
def overrun() -> None:
    _mark()
    time.sleep(10)


# -- failure handling and runtime changes (tests/test_changes.py) ----------------------


@app.task(shared=False)
def fail_until(flag: str, value: Any = "ok") -> Any:
    """Fails until the Redis key ``flag`` exists."""
    _mark()
    if not _log.exists(flag):
        raise RuntimeError(f"{flag} not set")
    return value


@app.task(shared=False)
def cooperative(seconds: float) -> str:
    """Runs until the flow is cancelled (then says so) or ``seconds`` pass."""
    _mark()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if current_flow.cancelled:
            _log.rpush("saw_cancel", current_flow.node_id)
            return "stopped"
        time.sleep(0.05)
    return "finished"


@app.task(shared=False)
def wait_for_key(key: str, timeout: float = 20) -> str:
    """Blocks until the Redis key ``key`` exists (lets a test hold a node running)."""
    _mark()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not _log.exists(key):
        time.sleep(0.02)
    return key


@app.task(shared=False)
def reads_failures() -> dict[str, str]:
    _mark()
    return current_flow.failures()


# -- reliability (tests/test_reliability.py) -------------------------------------------


@app.task(shared=False)
def pid_sleep(seconds: float, value: Any = None) -> Any:
    """Publishes its pid (key ``pid:<node>``) so a test can kill this pool child."""
    _mark()
    _log.set(f"pid:{current_flow.node_id}", os.getpid())
    time.sleep(seconds)
    return value


@app.task(shared=False)
def step(values: Any = None, pause: float = 0.05) -> int:
    """A node of the chaos flows: sums its inputs plus one."""
    _mark()
    time.sleep(pause)
    if isinstance(values, list):
        return 1 + sum(v for v in values if isinstance(v, int))
    return 1 + (values if isinstance(values, int) else 0)


@app.task(shared=False)
def tally(values: Any = None) -> int:
    """Like ``step``, but each execution adds a member of its own to the set ``execs``:
    a command replayed after a Redis crash cannot count one execution twice."""
    import uuid

    _log.sadd("execs", f"{current_flow.id}|{current_flow.node_id}|{current_flow.attempt}"
              f"|{uuid.uuid4().hex}")
    time.sleep(0.05)
    if isinstance(values, list):
        return 1 + sum(v for v in values if isinstance(v, int))
    return 1 + (values if isinstance(values, int) else 0)


@app.task(shared=False)
def slow_first(seconds: float, value: Any = None) -> Any:
    """Sleeps ``seconds`` in its first attempt only (a recovered attempt finishes)."""
    _mark()
    _log.set(f"pid:{current_flow.node_id}", os.getpid())
    if current_flow.attempt == 1:
        time.sleep(seconds)
    return value


# -- rate limits and queue caps (tests/test_limits.py) ---------------------------------


@app.task(shared=False)
def occupy(seconds: float, value: Any = None) -> Any:
    """Tracks how many of these run at once: each start pushes the count to ``levels``."""
    _mark()
    _log.rpush("levels", _log.incr("running"))
    try:
        time.sleep(seconds)
    finally:
        _log.decr("running")
    return value


@app.task(bind=True, shared=False, max_retries=5)
def flaky_limited(self: Any, fail_times: int) -> int:
    _mark()
    if self.request.retries < fail_times:
        raise self.retry(exc=RuntimeError(f"try {self.request.retries}"), countdown=0.05)
    return self.request.retries


# -- external systems (tests/test_external.py) -----------------------------------------


@app.task(shared=False)
def check_key(key: str) -> Any:
    """A sensor's check: the key's value once it exists, else None (not yet)."""
    _mark()
    value = _log.get(key)
    return value.decode() if value is not None else None


# -- maps (tests/test_map.py) -----------------------------------------------------------


@flows.task(shared=False)
def numbers(n: int) -> list[int]:
    _mark()
    return list(range(n))


@flows.task(shared=False)
def double(x: int, flag: str = "") -> int:
    """Doubles x; with ``flag``, fails on x == 3 until the Redis key ``flag`` exists."""
    _mark()
    if flag and x == 3 and not _log.exists(flag):
        raise RuntimeError(f"item {x}: {flag} not set")
    return 2 * x


@flows.task(shared=False)
def listing(flag: str) -> Any:
    """Not a list until the Redis key ``flag`` exists, then [1, 2, 3]."""
    _mark()
    return [1, 2, 3] if _log.exists(flag) else {"not": "a list"}


@flows.task(shared=False)
def gauge(x: int) -> int:
    """Counts the items running at once (Redis key ``gauge``; its peak in
    ``gauge-max``)."""
    _mark()
    now = _log.incr("gauge")
    _log.eval("if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[1]) then "
              "redis.call('SET', KEYS[2], ARGV[1]) end", 2, "gauge", "gauge-max", now)
    time.sleep(0.15)
    _log.decr("gauge")
    return x


# -- concurrency groups (tests/test_concurrency.py) -------------------------------------


@flows.task(shared=False)
def span(seconds: float) -> None:
    """Logs when its body ran, "<flow>|<start>|<end>" (time.time) in ``spans``."""
    _mark()
    start = time.time()
    time.sleep(seconds)
    _log.rpush("spans", f"{current_flow.id}|{start}|{time.time()}")
