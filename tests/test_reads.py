"""Reading a flow from the producer: ``wait()`` on a pub/sub connection the thread
keeps from one wait to the next, ``results()`` in one round trip."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from celery_flows import Flow, FlowState, FlowTimeoutError, NodeState
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import node_doc


@pytest.fixture
def proj(import_app: ImportApp) -> Any:
    return import_app("tests.proj")


def _kept_ids(redis_db: RedisDB, before: set[str] = frozenset()) -> set[str]:  # type: ignore[assignment]
    """Connections to the test's database left unsubscribed by their last command
    (kept for the next wait), less those of ``before``."""
    return {c["id"] for c in redis_db.client.client_list()
            if c["cmd"] == "unsubscribe" and c["db"] == str(redis_db.db)} - before


def _one(proj: Any, x: int) -> Flow:
    f = Flow("one")
    f.add(proj.add.si(x, 1), id="a")
    return f


def test_waits_of_a_thread_share_one_pubsub_connection(
    proj: Any, redis_db: RedisDB, worker_factory: WorkerFactory
) -> None:
    worker_factory("tests.proj")
    first = proj.flows.submit(_one(proj, 1))
    # (Celery's result consumer keeps a connection too, from the first publish on)
    before = _kept_ids(redis_db)
    assert first.wait(timeout=60) == FlowState.SUCCEEDED
    kept = _kept_ids(redis_db, before)
    assert len(kept) == 1, "the wait's connection is kept for the next one"
    for x in range(2, 5):
        handle = proj.flows.submit(_one(proj, x))
        assert handle.wait(timeout=60) == FlowState.SUCCEEDED
        assert handle.results() == {"a": x + 1}
    assert _kept_ids(redis_db, before) == kept
    # another thread waits on its own connection (a pub/sub connection is not shared),
    # closed when the thread ends
    done: list[Any] = []
    handle = proj.flows.submit(_one(proj, 9))

    def other() -> None:
        done.append(handle.wait(timeout=60))
        done.append(_kept_ids(redis_db, before))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(60)
    assert done[0] == FlowState.SUCCEEDED
    assert len(done[1]) == 2 and kept < done[1]
    wait_until(lambda: _kept_ids(redis_db, before) == kept, "the thread's connection closed")


def test_a_kept_connection_wakes_only_for_its_flow(proj: Any, redis_db: RedisDB) -> None:
    """A notification on the channel of a flow waited for earlier (the kept connection
    was subscribed to it) does not end a wait for another flow; nor do the server's
    subscription confirmations."""
    store = proj.flows.store
    earlier = proj.flows.submit(_one(proj, 1))
    with pytest.raises(FlowTimeoutError):
        earlier.wait(timeout=0.2)  # no worker: it never finishes
    pending = proj.flows.submit(_one(proj, 2))
    reads: list[float] = []
    state = type(pending).state

    def counted(self: Any) -> FlowState:
        reads.append(time.monotonic())
        return state(self)

    type(pending).state = counted  # type: ignore[method-assign]
    try:
        noise = threading.Timer(0.3, lambda: [redis_db.client.publish(
            store.keys.channel(earlier.id), "done") for _ in range(20)])
        noise.start()
        started = time.monotonic()
        with pytest.raises(FlowTimeoutError):
            pending.wait(timeout=1.5, interval=5.0)
        noise.join()
    finally:
        type(pending).state = state  # type: ignore[method-assign]
    assert time.monotonic() - started >= 1.5
    # read once on subscribing and once when the timeout came: nothing woke it between
    assert len(reads) == 2, reads


def test_a_wait_takes_the_end_state_from_the_notification(
    proj: Any, redis_db: RedisDB, worker_factory: WorkerFactory
) -> None:
    """The flow's "done" notification carries the state it ended in: the wait reads
    the state once, on subscribing, and not again after the notification."""
    handle = proj.flows.submit(_one(proj, 1))
    reads: list[FlowState] = []
    state = type(handle).state

    def counted(self: Any) -> FlowState:
        reads.append(state(self))
        return reads[-1]

    type(handle).state = counted  # type: ignore[method-assign]
    try:
        threading.Timer(0.5, lambda: worker_factory("tests.proj")).start()
        # (interval: no re-read meanwhile while the worker starts)
        assert handle.wait(timeout=60, interval=50) == FlowState.SUCCEEDED
    finally:
        type(handle).state = state  # type: ignore[method-assign]
    assert reads == [FlowState.RUNNING]
    assert handle.results() == {"a": 2}


def test_a_transition_of_one_script_goes_without_a_pipeline(
    proj: Any, redis_db: RedisDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One script is sent as it is, a batch of several in one pipeline
    (Connection._execute): a pipeline around a single command only costs client CPU,
    twice per node in a worker (its start and its completion)."""
    store = proj.flows.store
    handle = proj.flows.submit(_one(proj, 1))
    [task_id] = node_doc(handle, "a")["task_ids"]
    made: list[Any] = []
    real = store.client.pipeline

    def counted(*args: Any, **kwargs: Any) -> Any:
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(store.client, "pipeline", counted)
    assert store.start(handle.id, "a", 1, "0:0", task_id, "w@host").code == 1
    assert handle.node_states()["a"] == NodeState.RUNNING
    assert made == []
    # a retry held in Redis: the script and the releaser's timer, one pipelined trip
    store.complete(handle.id, "a", 1, "retrying", retry_delay=30)
    assert len(made) == 1
    assert handle.node_states()["a"] == NodeState.RETRYING
    assert redis_db.client.zscore(store.keys.timers, handle.id) is not None
