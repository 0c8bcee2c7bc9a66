"""A node's Celery result is written by the step that records its completion
(worker/results.py): the value Celery's Redis backend would store, under its key,
published to its waiters, and no round trip of the tracer's own."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import redis
from celery.app.task import Context
from celery.backends.redis import RedisBackend

from celery_flows import Flow, FlowState
from celery_flows.engine import engine_of
from celery_flows.worker import results
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import node_doc

META = "celery-task-meta-"


@pytest.fixture
def proj(import_app: ImportApp) -> Any:
    return import_app("tests.proj")


class Monitor:
    """Every command Redis runs while it is open: (client kind, command words); a
    script's own commands are of kind "lua"."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.seen: list[tuple[str, list[str]]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._marker = f"monitor-end-{time.monotonic_ns()}"

    def _run(self) -> None:
        with self.client.monitor() as mon:
            self._ready.set()
            for entry in mon.listen():
                words = entry["command"].split()
                if words[:2] == ["ECHO", self._marker]:
                    return
                self.seen.append((entry.get("client_type", ""), words))

    def __enter__(self) -> Monitor:
        self._thread.start()
        assert self._ready.wait(10)
        time.sleep(0.2)  # the thread is reading by now
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.echo(self._marker)
        self._thread.join(10)

    def on(self, key: str) -> list[tuple[str, str]]:
        return [(kind, words[0].upper()) for kind, words in self.seen if key in words]


def _plain_meta(proj: Any, redis_db: RedisDB) -> dict[str, Any]:
    """What Celery itself stores for a plain task returning 3."""
    result = proj.plain_add.delay(1, 2)
    assert result.get(timeout=30) == 3
    doc: dict[str, Any] = json.loads(redis_db.client.get(META + result.id))
    return doc


def test_a_nodes_result_is_stored_by_its_completion_as_celery_would_store_it(
    proj: Any, redis_db: RedisDB, worker_factory: WorkerFactory
) -> None:
    worker_factory("tests.proj")
    plain = _plain_meta(proj, redis_db)
    f = Flow("results")
    a = f.add(proj.add.si(1, 2), id="a")
    f.add(proj.mul.s(10), id="b", after=[a])
    with Monitor(redis_db.client) as mon:
        handle = proj.flows.submit(f)
        assert handle.wait(timeout=60) == FlowState.SUCCEEDED
        time.sleep(0.3)  # whatever the worker still sends after the outcome
    for nid, value in (("a", 3), ("b", 30)):
        [task_id] = node_doc(handle, nid)["task_ids"]
        key = META + task_id
        # written and published by complete.lua (the key is one of its arguments); the
        # worker sent no GET, SET or PUBLISH of its own for it
        seen = mon.on(key)
        assert [cmd for kind, cmd in seen if kind == "lua"] == ["GET", "SET", "PUBLISH"], seen
        assert [cmd for kind, cmd in seen if kind != "lua"] == ["EVALSHA"], seen
        doc = json.loads(redis_db.client.get(key))
        assert doc["status"] == "SUCCESS" and doc["result"] == value
        assert doc["task_id"] == task_id
        # the document Celery writes, field for field (the date and ids aside); b was
        # published by a's task, which Celery notes as its parent
        parent = {"parent_id": node_doc(handle, "a")["task_ids"][0]} if nid == "b" else {}
        same = {k: v for k, v in plain.items() if k not in ("date_done", "task_id", "result")}
        assert {k: v for k, v in doc.items() if k not in ("date_done", "task_id", "result")} \
            == same | parent
        assert sorted(doc) == sorted({**plain, **parent})
        # as long as Celery keeps it
        assert abs(redis_db.client.ttl(key) - proj.app.backend.expires) <= 5
        assert proj.app.AsyncResult(task_id).get(timeout=30) == value


def test_a_client_waiting_on_a_nodes_result_gets_it_when_the_node_completes(
    proj: Any, redis_db: RedisDB, worker_factory: WorkerFactory
) -> None:
    """The result is published on its channel, where Celery's waiting AsyncResult
    listens: subscribed before the node ends, the client hears it end."""
    worker_factory("tests.proj")
    f = Flow("waited")
    f.add(proj.sleepy.si(1.5, "late"), id="slow")
    handle = proj.flows.submit(f)
    deadline = time.monotonic() + 30
    while not node_doc(handle, "slow")["task_ids"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [task_id] = node_doc(handle, "slow")["task_ids"]
    pubsub = redis_db.client.pubsub()
    pubsub.subscribe(META + task_id)
    heard = None
    while heard is None and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)
        if message and message["type"] == "message":
            heard = json.loads(message["data"])
    pubsub.close()
    assert heard is not None and heard["status"] == "SUCCESS" and heard["result"] == "late"
    assert handle.wait(timeout=30) == FlowState.SUCCEEDED


def test_a_node_that_ignores_its_result_stores_none(
    proj: Any, redis_db: RedisDB, worker_factory: WorkerFactory
) -> None:
    """As in Celery: a task with ignore_result stores nothing in the backend, and its
    node still passes its result on in the flow."""
    worker_factory("tests.proj")
    f = Flow("ignored")
    a = f.add(proj.add.si(2, 2).set(ignore_result=True), id="a")
    f.add(proj.mul.s(3), id="b", after=[a])
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results() == {"a": 4, "b": 12}
    [task_id] = node_doc(handle, "a")["task_ids"]
    assert redis_db.client.get(META + task_id) is None
    [task_id] = node_doc(handle, "b")["task_ids"]
    assert json.loads(redis_db.client.get(META + task_id))["result"] == 12


class _Beside:
    """An engine whose app has another result backend (the rest is the real one's)."""

    def __init__(self, engine: Any, backend: Any) -> None:
        self.store = engine.store
        self.app = type("App", (), {"backend": backend})()


@pytest.mark.parametrize("change", ["compressed", "pickled"])
def test_results_the_script_cannot_read_are_left_to_celery(proj: Any, change: str) -> None:
    """complete.lua reads a stored value to keep a SUCCESS: compressed or non-JSON
    results are stored by Celery, as before."""
    engine = engine_of(proj.app)
    request = Context(id="f~a~1~n", args=(), kwargs={})
    assert results.for_node(engine, proj.add, request, 3) is not None
    url = proj.app.backend.url  # as Celery passed it (without the "redis+")
    if change == "compressed":
        proj.app.conf.result_compression = "zlib"
        backend = RedisBackend(app=proj.app, url=url)
        proj.app.conf.result_compression = None
    else:
        backend = RedisBackend(app=proj.app, url=url, serializer="pickle")
    assert results.for_node(_Beside(engine, backend), proj.add, request, 3) is None
