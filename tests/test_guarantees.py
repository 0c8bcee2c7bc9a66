"""docs/guarantees.rst, statement by statement, each fault produced for real: a process
SIGKILLed at a fault point (``CELERY_FLOWS_FAULTS``, set only in that process), a
worker killed or frozen, a redis-server SIGKILLed under each ``appendfsync`` policy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from celery_flows import Flow, FlowState, FlowTimeoutError
from celery_flows.faults import ENV as FAULTS
from celery_flows.testing import RedisServer, wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import BROKER_ENV, FLOWS, ROOT, node_doc, one_outcome_per_attempt, run_counts

LEASE = 3.0


def two_step(proj: Any, first_queue: str, second_queue: str = "celery") -> Flow:
    f = Flow("two-step")
    a = f.add(proj.add.si(1, 1), id="a", queue=first_queue)
    f.add(proj.add.s(10), id="b", after=[a], queue=second_queue)
    return f


# -- Delivery: a crash between recording and publishing ----------------------------


def test_crash_between_record_and_publish(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    """The pool child that records a's outcome is SIGKILLed right after the record (b is
    in the outbox, claimed, unpublished); the sweeper of another --flows worker
    publishes b, once."""
    proj = import_app("tests.proj")
    crashing = worker_factory("tests.proj", queues=("faulty",),
                              env={FAULTS: "after-record=kill"})
    worker_factory("tests.proj", extra_args=FLOWS)
    handle = proj.flows.submit(two_step(proj, "faulty"))
    wait_until(lambda: node_doc(handle, "a")["state"] == "succeeded", "a recorded")
    assert node_doc(handle, "b")["state"] == "scheduled"  # in the outbox, not published
    wait_until(lambda: not crashing.child_pids() or "WorkerLostError" in crashing.log()
               or not crashing.is_running(), "the recording process to die")
    assert handle.wait(timeout=90) == FlowState.SUCCEEDED
    assert handle.results() == {"a": 2, "b": 12}
    assert run_counts(redis_db, handle.id) == {"a": 1, "b": 1}
    one_outcome_per_attempt(handle)


def test_producer_killed_between_creating_and_publishing(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    """``submit`` stores the flow, then its process is SIGKILLed before it publishes the
    roots: a --flows worker publishes them."""
    proj = import_app("tests.proj")
    script = ("from celery_flows import Flow\nimport tests.proj as p\n"
              "f = Flow('orphan', id='orphan-1')\n"
              "a = f.add(p.add.si(2, 3), id='a')\nf.add(p.add.s(1), id='b', after=[a])\n"
              "p.flows.submit(f)\nprint('submit returned')\n")
    env = {**os.environ, BROKER_ENV: redis_db.celery_url, FAULTS: "after-create=kill",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "submit returned" not in done.stdout
    handle = proj.flows.get("orphan-1")
    assert node_doc(handle, "a")["state"] == "scheduled"
    assert redis_db.client.llen("celery") == 0
    worker_factory("tests.proj", extra_args=FLOWS)
    assert handle.wait(timeout=90) == FlowState.SUCCEEDED
    assert handle.results() == {"a": 5, "b": 6}
    assert run_counts(redis_db, handle.id) == {"a": 1, "b": 1}


def test_crash_between_publish_and_acknowledging_the_outbox(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    """The process that publishes b is SIGKILLed before it acknowledges the outbox: the
    sweeper publishes b a second time; the duplicate is acknowledged without running."""
    proj = import_app("tests.proj")
    crashing = worker_factory("tests.proj", queues=("faulty",),
                              env={FAULTS: "sent-before-ack=kill"})
    worker_factory("tests.proj", extra_args=FLOWS, queues=("celery",))
    handle = proj.flows.submit(two_step(proj, "faulty", second_queue="later"))
    wait_until(lambda: redis_db.client.llen("later") == 1, "b published once", timeout=30)
    wait_until(lambda: not crashing.child_pids() or not crashing.is_running()
               or "WorkerLostError" in crashing.log(), "the publishing process to die")
    # b is not started yet, so once its claim lapses the sweeper publishes it again
    wait_until(lambda: redis_db.client.llen("later") == 2, "b published again", timeout=90)
    consumer = worker_factory("tests.proj", queues=("later",))
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results() == {"a": 2, "b": 12}
    # "duplicate delivery", or "node finished" when the copy comes after b's outcome
    consumer.wait_for_log(r"not running .*~b~1~", timeout=30)
    assert run_counts(redis_db, handle.id) == {"a": 1, "b": 1}
    one_outcome_per_attempt(handle)


def test_crash_in_the_middle_of_a_batched_release_delivers_nothing_of_it(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    """A completion releases three dependents; their messages go to Redis in one
    pipeline when the claim's last one is built. The releasing process is SIGKILLed
    while building the third: none of the three reached the broker, none is
    acknowledged, and once the claims lapse the sweeper publishes each once."""
    proj = import_app("tests.proj")
    crashing = worker_factory("tests.proj", queues=("faulty",),
                              env={FAULTS: "claimed-before-publish@3=kill"})
    worker_factory("tests.proj", extra_args=FLOWS, queues=("celery",))
    f = Flow("fan-out")
    a = f.add(proj.add.si(1, 1), id="a", queue="faulty")
    for n, nid in enumerate("bcd"):
        f.add(proj.add.s(n), id=nid, after=[a], queue="later")
    handle = proj.flows.submit(f)
    wait_until(lambda: "WorkerLostError" in crashing.log() or not crashing.is_running(),
               "the releasing process to die", timeout=60)
    assert node_doc(handle, "a")["state"] == "succeeded"
    assert redis_db.client.llen("later") == 0, "a message of the batch went before the kill"
    assert {node_doc(handle, n)["state"] for n in "bcd"} == {"scheduled"}
    wait_until(lambda: redis_db.client.llen("later") == 3, "the sweeper's publish",
               timeout=90)
    worker_factory("tests.proj", queues=("later",))
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results() == {"a": 2, "b": 2, "c": 3, "d": 4}
    assert run_counts(redis_db, handle.id) == {"a": 1, "b": 1, "c": 1, "d": 1}
    one_outcome_per_attempt(handle)


# -- Recovery: a manager killed in the middle of recovering a lost worker -------------


def test_manager_killed_while_recovering_a_lost_worker(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The --flows worker recovering a killed worker's two leases is SIGKILLed after the
    first: another manager recovers the second, and the first gets no third attempt."""
    env = {"FLOWS_TEST_LEASE": str(LEASE)}
    monkeypatch.setenv("FLOWS_TEST_LEASE", str(LEASE))
    proj = import_app("tests.proj")
    victim = worker_factory("tests.proj", env=env, concurrency=2)
    f = Flow("twice-lost")
    a = f.add(proj.slow_first.si(120, "a"), id="a")
    b = f.add(proj.slow_first.si(120, "b"), id="b")
    f.add(proj.collect.s(), id="join", after=[a, b])
    handle = proj.flows.submit(f)
    wait_until(lambda: all(node_doc(handle, n)["state"] == "running" for n in "ab"),
               "a, b running", timeout=30)
    manager = worker_factory("tests.proj", extra_args=FLOWS, queues=("idle",),
                             env={**env, FAULTS: "recover-lease@2=kill"})
    victim.kill9()
    wait_until(lambda: not manager.is_running(), "the manager to die mid-recovery",
               timeout=60)
    attempts = sorted(node_doc(handle, n)["attempts"] for n in "ab")
    assert attempts == [1, 2], attempts
    worker_factory("tests.proj", extra_args=FLOWS, env=env, concurrency=2)
    # the killed manager's lock on the lost worker lapses (RECOVERY_LOCK, 15 s) before
    # anyone finishes
    assert handle.wait(timeout=180) == FlowState.SUCCEEDED
    for n in "ab":
        doc = node_doc(handle, n)
        assert (doc["attempts"], doc["recoveries"]) == (2, 1), doc
    assert handle.results()["join"] == [["a", "b"]]
    assert run_counts(redis_db, handle.id) == {"a": 2, "b": 2, "join": 1}
    one_outcome_per_attempt(handle)


