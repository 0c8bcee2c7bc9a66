"""The registry on a real Redis Cluster (masters, optionally with replicas, on loopback),
with real workers.

Every flow script touches one flow's hash tag, every scheduling script the {sched}
tag, the heartbeat the {workers} tag: nothing crosses a slot.  The clusters come from
``tests/redis_cluster.py``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from celery_flows import Flow, FlowState
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, ROOT, cli, run_counts, visible
from tests.redis_cluster import LocalCluster


def test_flows_run_on_redis_cluster(
    cluster: str, import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"FLOWS_TEST_REGISTRY": cluster, "FLOWS_TEST_REGISTRY_CLUSTER": "1",
           "FLOWS_TEST_RATE_LIMITS": json.dumps({"api": "20/s"}),
           "FLOWS_TEST_QUEUE_LIMITS": json.dumps({"single": 1})}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, env=env, queues=("celery", "single"))
    f = Flow("clustered")
    a = f.add(proj.add.s(1, 2), id="a")
    b = f.add(proj.mul.s(10), id="b", after=[a], queue="single")
    c = f.add(proj.add.s(5), id="c", after=[a], rate_limit="api")
    f.add(proj.tsum.s(), id="d", after=[b, c])
    f.add(proj.flaky.s(1), id="flaky")
    handles = [proj.flows.submit(f)]
    bulk = []
    for i in range(3):
        fb = Flow("bulk", id=f"cl-bulk-{i}")
        fb.add(proj.add.si(i, i), id="only")
        bulk.append(fb)
    handles += proj.flows.add_bulk(bulk)
    # a map on the cluster: its elements staged in the flow's slot, then expanded
    m = Flow("mapped")
    each = m.map(proj.double.s(), over=m.add(proj.numbers.s(30), id="src"), id="each")
    m.add(proj.tsum.s(), id="total", after=[each])
    mapped = proj.flows.submit(m)
    g = Flow("changed")
    hold = g.add(proj.wait_for_key.si("cl-go"), id="hold")
    g.add(proj.ident.si("x"), id="next", after=[hold])
    hg = proj.flows.submit(g)
    assert handles[0].wait(timeout=30) == FlowState.SUCCEEDED
    assert handles[0].results()["d"] == 38
    assert handles[0].inspect()["nodes"]["flaky"]["retries"] == 1
    proj.flows.pause(hg.id)
    redis_db.client.set("cl-go", 1)
    time.sleep(1)
    assert hg.state() == FlowState.PAUSED
    proj.flows.resume(hg.id)
    assert hg.wait(timeout=30) == FlowState.SUCCEEDED
    # the retry is the second run of "flaky"; every other body ran once
    assert run_counts(redis_db, handles[0].id) == {"a": 1, "b": 1, "c": 1, "d": 1, "flaky": 2}
    assert mapped.wait(timeout=30) == FlowState.SUCCEEDED
    assert mapped.results()["total"] == sum(2 * i for i in range(30))
    for i, h in enumerate(handles[1:]):
        assert h.wait(timeout=30) == FlowState.SUCCEEDED and h.results() == {"only": 2 * i}
    # each flow's own stream is on the flow's slot (every flow's: test_cluster_events)
    out = cli("events", handles[0].id, "--json", broker=redis_db.celery_url)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert (events[-1]["node"], events[-1]["state"]) == (None, "succeeded")
    finals = {e["node"]: e["state"] for e in events}
    assert finals == {None: "succeeded", "a": "succeeded", "b": "succeeded",
                      "c": "succeeded", "d": "succeeded", "flaky": "succeeded"}
    assert "retrying" in [e["state"] for e in events if e["node"] == "flaky"]


@pytest.fixture
def replicated() -> Iterator[LocalCluster]:
    # a short node timeout: the replica of a killed master is promoted within seconds
    local = LocalCluster(masters=3, replicas=1, node_timeout=1500).start()
    try:
        yield local
    finally:
        local.stop()


def test_master_killed_and_replica_promoted_mid_run_every_flow_finishes(
    replicated: LocalCluster, import_app: ImportApp, worker_factory: WorkerFactory,
    redis_db: RedisDB, monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"FLOWS_TEST_REGISTRY": replicated.url, "FLOWS_TEST_REGISTRY_CLUSTER": "1",
           "FLOWS_TEST_LEASE": "6"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proj = import_app("tests.proj")
    for _ in range(2):
        worker_factory("tests.proj", extra_args=FLOWS, env=env, concurrency=2)
    handles = []
    for i in range(30):
        f = Flow("failover", id=f"fo-{i}")
        a = f.add(proj.step.s(None, 0.2), id="a")
        b = f.add(proj.step.s(0.2), id="b", after=[a])
        f.add(proj.step.s(0.2), id="c", after=[b])
        handles.append(proj.flows.submit(f))
    wait_until(lambda: len(redis_db.client.lrange("runs", 0, -1)) >= 20,
               "the run to be under way", timeout=60)
    victim = replicated.master_ports[1]
    replicated.kill(victim)
    wait_until(lambda: replicated.master_of_slot_owner(victim) is not None,
               "the replica's promotion", timeout=60)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not all(h.state().terminal for h in handles):
        time.sleep(1)
    stuck = {h.id: h.inspect() for h in handles if not h.state().terminal}
    assert not stuck, json.dumps(stuck, indent=1, default=str)
    assert {h.state() for h in handles} == {FlowState.SUCCEEDED}
    for h in handles:
        assert h.results()["c"] == 3


# -- add_bulk: one batch, all or nothing, on a single Redis and on the cluster ----------

_PRODUCER = """
import sys
import tests.proj as proj
from celery_flows import Flow
batch = []
for i in range(5):
    f = Flow("batch", id=f"{sys.argv[1]}-{i}")
    f.add(proj.add.si(i, i), id="only")
    batch.append(f)
