"""Large transitions in bounded steps, with the process doing them killed half-way: a
completion that releases hundreds of dependents, fail_fast in a large flow, a retry of
a large flow. Each step is one small script; what one script leaves, the next claim does
(the completing worker's, the retrier's, or the sweeper's from the dirty marker), and
every reader sees the transition whole from its first step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from celery_flows import Flow, FlowState, NodeState
from celery_flows.define.records import LIST_FIELDS, SCALAR_DEFAULTS
from celery_flows.faults import ENV as FAULTS
from celery_flows.registry import scripts
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import BROKER_ENV, FLOWS, ROOT, run_counts

CHUNK = "5"  # a script settles at most 10 edges, a step reopens or cancels 5 nodes
SMALL = {"CELERY_FLOWS_CHUNK": CHUNK}
_RETRY = ("import sys\nimport tests.proj as p\n"
          "p.flows.retry(sys.argv[1])\nprint('retry returned')\n")


def _raw_states(proj: Any, fid: str) -> dict[str, str]:
    """The records as stored, without the readers' view of a transition in progress."""
    raw = proj.flows.store.client.hgetall(proj.flows.store.keys.nodes(fid))
    return {k.decode(): json.loads(v).get("state", "pending") for k, v in raw.items()}


def _meta(proj: Any, fid: str) -> dict[str, str]:
    return proj.flows.store.meta(fid) or {}


def _settled(proj: Any, fid: str) -> bool:
    meta = _meta(proj, fid)
    return not ({"settling", "cancel_cursor", "reopening", "reopen_set"} & set(meta))


def test_a_completion_releasing_hundreds_settles_them_in_steps_and_a_killed_worker_loses_none(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    # the worker recording the root dies right after the completion's first step: a solo
    # worker, so that no main process outlives its pool child and takes a step itself
    # (recovering the child it lost)
    worker_factory("tests.proj", concurrency=1, pool="solo",
                   env={**SMALL, FAULTS: "chore-step@1=kill"})
    f = Flow("wide-release")
    root = f.add(proj.ident.si(1), id="root")
    for i in range(300):
        f.add(proj.ident.s(), id=f"c{i}", after=[root])
    handle = proj.flows.submit(f)
    wait_until(lambda: _raw_states(proj, handle.id)["root"] == "succeeded",
               "the root to be recorded", timeout=30)
    wait_until(lambda: _meta(proj, handle.id).get("settling") == "1"
               and "root" in run_counts(redis_db, handle.id), "the first step", timeout=30)
    released = [n for n, s in _raw_states(proj, handle.id).items()
                if n != "root" and s != "pending"]
    # one script settled at most 10 edges (twice the chunk): the rest waits in the work list
    assert 0 < len(released) <= 10
    assert redis_db.client.llen(proj.flows.store.keys.work(handle.id)) > 0
    assert handle.state() == FlowState.RUNNING
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2, env=SMALL)
    assert handle.wait(timeout=120) == FlowState.SUCCEEDED
    counts = run_counts(redis_db, handle.id)
    assert all(counts[f"c{i}"] == 1 for i in range(300)), counts
    assert handle.results()["c299"] == 1
    meta = _meta(proj, handle.id)
    assert meta["done"] == meta["total"] == "301" and _settled(proj, handle.id)


def test_a_failure_skipping_hundreds_counts_every_skip_once(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2, env=SMALL)
    f = Flow("wide-skip")
    root = f.add(proj.boom.si(), id="root")
    for i in range(150):
        mid = f.add(proj.ident.s(), id=f"m{i}", after=[root])
        f.add(proj.ident.s(), id=f"g{i}", after=[mid])
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=120) == FlowState.FAILED
    states = _raw_states(proj, handle.id)
    assert states.pop("root") == "failed"
    assert set(states.values()) == {"skipped"}
    meta = _meta(proj, handle.id)
    assert meta["done"] == meta["total"] == "301" and meta["nfail"] == "1"
    wait_until(lambda: _settled(proj, handle.id), "the work list to empty", timeout=30)
    assert set(run_counts(redis_db, handle.id)) == {"root"}