# -- Execution: a worker declared lost that was only frozen ------------------------


def _leased(redis_db: RedisDB, proj: Any, fid: str) -> bool:
    """Whether some worker's lease set holds a task id of flow ``fid``."""
    client = redis_db.client
    for key in client.scan_iter(proj.flows.store.keys.leases("*")):
        if any(fid in m.decode() for m in client.zrange(key, 0, -1)):
            return True
    return False


def test_frozen_worker_declared_lost_reports_late(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker frozen (SIGSTOP, as in a network partition) past the lease is declared
    lost and its node runs again elsewhere; thawed, its attempt's report goes to the
    history only, marked late, and the node's result is the new attempt's. A message it
    had received but not started is a superseded attempt's: acknowledged, not run."""
    env = {"FLOWS_TEST_LEASE": str(LEASE)}
    monkeypatch.setenv("FLOWS_TEST_LEASE", str(LEASE))
    proj = import_app("tests.proj")
    frozen = worker_factory("tests.proj", env=env, concurrency=1)
    f = Flow("partition")
    a = f.add(proj.slow_first.si(4, "a"), id="a")
    f.add(proj.ident.s(), id="b", after=[a])
    handle = proj.flows.submit(f)
    wait_until(lambda: node_doc(handle, "a")["state"] == "running", "a running")
    other = Flow("prefetched")
    other.add(proj.add.si(1, 1), id="y")
    prefetched = proj.flows.submit(other)  # received by the frozen worker, not started
    frozen.wait_for_log(rf"{prefetched.id}~y~1~\S+\] received")
    # leased within RECEIPT_DELAY of its receipt (worker/receipts.py): frozen before
    # that, the message would be the rescue's, not the lease recovery's this tests
    wait_until(lambda: _leased(redis_db, proj, prefetched.id), "y leased by its receipt")
    os.killpg(frozen.pid, signal.SIGSTOP)
    try:
        worker_factory("tests.proj", extra_args=FLOWS, env=env, concurrency=1)
        assert handle.wait(timeout=60) == FlowState.SUCCEEDED
        assert prefetched.wait(timeout=60) == FlowState.SUCCEEDED
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    # thawed, it takes the superseded attempt's message: acknowledged, not run
    frozen.wait_for_log(rf"not running {prefetched.id}~y~1~", timeout=60)
    assert node_doc(prefetched, "y")["attempts"] == 2
    assert run_counts(redis_db, prefetched.id) == {"y": 1}
    wait_until(lambda: any(h.get("late") for h in
                           proj.flows.store.node(handle.id, "a")["history"]),
               "the thawed attempt's late report", timeout=60)
    rec = proj.flows.store.node(handle.id, "a")
    assert rec["attempt"] == 2 and rec["state"] == "succeeded"
    late = [h for h in rec["history"] if h.get("late")]
    assert [h["attempt"] for h in late] == [1], rec["history"]
    assert handle.results() == {"a": "a", "b": "a"}
    assert run_counts(redis_db, handle.id) == {"a": 2, "b": 1}
    one_outcome_per_attempt(handle)


# -- Redis: SIGKILLed mid-run, under each fsync policy ------------------------------


def _expected(i: int) -> dict[str, int]:
    root = 1 + i
    l1 = 1 + 3 * root
    l2 = 1 + 2 * l1
    return {**{f"l0-{k}": root for k in range(3)}, **{f"l1-{k}": l1 for k in range(2)},
            "l2": l2, "l3": 1 + l2 + root}


@pytest.fixture
def crash_redis(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    server = RedisServer(["--appendonly", "yes", "--appendfsync", request.param])
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def _run_through_redis_crashes(import_app: ImportApp, worker_factory: WorkerFactory,
                               server: RedisServer, lease: float,
                               monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[Any]]:
    url = server.celery_url(0)
    env = {"FLOWS_TEST_LEASE": str(lease), "FLOWS_TEST_RESTORE_INTERVAL": "0.2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proj = import_app("tests.proj", broker_url=url)
    for _ in range(2):
        worker_factory("tests.proj", extra_args=FLOWS, concurrency=2, env=env,
                       broker_url=url, ready_timeout=60)
    handles = []
    for i in range(20):
        f = Flow("crash", id=f"crash-{i}")
        first = [f.add(proj.tally.si(i), id=f"l0-{k}") for k in range(3)]
        second = [f.add(proj.tally.s(), id=f"l1-{k}", after=first) for k in range(2)]
        third = f.add(proj.tally.s(), id="l2", after=second)
        f.add(proj.tally.s(), id="l3", after=[third, first[0]])
        handles.append(proj.flows.submit(f))
    for _ in range(3):
        time.sleep(1.5)
        server.kill()  # SIGKILL: only what the fsync policy wrote survives
        server.start()
    for h in handles:
        try:
            state = h.wait(timeout=120)
        except FlowTimeoutError:
            state = h.state()
        assert state == FlowState.SUCCEEDED, json.dumps(h.inspect(), indent=1)
        assert h.results() == _expected(int(h.id.split("-")[1])), h.id
        one_outcome_per_attempt(h)
    return proj, handles


def _executions(server: RedisServer) -> Counter[str]:
    return Counter(m.decode().rsplit("|", 2)[0] for m in server.client(0).smembers("execs"))


@pytest.mark.parametrize("crash_redis", ["always"], indirect=True)
def test_redis_sigkilled_with_appendfsync_always_loses_nothing_and_reruns_nothing(
    import_app: ImportApp, worker_factory: WorkerFactory, crash_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a lease far longer than the outages: no worker may be declared lost, so no re-run
    _proj, handles = _run_through_redis_crashes(import_app, worker_factory, crash_redis,
                                                30.0, monkeypatch)
    runs = _executions(crash_redis)
    for h in handles:
        for nid in h.node_states():
            assert runs[f"{h.id}|{nid}"] == 1, (h.id, nid, h.inspect()["nodes"][nid])


@pytest.mark.parametrize("crash_redis", ["everysec"], indirect=True)
def test_redis_sigkilled_with_appendfsync_everysec_still_finishes_every_flow(
    import_app: ImportApp, worker_factory: WorkerFactory, crash_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Up to a second of writes is lost: nodes may run again, but every flow finishes
    with the right results and each attempt keeps at most one outcome."""
    _proj, handles = _run_through_redis_crashes(import_app, worker_factory, crash_redis,
                                                LEASE, monkeypatch)
    runs = _executions(crash_redis)
    print(f"\neverysec: {sum(max(n - 1, 0) for n in runs.values())} re-runs, "
          f"{20 * 7 - len(runs)} executions whose record was lost with the crash")


def test_messages_of_a_cancelled_flow_are_acked_without_running(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    handle = proj.flows.submit(two_step(proj, "celery"))
    assert redis_db.client.llen("celery") == 1  # a's message waits in the broker
    proj.flows.cancel(handle.id)
    w = worker_factory("tests.proj", extra_args=FLOWS)
    w.wait_for_log(r"not running .*~a~1~", timeout=30)
    assert handle.state() == FlowState.CANCELLED
    assert run_counts(redis_db, handle.id) == {}
