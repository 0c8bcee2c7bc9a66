"""Worker and flow lifecycles (SPEC section 9): warm shutdown and rolling deploys, pause
against an in-flight release, reused flow ids, eager flows next to live workers, and a
flow of an unknown format version. Real redis-server, real worker subprocesses; races
are produced with fault-injection points (celery_flows/faults.py)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from celery_flows import Flow, FlowState, NodeState
from celery_flows import faults as faults_mod
from celery_flows.testing import Worker, wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, run_counts

LEASE = 3.0


def _env(**extra: str) -> dict[str, str]:
    return {"FLOWS_TEST_LEASE": str(LEASE), **extra}


def _doc(handle: Any, nid: str) -> dict[str, Any]:
    return handle.inspect()["nodes"][nid]


def _warm_stop(worker: Worker, timeout: float = 90.0) -> None:
    """SIGTERM and wait for the worker to exit by itself (no SIGKILL fallback)."""
    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    try:
        worker.process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{worker.name} did not finish its warm shutdown") from None
    worker.stop()


@pytest.mark.parametrize("how", ["sigterm", "shutdown-control"])
def test_warm_shutdown_keeps_the_lease_of_a_node_longer_than_it(
    how: str, import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOWS_TEST_LEASE", str(LEASE))
    proj = import_app("tests.proj")
    leaving = worker_factory("tests.proj", env=_env(), concurrency=1)
    f = Flow("deploy")
    a = f.add(proj.sleepy.si(4 * LEASE, "a"), id="a")
    f.add(proj.ident.s(), id="b", after=[a])
    handle = proj.flows.submit(f)
    wait_until(lambda: _doc(handle, "a")["state"] == "running", "a running", timeout=30)
    worker_factory("tests.proj", env=_env(), extra_args=FLOWS, concurrency=2)
    if how == "sigterm":
        _warm_stop(leaving)
    else:
        host = proj.flows.store.node(handle.id, "a")["worker"]
        proj.app.control.shutdown(destination=[host])
        assert leaving.process is not None
        leaving.process.wait(90)
        leaving.stop()
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results() == {"a": "a", "b": "a"}
    assert run_counts(redis_db, handle.id) == {"a": 1, "b": 1}
    doc = _doc(handle, "a")
    assert doc["attempts"] == 1 and doc["recoveries"] == 0, doc
    # the clean exit left nothing for a manager to recover
    assert not any(info.get("hostname", "").startswith(leaving.name)
                   for _beat, info in proj.flows.store.workers().values())


def test_prefetched_messages_are_handed_back_and_run_later_as_the_same_attempt(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOWS_TEST_LEASE", str(LEASE))
    proj = import_app("tests.proj")
    # a manager that consumes nothing of ours: it would recover leases left behind
    worker_factory("tests.proj", env=_env(), extra_args=FLOWS, queues=("other",))
    leaving = worker_factory("tests.proj", env=_env(), concurrency=1,
                             extra_args=["--prefetch-multiplier", "3"])
    long_flow = Flow("long")
    long_flow.add(proj.sleepy.si(2 * LEASE, "long"), id="long")
    hl = proj.flows.submit(long_flow)
    wait_until(lambda: _doc(hl, "long")["state"] == "running", "long running", timeout=30)
    f = Flow("prefetched")
    f.add(proj.ident.si("p1"), id="p1")
    f.add(proj.ident.si("p2"), id="p2")
    handle = proj.flows.submit(f)
    instance = proj.flows.store.node(hl.id, "long")["lease"]
    wait_until(lambda: len(proj.flows.store.leases(instance)) == 3,
               "the worker to hold both messages unstarted", timeout=30)
    assert run_counts(redis_db, handle.id) == {}
    _warm_stop(leaving)
    assert hl.wait(timeout=30) == FlowState.SUCCEEDED
    assert proj.flows.store.leases(instance) == []
    # long enough for the manager to have recovered a lease left behind
    time.sleep(LEASE + 3)
    assert handle.node_states() == {"p1": NodeState.QUEUED, "p2": NodeState.QUEUED}
    worker_factory("tests.proj", env=_env(), concurrency=1)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results() == {"p1": "p1", "p2": "p2"}
    assert run_counts(redis_db, handle.id) == {"p1": 1, "p2": 1}
    for nid in ("p1", "p2"):
        doc = _doc(handle, nid)
        assert doc["attempts"] == 1 and doc["recoveries"] == 0, doc


def test_rolling_restart_re_runs_nothing_and_uses_no_recovery(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOWS_TEST_LEASE", str(LEASE))
    proj = import_app("tests.proj")
    args = [*FLOWS, "--prefetch-multiplier", "2"]
    workers = [worker_factory("tests.proj", env=_env(), extra_args=args) for _ in range(2)]
    handles = []
    for i in range(2):
        f = Flow("rolling", id=f"rolling-{i}")
        longs = [f.add(proj.sleepy.si(LEASE + 1, j), id=f"n{j}") for j in range(8)]
        f.add(proj.collect.s(), id="join", after=longs)
        handles.append(proj.flows.submit(f))
    for old in workers:
        wait_until(lambda: any(d["state"] == "running" for h in handles
                               for d in h.inspect()["nodes"].values()), "nodes running")
        time.sleep(1.0)
        _warm_stop(old)
        worker_factory("tests.proj", env=_env(), extra_args=args)
    for h in handles:
        assert h.wait(timeout=120) == FlowState.SUCCEEDED
        assert run_counts(redis_db, h.id) == {**{f"n{j}": 1 for j in range(8)}, "join": 1}
        nodes = h.inspect()["nodes"]
        assert {n: (d["attempts"], d["recoveries"]) for n, d in nodes.items()} == \
            {n: (1, 0) for n in nodes}
        assert h.results()["join"] == [list(range(8))]


@pytest.mark.parametrize("faults", [
    # the node is claimed, pause() returns, then the message goes out and a worker gets it
    "claimed-before-publish=sleep:4",
    # ... and the worker refuses it before the publisher acknowledged the publish
    "claimed-before-publish=sleep:4,sent-before-ack=sleep:3",
])
def test_nothing_starts_after_pause_returns(
    faults: str, import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    worker = worker_factory("tests.proj", extra_args=FLOWS, concurrency=2,
                            env={"CELERY_FLOWS_FAULTS": faults})
    f = Flow("pause-race")
    a = f.add(proj.ident.si("a"), id="a")
    f.add(proj.ident.s(), id="b", after=[a])
    handle = proj.flows.submit(f)
    outbox = proj.flows.store.keys.flow(handle.id)[4]

    def b_claimed() -> bool:
        score = redis_db.client.zscore(outbox, "b")
        return score is not None and score > time.time() and \
            proj.flows.store.node(handle.id, "b")["state"] == "scheduled"

    wait_until(b_claimed, "b claimed by the worker releasing it", timeout=30)
    proj.flows.pause(handle.id)
    worker.wait_for_log(r"ident\[\S+~b~1~\S+\] received", timeout=30)
    time.sleep(5)  # the delayed acknowledgement of the refused publish has come and gone
    assert run_counts(redis_db, handle.id) == {"a": 1}, "b started while the flow was paused"
    assert "(flow paused; the node waits for resume)" in worker.log()
    assert handle.state() == FlowState.PAUSED
    assert handle.node_states()["b"] == NodeState.SCHEDULED
    assert proj.flows.store.leases(proj.flows.store.workers().popitem()[0]) == []
    assert proj.flows.resume(handle.id, dry_run=True)["released"] == ["b"]
    proj.flows.resume(handle.id)
    assert handle.wait(timeout=30) == FlowState.SUCCEEDED
    assert handle.results() == {"a": "a", "b": "a"}
    assert run_counts(redis_db, handle.id) == {"a": 1, "b": 1}
    doc = _doc(handle, "b")
    assert (doc["attempts"], doc["recoveries"], doc["retries"]) == (1, 0, 0), doc


def test_a_message_of_an_expired_flow_with_the_same_id_never_runs(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    proj.app.conf.flows_retention = 1
    old = Flow("reused", id="reused-id")
    old.add(proj.ident.si("old"), id="a", queue="parked")
    first = proj.flows.submit(old)
    stale_id = proj.flows.store.node(first.id, "a")["task_ids"][0]
    proj.flows.cancel(first.id)
    meta_key = proj.flows.store.keys.meta(first.id)
    wait_until(lambda: not redis_db.client.exists(meta_key), "the cancelled flow to expire")
    new = Flow("reused", id="reused-id")
    new.add(proj.ident.si("new"), id="a", queue="parked")
    second = proj.flows.submit(new)
    assert proj.flows.store.node(second.id, "a")["task_ids"][0] != stale_id
    assert redis_db.client.llen("parked") == 2  # the stale message is first in line
    worker = worker_factory("tests.proj", extra_args=FLOWS, concurrency=1,
                            queues=("parked",))
    assert second.wait(timeout=30) == FlowState.SUCCEEDED
    assert second.results() == {"a": "new"}
    assert run_counts(redis_db, second.id) == {"a": 1}
    worker.wait_for_log(rf"not running {stale_id} \(message of an earlier flow")
    doc = _doc(second, "a")
    assert doc["attempts"] == 1 and doc["recoveries"] == 0 and doc["task_ids"] != [stale_id]
    assert all(not h.get("late") for h in proj.flows.store.node(second.id, "a")["history"])


@pytest.fixture
def slow_eager_driver(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each eager step waits 5 ms (fault point eager-claim), so that a 1,500-node chain
    outlasts the workers' sweeper grace (a slower machine, a real task body)."""
    monkeypatch.setenv(faults_mod.ENV, "eager-claim=sleep:0.005")
    faults_mod.reload()
    yield
    monkeypatch.delenv(faults_mod.ENV)
    faults_mod.reload()