def test_fail_fast_in_a_large_flow_stops_it_at_once_and_a_killed_worker_leaves_it_stopped(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    plain = worker_factory("tests.proj", concurrency=3,
                           env={**SMALL, FAULTS: "chore-step@2=kill"})
    f = Flow("big-fail-fast", fail_fast=True)
    hold = f.add(proj.wait_for_key.si("release-hold", 120), id="hold")
    # flaky fails once hold runs (the gate opens then): fail_fast finds hold running
    gate = f.add(proj.wait_for_key.si("open-gate", 120), id="gate")
    f.add(proj.fail_until.si("fixed"), id="flaky", after=[gate])
    for i in range(40):
        f.add(proj.ident.si(i), id=f"c{i}", after=[hold])
    handle = proj.flows.submit(f)
    wait_until(lambda: handle.node_states()["hold"] == NodeState.RUNNING, "hold to run",
               timeout=30)
    redis_db.client.set("open-gate", 1)
    wait_until(lambda: handle.state() == FlowState.FAILED, "fail_fast", timeout=30)
    # the failing node's worker was killed after two bounded steps of the cancel
    wait_until(lambda: "flaky" in run_counts(redis_db, handle.id), "flaky to run")
    raw = _raw_states(proj, handle.id)
    assert "pending" in raw.values(), "records are left for later steps"
    nodes = handle.inspect()["nodes"]
    assert (nodes["flaky"]["state"], nodes["gate"]["state"]) == ("failed", "succeeded")
    assert {n["state"] for k, n in nodes.items() if k not in ("flaky", "gate")} == \
        {"cancelled"}
    assert proj.flows.store.node(handle.id, "c3")["cancel_reason"] == "fail_fast"
    # the held body ends: its late outcome releases nothing
    redis_db.client.set("release-hold", 1)
    wait_until(lambda: "wait_for_key" in plain.log()
               and run_counts(redis_db, handle.id)["hold"] == 1, "hold to end", timeout=30)
    worker_factory("tests.proj", extra_args=FLOWS, env=SMALL)
    wait_until(lambda: _settled(proj, handle.id), "the sweeper to finish", timeout=60)
    raw = _raw_states(proj, handle.id)
    assert (raw.pop("flaky"), raw.pop("gate")) == ("failed", "succeeded")
    assert set(raw.values()) == {"cancelled"}
    assert not any(run_counts(redis_db, handle.id)[f"c{i}"] for i in range(40))
    meta = _meta(proj, handle.id)
    assert meta["done"] == meta["total"] == "43"
    # a retry runs the failed node and everything fail_fast cancelled
    redis_db.client.set("fixed", 1)
    report = proj.flows.retry(handle.id)
    assert len(report["reopened"]) == 42
    assert handle.wait(timeout=120) == FlowState.SUCCEEDED
    counts = run_counts(redis_db, handle.id)
    assert all(counts[f"c{i}"] == 1 for i in range(40)) and counts["hold"] == 2
    assert counts["gate"] == 1


def _failed_wide_flow(proj: Any, redis_db: RedisDB, width: int) -> Any:
    f = Flow("big-retry")
    for i in range(width):
        parent = f.add(proj.fail_until.si("fixed", i), id=f"p{i}")
        f.add(proj.ident.s(), id=f"k{i}", after=[parent])
    f.add(proj.ident.si("fine"), id="fine")
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=120) == FlowState.FAILED
    return handle