try:
    proj.flows.add_bulk(batch)
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
"""


def _registry_env(request: pytest.FixtureRequest, kind: str) -> dict[str, str]:
    if kind == "single":
        return {}
    return {"FLOWS_TEST_REGISTRY": request.getfixturevalue("cluster"),
            "FLOWS_TEST_REGISTRY_CLUSTER": "1"}


def _producer(prefix: str, faults: str, env: dict[str, str], broker: str
              ) -> subprocess.Popen[str]:
    import os
    import sys

    full = {**os.environ, **env, "FLOWS_TEST_BROKER": broker, "PYTHONPATH": str(ROOT),
            "CELERY_FLOWS_FAULTS": faults}
    return subprocess.Popen([sys.executable, "-c", _PRODUCER, prefix], env=full, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _listed(broker: str) -> str:
    out = cli("list", "--limit", "1000", broker=broker)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_add_bulk_producer_killed_before_commit_leaves_nothing(
    kind: str, request: pytest.FixtureRequest, import_app: ImportApp,
    worker_factory: WorkerFactory, redis_db: RedisDB, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery_flows.engine import batch

    env = _registry_env(request, kind)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, env=env)
    # killed after the third flow of five was stored (on a cluster: one by one; on a
    # single Redis: after the pipelined round trip), before the batch was committed
    producer = _producer("doomed", "bulk-created@3=kill", env, redis_db.celery_url)
    out, _ = producer.communicate(timeout=120)
    assert producer.returncode == -9, out
    fids = [f"doomed-{i}" for i in range(5)]
    store = proj.flows.store
    assert any(store.hidden_by(fid) for fid in fids)  # the kill came mid-batch
    # the --flows worker's sweeper gives the batch up after the grace period and
    # deletes its hidden flows; nothing of it is visible or runs meanwhile
    deadline = time.monotonic() + batch.GRACE + 90
    while store.batch_ids() or any(store.hidden_by(fid) for fid in fids):
        assert not any(visible(proj, fid) for fid in fids)
        assert time.monotonic() < deadline, "the sweeper did not give the batch up"
        time.sleep(1)
    time.sleep(3)
    assert not any(visible(proj, fid) for fid in fids)
    assert not any(fid in _listed(redis_db.celery_url) for fid in fids)
    assert not any(store.client.exists(*store.keys.flow(fid)) for fid in fids)
    assert not [r for r in redis_db.client.lrange("runs", 0, -1) if r.startswith(b"doomed-")]


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_add_bulk_producer_killed_after_commit_runs_the_whole_batch(
    kind: str, request: pytest.FixtureRequest, import_app: ImportApp,
    worker_factory: WorkerFactory, redis_db: RedisDB, monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = _registry_env(request, kind)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, env=env)
    # committed, then killed after un-hiding two of the five flows
    producer = _producer("kept", "bulk-unhidden@2=kill", env, redis_db.celery_url)
    out, _ = producer.communicate(timeout=120)
    assert producer.returncode == -9, out
    fids = [f"kept-{i}" for i in range(5)]
    # a committed batch is visible whole at once, before the sweeper finishes it
    assert all(visible(proj, fid) for fid in fids)
    for i, fid in enumerate(fids):
        handle = proj.flows.get(fid)
        assert handle.wait(timeout=120) == FlowState.SUCCEEDED
        assert handle.results() == {"only": 2 * i}
        assert run_counts(redis_db, fid) == {"only": 1}
    listed = _listed(redis_db.celery_url)
    assert all(fid in listed for fid in fids)
    # the sweeper finishes the batch (on a single Redis every root went out with its
    # flow's un-hiding, so the flows may all be done before it does)
    wait_until(lambda: not proj.flows.store.batch_ids(), "the sweeper to finish the batch",
               timeout=60)


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_add_bulk_clash_during_the_batch_leaves_nothing(
    kind: str, request: pytest.FixtureRequest, import_app: ImportApp,
    worker_factory: WorkerFactory, redis_db: RedisDB, monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = _registry_env(request, kind)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, env=env)
    store = proj.flows.store
    # the producer pauses after its checks, before storing anything: another client
    # creates one of its ids with another definition meanwhile
    producer = _producer("clash", "bulk-open=sleep:4", env, redis_db.celery_url)
    wait_until(lambda: store.batch_ids(), "the batch to open", timeout=60)
    other = Flow("other", id="clash-3")
    other.add(proj.ident.si("mine"), id="mine")
    mine = proj.flows.submit(other)
    out, _ = producer.communicate(timeout=120)
    assert producer.returncode == 3 and "FlowStateError" in out, out
    assert mine.wait(timeout=60) == FlowState.SUCCEEDED
    assert mine.results() == {"mine": "mine"}
    time.sleep(3)  # the worker ran for a while: nothing of the batch ran
    fids = [f"clash-{i}" for i in (0, 1, 2, 4)]
    assert not any(visible(proj, fid) for fid in fids)
    assert not any(store.client.exists(*store.keys.flow(fid)) for fid in fids)
    listed = _listed(redis_db.celery_url)
    assert "clash-3" in listed and not any(fid in listed for fid in fids)
    assert [r for r in redis_db.client.lrange("runs", 0, -1)
            if r.startswith(b"clash-")] == [b"clash-3|mine|1"]
    assert not store.batch_ids()
