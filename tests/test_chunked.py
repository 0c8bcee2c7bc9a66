"""A large flow is stored in pieces (engine/batch.py ``submit_large``), hidden until one
commit: a producer killed in the middle leaves nothing visible and runs nothing, a
retried submit of the same id replaces the leftovers and runs every node once; a worker
killed while it releases the roots of a large flow loses none and runs none twice."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from celery_flows import Flow, FlowState, FlowStateError
from celery_flows.observe.stats import collect
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, ROOT, cli, run_counts, visible

PAIRS = 200  # a_i -> b_i: 400 nodes; stored by the producer below in 8 pieces of 50

_PRODUCER = """
import sys
import tests.proj as proj
from celery_flows.engine import batch
from tests.test_chunked import pairs
# small pieces, two a round trip: the kill at the third trip leaves five of eight
# pieces stored, roots among them
batch.PIECE_NODES, batch.PIECES_PER_TRIP = 50, 2
proj.flows.submit(pairs(proj, sys.argv[1]))
"""

_COMMITTED_PRODUCER = """
import sys
import tests.proj as proj
from celery_flows import Flow
f = Flow("wide", id=sys.argv[1])
for i in range(int(sys.argv[2])):
    f.add(proj.add.si(i, 1), id=f"r{i}")
proj.flows.submit(f)
"""


def pairs(proj: object, fid: str) -> Flow:
    f = Flow("pairs", id=fid)
    for i in range(PAIRS):
        a = f.add(proj.add.si(i, i), id=f"a{i}")  # type: ignore[attr-defined]
        f.add(proj.add.s(1), id=f"b{i}", after=[a])  # type: ignore[attr-defined]
    return f


def _producer(script: str, faults: str, broker: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "FLOWS_TEST_BROKER": broker, "PYTHONPATH": str(ROOT),
           "CELERY_FLOWS_FAULTS": faults}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_producer_killed_mid_chunked_create_leaves_nothing_and_a_resubmit_runs_once(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    producer = _producer(_PRODUCER, "create-piece@3=kill", redis_db.celery_url, "halfway")
    out, _ = producer.communicate(timeout=120)
    assert producer.returncode == -9, out
    store = proj.flows.store
    stored = store.client.hlen(store.keys.nodes("halfway"))
    assert 0 < stored < 2 * PAIRS  # killed mid-way, some roots among what was stored
    assert store.hidden_by("halfway")
    time.sleep(3)  # what a --flows worker would do with it, it has had time to do
    assert not visible(proj, "halfway")
    listed = cli("list", "--limit", "100", broker=redis_db.celery_url)
    assert listed.returncode == 0 and "halfway" not in listed.stdout
    assert cli("inspect", "halfway", broker=redis_db.celery_url).returncode == 1
    assert collect(store, store.config)["flows"] == {}  # flows stats counts none
    assert not run_counts(redis_db, "halfway")

    # the retry, well before the sweeper's grace: it replaces the leftovers at once
    handle = proj.flows.submit(pairs(proj, "halfway"))
    assert handle.wait(timeout=180) is FlowState.SUCCEEDED
    assert handle.results() == {**{f"a{i}": 2 * i for i in range(PAIRS)},
                                **{f"b{i}": 2 * i + 1 for i in range(PAIRS)}}
    counts = run_counts(redis_db, "halfway")
    assert len(counts) == 2 * PAIRS and set(counts.values()) == {1}
    # idempotent from then on: the same definition is the same flow, another one clashes
    assert proj.flows.submit(pairs(proj, "halfway")).id == "halfway"
    other = Flow("pairs", id="halfway")
    other.add(proj.add.si(0, 0), id="a0")
    try:
        proj.flows.submit(other)
    except FlowStateError as exc:
        assert "different definition" in str(exc)
    else:
        raise AssertionError("another definition under the id was accepted")
    assert not store.batch_ids()


def test_worker_killed_while_releasing_a_large_flows_roots_runs_each_once(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    roots = 700  # more than one piece: the chunked path
    # the producer dies right after the commit: the flow is visible, nothing released
    producer = _producer(_COMMITTED_PRODUCER, "create-committed=kill", redis_db.celery_url,
                         "wide", str(roots))
    out, _ = producer.communicate(timeout=120)
    assert producer.returncode == -9, out
    handle = proj.flows.get("wide")
    assert handle.node_states() == {f"r{i}": "scheduled" for i in range(roots)}
    # a --flows worker's sweeper finishes the batch and releases the roots; it is killed
    # after its first publish, before acknowledging it. It consumes another queue: had
    # its pool started a root it just published, the kill would lose that body and its
    # recovery run it again as a new attempt (allowed, and not what this test is about)
    doomed = worker_factory("tests.proj", extra_args=FLOWS, ready_timeout=None,
                            queues=("elsewhere",),
                            env={"CELERY_FLOWS_FAULTS": "sent-before-ack=kill"})
    wait_until(lambda: not doomed.is_running(), "the worker to die while releasing",
               timeout=90)
    doomed.kill9()
    # killed mid-release: sent messages not acknowledged, the rest never claimed
    assert "scheduled" in handle.node_states().values()
    worker_factory("tests.proj", extra_args=FLOWS)
    assert handle.wait(timeout=240) is FlowState.SUCCEEDED
    assert handle.results() == {f"r{i}": i + 1 for i in range(roots)}
    counts = run_counts(redis_db, "wide")
    assert len(counts) == roots and set(counts.values()) == {1}
    assert not proj.flows.store.batch_ids()