def test_an_eager_flow_is_the_producers_alone(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    slow_eager_driver: None,
) -> None:
    proj = import_app("tests.proj")
    worker = worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    proj.app.conf.task_always_eager = True
    for run in range(3):
        f = Flow("eager-chain", id=f"eager-{run}")
        prev = f.add(proj.ident.si(0), id="n0")
        for i in range(1, 1500):
            prev = f.add(proj.add.s(1), id=f"n{i}", after=[prev])
        started = time.monotonic()
        handle = proj.flows.submit(f)
        print(f"\neager run {run}: {time.monotonic() - started:.1f} s")
        assert handle.state() == FlowState.SUCCEEDED
        assert handle.results()["n1499"] == 1499
        ran_on = {rec.get("worker") for rec in proj.flows.store.nodes(handle.id).values()}
        assert ran_on == {"eager"}, ran_on
    assert " received" not in worker.log()


def test_a_flow_of_an_unknown_major_version_fails_its_message_with_a_clear_error(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    f = Flow("from-the-future")
    f.add(proj.ident.si("x"), id="a", queue="parked")
    handle = proj.flows.submit(f)
    task_id = proj.flows.store.node(handle.id, "a")["task_ids"][0]
    keys = proj.flows.store.keys.flow(handle.id)
    redis_db.client.hset(keys[0], "v", "2.0")  # as a newer celery-flows would write it
    before = {k: redis_db.client.dump(k) for k in keys}
    worker = worker_factory("tests.proj", extra_args=FLOWS, queues=("parked",))
    result = proj.app.AsyncResult(task_id)
    wait_until(lambda: result.state == "FAILURE", "the task to fail", timeout=30)
    error = str(result.result)
    assert type(result.result).__name__ == "FlowVersionError", repr(result.result)
    assert "record format 2.0" in error and "reads format 1.x" in error
    assert "upgrade celery-flows on this worker" in error
    assert "upgrade celery-flows on this worker" in worker.log()
    time.sleep(2)
    assert redis_db.client.llen("parked") == 0, "the message must not be retried forever"
    assert {k: redis_db.client.dump(k) for k in keys} == before, "the record was rewritten"
    assert run_counts(redis_db, handle.id) == {}
    assert proj.flows.store.leases(next(iter(proj.flows.store.workers()))) == []