def _retry_killed_at(redis_db: RedisDB, fid: str, fault: str) -> None:
    env = {**os.environ, BROKER_ENV: redis_db.celery_url, FAULTS: fault,
           "PYTHONPATH": str(ROOT), **SMALL}
    done = subprocess.run([sys.executable, "-c", _RETRY, fid], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "retry returned" not in done.stdout


def test_a_large_retry_is_staged_hidden_then_reopened_in_steps_atomically(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proj = import_app("tests.proj")
    monkeypatch.setattr(scripts, "CHUNK", int(CHUNK))
    worker_factory("tests.proj", concurrency=2, env=SMALL)
    handle = _failed_wide_flow(proj, redis_db, 30)
    before = handle.inspect()["nodes"]
    assert {before[f"k{i}"]["state"] for i in range(30)} == {"skipped"}
    # killed once the nodes are staged, before the commit: nothing changed for anyone
    _retry_killed_at(redis_db, handle.id, "retry-staged=kill")
    assert handle.state() == FlowState.FAILED
    assert handle.inspect()["nodes"] == before
    preview = proj.flows.retry(handle.id, dry_run=True)
    assert sorted(preview["reopened"]) == sorted([f"p{i}" for i in range(30)]
                                                 + [f"k{i}" for i in range(30)])
    assert sorted(preview["released"]) == sorted(f"p{i}" for i in range(30))
    assert handle.state() == FlowState.FAILED
    redis_db.client.set("fixed", 1)
    # killed after the commit, two steps in: the retry is whole to every reader
    _retry_killed_at(redis_db, handle.id, "chore-step@2=kill")
    assert handle.state() == FlowState.RUNNING
    raw = _raw_states(proj, handle.id)
    assert "failed" in raw.values(), "records are left for later steps"
    seen = {n["state"] for k, n in handle.inspect()["nodes"].items() if k != "fine"}
    assert not seen & {"failed", "skipped"}, seen
    assert handle.node_states()["k7"].value != "skipped"
    # a change that needs every record refuses while the retry is being written
    refused = proj.flows.store.retry(handle.id, None, dry_run=True).reply
    assert refused.code == -5 and "retry of it is still being written" in refused.payload
    # the sweeper takes the dirty marker over and finishes the steps
    worker_factory("tests.proj", extra_args=FLOWS, env=SMALL)
    assert handle.wait(timeout=120) == FlowState.SUCCEEDED
    counts = run_counts(redis_db, handle.id)
    assert all(counts[f"p{i}"] == 2 and counts[f"k{i}"] == 1 for i in range(30)), counts
    assert counts["fine"] == 1
    assert handle.results()["k4"] == 4
    assert _settled(proj, handle.id)
    assert not redis_db.client.exists(proj.flows.store.keys.reopen(handle.id))


def test_a_large_retry_by_its_caller_reports_and_runs_each_failed_node_once_more(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proj = import_app("tests.proj")
    monkeypatch.setattr(scripts, "CHUNK", int(CHUNK))
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2, env=SMALL)
    handle = _failed_wide_flow(proj, redis_db, 12)
    redis_db.client.set("fixed", 1)
    report = proj.flows.retry(handle.id)
    assert len(report["reopened"]) == 24 and report["state"] == "running"
    assert _settled(proj, handle.id), "the retrier's claims did every step"
    assert handle.wait(timeout=120) == FlowState.SUCCEEDED
    counts = run_counts(redis_db, handle.id)
    assert all(counts[f"p{i}"] == 2 and counts[f"k{i}"] == 1 for i in range(12))
    with pytest.raises(Exception, match="finished as succeeded|nothing to retry"):
        proj.flows.retry(handle.id)


def test_records_written_back_by_transitions_stay_compact(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    """A record a transition writes back leaves out the fields at their default, as the
    submit stores it (define/records.py compact): about a third of its size whole, and
    what every later step of the node decodes."""
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    f = Flow("compact")
    a = f.add(proj.ident.si(1), id="a")
    f.add(proj.ident.s(), id="b", after=[a])
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    raw = redis_db.client.hgetall(proj.flows.store.keys.nodes(handle.id))
    for nid, blob in raw.items():
        rec = json.loads(blob)
        assert rec["state"] == "succeeded"
        # skip_reason, error, worker, lease, held... (null), removed, progress (empty),
        # retries (0), policy and fpol ("fail")
        at_default = {k for k, v in rec.items() if v is None or v == {}
                      or (k in LIST_FIELDS and v == [])
                      or SCALAR_DEFAULTS.get(k, object()) == v or k == "fpol"}
        assert not at_default, (nid, sorted(at_default))
    assert handle.results() == {"a": 1, "b": 1}
    assert proj.flows.store.node(handle.id, "b")["retries"] == 0


def test_an_acknowledgement_of_many_nodes_goes_in_bounded_scripts(
    import_app: ImportApp, redis_db: RedisDB, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker's acknowledgements wait up to 50 ms and go together (engine/acks.py);
    one published.lua call acknowledges at most ACK_STEP of them, so the script's cost
    stays bounded whatever the release, and the dirty marker goes with the last step."""
    from celery_flows.registry.ids import new_dirty_token, task_id_for
    from celery_flows.registry.replies import Published
    from celery_flows.registry.transitions import ACK_STEP

    proj = import_app("tests.proj")
    store = proj.flows.store
    f = Flow("many-acks")
    for i in range(120):
        f.add(proj.ident.si(i), id=f"n{i}")
    handle = proj.flows.submit(f)  # no worker: the roots stay queued
    nonce = _meta(proj, handle.id)["nonce"]
    items = [Published(f"n{i}", 1, "celery", task_id_for(handle.id, f"n{i}", 1, nonce), None)
             for i in range(120)]
    token = new_dirty_token(handle.id)
    client = redis_db.client
    client.zadd(store.keys.dispatch, {token: 1.0})
    sizes: list[int] = []
    queue = store._queue

    def counting(pipe: Any, name: str, fid: str, args: Any, *rest: Any, **kw: Any) -> None:
        if name == "published":
            sizes.append((len(args) - 1 - int(args[0])) // 6)
        queue(pipe, name, fid, args, *rest, **kw)

    monkeypatch.setattr(store, "_queue", counting)
    store.published_many([(handle.id, items, [token])])
    assert ACK_STEP < 120
    assert sum(sizes) == 120 and max(sizes) <= ACK_STEP and len(sizes) == -(-120 // ACK_STEP)
    assert client.zscore(store.keys.dispatch, token) is None
    assert set(_raw_states(proj, handle.id).values()) == {"queued"}
