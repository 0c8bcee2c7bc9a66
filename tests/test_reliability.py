"""Reliability under faults (SPEC section 9): processes really killed with SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from celery_flows import Flow, FlowState, FlowTimeoutError
from celery_flows.testing import RedisServer, wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, node_doc, one_outcome_per_attempt, run_counts

LEASE = 3.0


def test_worker_killed_with_running_nodes_is_recovered_within_the_lease(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"FLOWS_TEST_LEASE": str(LEASE)}
    monkeypatch.setenv("FLOWS_TEST_LEASE", str(LEASE))
    proj = import_app("tests.proj")
    doomed = worker_factory("tests.proj", env=env, concurrency=2)
    f = Flow("victim")
    a = f.add(proj.pid_sleep.si(30, "a"), id="a")
    b = f.add(proj.pid_sleep.si(30, "b"), id="b")
    f.add(proj.collect.s(), id="join", after=[a, b])
    handle = proj.flows.submit(f)
    wait_until(lambda: all(node_doc(handle, n)["state"] == "running" for n in "ab"),
               "a, b running")
    doomed.kill9()
    killed_at = time.time()
    worker_factory("tests.proj", env=env, extra_args=FLOWS, concurrency=2)
    wait_until(lambda: all(node_doc(handle, n)["attempts"] == 2 for n in "ab"),
               "recovery of a and b", timeout=LEASE + 15)
    recovered_in = max(node_doc(handle, n)["started_at"] or 0 for n in "ab") - killed_at
    print(f"\nrecovered {recovered_in:.2f} s after kill -9 (lease timeout {LEASE} s)")
    assert recovered_in < LEASE + 5
    proj.flows.cancel(handle.id, terminate=True)


def test_pool_child_killed_mid_task_is_recovered_as_a_new_attempt(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    f = Flow("child-killed")
    a = f.add(proj.pid_sleep.si(2, "done"), id="a")
    f.add(proj.ident.s(), id="b", after=[a])
    handle = proj.flows.submit(f)
    wait_until(lambda: redis_db.client.get("pid:a") is not None, "a to start")
    os.kill(int(redis_db.client.get("pid:a") or 0), signal.SIGKILL)
    assert handle.wait(timeout=40) == FlowState.SUCCEEDED
    a_doc = node_doc(handle, "a")
    assert a_doc["attempts"] == 2 and a_doc["recoveries"] == 1
    assert handle.results() == {"a": "done", "b": "done"}
    assert run_counts(redis_db, handle.id) == {"a": 2, "b": 1}
    one_outcome_per_attempt(handle)


def test_pool_child_killed_between_the_body_and_its_record(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    tmp_path: Any,
) -> None:
    """The body returned; the child dies before celery-flows records the success and
    before Celery stores the result (the guard records first: worker/guard.py). Nothing
    holds the outcome, so the node runs again as a new attempt; its dependent runs
    once."""
    marker = tmp_path / "killed"
    env = {"FLOWS_TEST_LEASE": str(LEASE),
           "CELERY_FLOWS_FAULTS": f"body-returned=kill-once:{marker}"}
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2, env=env)
    f = Flow("completion-killed")
    a = f.add(proj.double.si(21), id="a")
    f.add(proj.ident.s(), id="b", after=[a])
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert marker.exists()
    assert handle.results() == {"a": 42, "b": 42}
    assert run_counts(redis_db, handle.id) == {"a": 2, "b": 1}
    assert node_doc(handle, "a")["recoveries"] == 1
    one_outcome_per_attempt(handle)


def test_success_the_registry_missed_is_taken_from_the_result_backend(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    """Recording the success fails (the first body of the only pool child), so the
    outcome exists only in Celery's result backend, which stores it after the guard.
    The worker's reconciliation finds the finished task without a recorded outcome and
    takes the result from the backend: nothing runs twice."""
    env = {"FLOWS_TEST_LEASE": str(LEASE), "CELERY_FLOWS_FAULTS": "body-returned@1=raise"}
    proj = import_app("tests.proj")
    worker = worker_factory("tests.proj", extra_args=FLOWS, concurrency=1, env=env)
    f = Flow("record-missed")
    a = f.add(proj.double.si(21), id="a")
    f.add(proj.ident.s(), id="b", after=[a])
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results() == {"a": 42, "b": 42}
    assert run_counts(redis_db, handle.id) == {"a": 1, "b": 1}
    assert node_doc(handle, "a")["recoveries"] == 0
    log = worker.log()
    assert "fault injected at 'body-returned'" in log
    assert "taking it from the result backend (succeeded)" in log
    one_outcome_per_attempt(handle)


def test_acks_late_thousands_of_nodes_run_exactly_once(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"FLOWS_TEST_ACKS_LATE": "1"}
    monkeypatch.setenv("FLOWS_TEST_ACKS_LATE", "1")
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2, env=env)
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2, env=env)
    flows_ = []
    for i in range(20):
        f = Flow("bulk", id=f"bulk-{i}")
        root = f.add(proj.add.si(i, 0), id="root")
        mids = [f.add(proj.add.s(j), id=f"m{j}", after=[root]) for j in range(100)]
        f.add(proj.tsum.s(), id="sink", after=mids)
        flows_.append(f)
    handles = proj.flows.add_bulk(flows_)
    for i, h in enumerate(handles):
        assert h.wait(timeout=180) == FlowState.SUCCEEDED
        assert h.results()["sink"] == sum(i + j for j in range(100))
    total = Counter(r.rsplit("|", 1)[0] for r in
                    (x.decode() for x in redis_db.client.lrange("runs", 0, -1)))
    assert len(total) == 20 * 102
    assert set(total.values()) == {1}


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    server = RedisServer(["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def test_chaos_kills_and_a_redis_restart_lose_nothing(
    import_app: ImportApp, worker_factory: WorkerFactory, aof_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = aof_redis.celery_url(0)
    env = {"FLOWS_TEST_LEASE": "2", "FLOWS_TEST_VISIBILITY": "6",
           "FLOWS_TEST_RESTORE_INTERVAL": "0.2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proj = import_app("tests.proj", broker_url=url)
    rng = random.Random(42)

    def start_worker() -> Any:
        return worker_factory("tests.proj", extra_args=FLOWS, concurrency=2, env=env,
                              broker_url=url, ready_timeout=60)

    workers = [start_worker(), start_worker()]
    handles = []
    for i in range(30):
        f = Flow("chaos", id=f"chaos-{i}")
        first = [f.add(proj.step.si(i, rng.choice([0.05, 0.2])), id=f"l0-{k}")
                 for k in range(3)]
        second = [f.add(proj.step.s(0.1), id=f"l1-{k}", after=first) for k in range(2)]
        third = f.add(proj.step.s(0.05), id="l2", after=second)
        f.add(proj.step.s(0.05), id="l3", after=[third, first[0]])
        handles.append(proj.flows.submit(f))
    deadline = time.monotonic() + 25
    kills = 0
    restarted_redis = False
    while time.monotonic() < deadline and not all(h.state().terminal for h in handles):
        time.sleep(rng.uniform(0.8, 1.6))
        victim = workers.pop(rng.randrange(len(workers)))
        if rng.random() < 0.5 and victim.child_pids():
            os.kill(rng.choice(victim.child_pids()), signal.SIGKILL)  # one pool child
            workers.append(victim)
        else:
            victim.kill9()
            workers.append(start_worker())
        kills += 1
        if not restarted_redis and kills == 4:
            aof_redis.restart()
            restarted_redis = True
    assert restarted_redis or all(h.state().terminal for h in handles)
    for h in handles:
        try:
            state = h.wait(timeout=90)
        except FlowTimeoutError:
            state = h.state()
        assert state == FlowState.SUCCEEDED, json.dumps(h.inspect(), indent=1)
        one_outcome_per_attempt(h)
    runs = Counter(r.decode().rsplit("|", 1)[0] for r in
                   aof_redis.client(0).lrange("runs", 0, -1))
    for h in handles:
        for nid in h.node_states():
            assert runs[f"{h.id}|{nid}"] >= 1, (h.id, nid)
    print(f"\nchaos: {kills} kills, redis restarted: {restarted_redis}, "
          f"re-runs: {sum(n - 1 for n in runs.values())} of {len(runs)} nodes")


def test_a_message_lost_in_a_broker_crash_is_published_again(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker is a redis-server without persistence, SIGKILLed while the node's
    message waits in it: the message is gone for real; the registry (another server)
    still says queued, and a --flows worker publishes it again, same attempt."""
    broker = RedisServer()
    broker.start()
    try:
        env = {"FLOWS_TEST_LEASE": str(LEASE), "FLOWS_TEST_REGISTRY": redis_db.redis_url}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        proj = import_app("tests.proj", broker_url=broker.celery_url(0))
        f = Flow("lost-message")
        a = f.add(proj.add.si(1, 1), id="a")
        f.add(proj.ident.s(), id="b", after=[a])
        handle = proj.flows.submit(f)
        assert node_doc(handle, "a")["state"] == "queued"
        assert broker.client(0).llen("celery") == 1
        broker.kill()  # the broker crashes and loses the message
        broker.start()
        assert broker.client(0).llen("celery") == 0
        worker_factory("tests.proj", extra_args=FLOWS, env=env,
                       broker_url=broker.celery_url(0))
        assert handle.wait(timeout=LEASE + 30) == FlowState.SUCCEEDED
        rec = proj.flows.store.node(handle.id, "a")
        assert [h["outcome"] for h in rec["history"]] == ["requeued", "succeeded"]
        assert rec["attempt"] == 1
        runs = Counter(r.decode().split("|")[1]
                       for r in broker.client(0).lrange("runs", 0, -1))
        assert runs == {"a": 1, "b": 1}
    finally:
        broker.cleanup()


def test_recoveries_are_bounded_by_max_recoveries(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    f = Flow("doomed")
    a = f.add(proj.pid_sleep.si(5, "x"), id="a", max_recoveries=1)
    f.add(proj.ident.s(), id="b", after=[a])
    handle = proj.flows.submit(f)
    for attempt in (1, 2):
        wait_until(lambda n=attempt: node_doc(handle, "a")["attempts"] == n
                   and node_doc(handle, "a")["state"] == "running"
                   and redis_db.client.get("pid:a") is not None, f"attempt {attempt}")
        os.kill(int(redis_db.client.getdel("pid:a") or 0), signal.SIGKILL)
    assert handle.wait(timeout=30) == FlowState.FAILED
    doc = node_doc(handle, "a")
    assert doc["error"].startswith("WorkerLostError") and doc["recoveries"] == 2
    assert node_doc(handle, "b")["skip_reason"] == "upstream_failed"
