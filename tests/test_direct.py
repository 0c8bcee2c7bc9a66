"""A new flow's roots queued by the script that creates it (engine/direct.py): one
round trip, the message Celery would have published, and the usual create, publish,
acknowledge wherever the broker is not the registry's own Redis database."""

from __future__ import annotations

import importlib
import json
import sys
from collections import Counter
from typing import Any

import pytest
from celery.signals import after_task_publish, before_task_publish

from celery_flows import Flow, FlowState, NodeState
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import BROKER_ENV, REDIS_ENV, node_doc, run_counts


@pytest.fixture
def proj(import_app: ImportApp) -> Any:
    return import_app("tests.proj")


def _calls(client: Any) -> Counter[str]:
    """Calls per command so far (scripts' inner commands included)."""
    return Counter({name: stats["calls"] for name, stats in client.info("commandstats").items()})


def _diamond(proj: Any, fid: str | None = None) -> Flow:
    f = Flow("direct", id=fid)
    a = f.add(proj.add.si(1, 2), id="a")
    b = f.add(proj.add.si(3, 4), id="b", queue="other")
    f.add(proj.tsum.s(), id="c", after=[a, b])
    return f


def _queued(client: Any, queue: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def _shape(message: dict[str, Any]) -> dict[str, Any]:
    """A message with what differs between two publishes of the same call blanked:
    task ids (their flow id and nonce), delivery tags, the publishing process."""
    out = json.loads(json.dumps(message))
    props, headers = out["properties"], out["headers"]
    for field in ("correlation_id", "delivery_tag"):
        props[field] = "*"
    for field in ("id", "root_id", "origin"):
        headers[field] = "*"
    return out


def test_a_fresh_flow_is_created_and_its_roots_queued_in_one_round_trip(
    proj: Any, redis_db: RedisDB, worker_factory: WorkerFactory
) -> None:
    client = redis_db.client
    proj.flows.submit(_diamond(proj))  # the producer declares its queues once
    client.delete("celery", "other")
    before = _calls(client)
    handle = proj.flows.submit(_diamond(proj))
    added = _calls(client) - before
    # create.lua alone, its pushes inside it: no publish, claim or acknowledgement after
    assert added["cmdstat_evalsha"] == 1, added
    assert added["cmdstat_lpush"] == 2, added
    assert client.llen("celery") == 1 and client.llen("other") == 1
    states = handle.node_states()
    assert (states["a"], states["b"], states["c"]) == (NodeState.QUEUED, NodeState.QUEUED,
                                                       NodeState.PENDING)
    # acknowledged: no dirty marker left for the sweeper
    assert client.zcard(proj.flows.store.keys.dispatch) == 0
    worker_factory("tests.proj", queues=("celery", "other"))
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results() == {"a": 3, "b": 7, "c": 10}
    assert run_counts(redis_db, handle.id) == {"a": 1, "b": 1, "c": 1}


def test_roots_get_the_message_and_signals_of_a_publish_after_the_create(
    proj: Any, redis_db: RedisDB
) -> None:
    """A flow of a given id takes the usual path (someone may hold that id already);
    its root messages are those of a flow of a drawn id, field by field, and each
    root's publish signals fire once, with its task id."""
    client = redis_db.client
    seen: list[tuple[str, str]] = []

    def before(headers: dict[str, Any], **_: Any) -> None:
        seen.append(("before", headers["id"]))

    def after(headers: dict[str, Any], **_: Any) -> None:
        seen.append(("after", headers["id"]))

    before_task_publish.connect(before, weak=False)
    after_task_publish.connect(after, weak=False)
    try:
        proj.flows.submit(_diamond(proj))
        client.delete("celery", "other")
        seen.clear()
        before_calls = _calls(client)
        usual = proj.flows.submit(_diamond(proj, fid="given-id"))
        usual_calls = (_calls(client) - before_calls)["cmdstat_evalsha"]
        usual_msgs = _queued(client, "celery") + _queued(client, "other")
        usual_seen = list(seen)
        client.delete("celery", "other")
        seen.clear()
        direct = proj.flows.submit(_diamond(proj))
        direct_msgs = _queued(client, "celery") + _queued(client, "other")
        direct_seen = list(seen)
    finally:
        before_task_publish.disconnect(before)
        after_task_publish.disconnect(after)
    assert usual_calls == 3  # create and claim in one round trip, then the acknowledgement
    for handle, msgs, signals in ((usual, usual_msgs, usual_seen),
                                  (direct, direct_msgs, direct_seen)):
        ids = [m["headers"]["id"] for m in msgs]
        assert [node_doc(handle, n)["task_ids"] for n in "ab"] == [[i] for i in ids]
        assert sorted(signals) == sorted([("before", i) for i in ids]
                                         + [("after", i) for i in ids])
    assert [_shape(m) for m in direct_msgs] == [_shape(m) for m in usual_msgs]
    assert [m["properties"]["delivery_info"]["routing_key"] for m in direct_msgs] == \
        ["celery", "other"]


@pytest.mark.parametrize("case", ["other-database", "rate-limit", "external-root"])
def test_the_usual_path_where_the_roots_cannot_go_with_the_create(
    case: str, redis_db: RedisDB, redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker on another database of the same server, a flow rate limit, a root that
    is no task: create, then publish and acknowledge, each root queued all the same."""
    broker = redis_server.database(redis_db.db % 63 + 1) if case == "other-database" else None
    monkeypatch.setenv(BROKER_ENV, broker.celery_url if broker else redis_db.celery_url)
    monkeypatch.setenv(REDIS_ENV, redis_db.celery_url)
    sys.modules.pop("tests.proj", None)
    proj = importlib.import_module("tests.proj")
    try:
        queue_client = (broker or redis_db).client
        f = Flow("usual", rate_limit="100/s" if case == "rate-limit" else None)
        a = f.add(proj.add.si(1, 2), id="a")
        if case == "external-root":
            f.add_external("gate")
            f.add(proj.add.s(1), id="b", after=[a, "gate"])
        proj.flows.submit(f)  # each submit draws a new flow id
        queue_client.delete("celery")
        before = _calls(redis_db.client)
        handle = proj.flows.submit(f)
        added = _calls(redis_db.client) - before
        assert added["cmdstat_evalsha"] >= 2, added
        assert queue_client.llen("celery") == 1
        assert handle.node_states()["a"] == NodeState.QUEUED
        assert redis_db.client.zcard(proj.flows.store.keys.dispatch) == 0
    finally:
        proj.app.close()
        if broker is not None:
            broker.close()


def test_add_bulk_queues_each_flows_roots_as_it_unhides_it(
    proj: Any, redis_db: RedisDB, worker_factory: WorkerFactory
) -> None:
    """add_bulk's flows are created hidden and un-hidden at the batch's commit: each
    un-hiding also pushes its flow's root messages and acknowledges them, so the batch
    needs no claim and no acknowledgement afterwards."""
    client = redis_db.client
    proj.flows.submit(_diamond(proj))
    client.delete("celery", "other")
    before = _calls(client)
    handles = proj.flows.add_bulk([_diamond(proj) for _ in range(5)])
    added = _calls(client) - before
    # per flow: create.lua and unhide.lua; the batch record: open, commit
    assert added["cmdstat_evalsha"] == 2 * 5 + 2, added
    assert added["cmdstat_lpush"] == 10, added
    # the creates are pipelined, not one transaction that holds every other client
    assert added["cmdstat_multi"] == added["cmdstat_exec"] == 0, added
    assert client.llen("celery") == 5 and client.llen("other") == 5
    for handle in handles:
        assert [handle.node_states()[n] for n in "abc"] == \
            [NodeState.QUEUED, NodeState.QUEUED, NodeState.PENDING]
    assert client.zcard(proj.flows.store.keys.dispatch) == 0
    worker_factory("tests.proj", queues=("celery", "other"))
    for handle in handles:
        assert handle.wait(timeout=60) == FlowState.SUCCEEDED
        assert handle.results() == {"a": 3, "b": 7, "c": 10}
        assert run_counts(redis_db, handle.id) == {"a": 1, "b": 1, "c": 1}


@pytest.mark.parametrize("path", ["with-the-create", "after-the-create"])
def test_a_producer_publishes_nodes_without_subscribing_to_their_results(
    path: str, proj: Any, redis_db: RedisDB, worker_factory: WorkerFactory
) -> None:
    """Celery subscribes a producer to each task's result channel as it publishes it,
    and unsubscribes when the AsyncResult goes: nobody waits on a node's AsyncResult,
    so a flow's publishes skip both (engine/unwatched.py). A plain ``delay`` in the same
    process still subscribes, and a node's AsyncResult can still be awaited."""
    client = redis_db.client
    proj.flows.submit(_diamond(proj))
    client.delete("celery", "other")
    before = _calls(client)
    handle = proj.flows.submit(_diamond(proj, fid="given-id" if path == "after-the-create"
                                         else None))
    added = _calls(client) - before
    assert added["cmdstat_lpush"] == 2, added
    assert added["cmdstat_subscribe"] == added["cmdstat_unsubscribe"] == 0, added
    plain = proj.add.delay(1, 1)
    assert (_calls(client) - before)["cmdstat_subscribe"] == 1
    worker_factory("tests.proj", queues=("celery", "other"))
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert plain.get(timeout=30) == 2
    [task_id] = node_doc(handle, "a")["task_ids"]
    assert proj.app.AsyncResult(task_id).get(timeout=30) == 3
