"""Large flows in bounded steps: fan-in counters outside the records, and a cancel that
makes the flow cancelled at once and writes its nodes a chunk per call (the caller
continues, the sweeper of a --flows worker finishes when the caller died)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from celery_flows import Flow, FlowState, NodeState
from celery_flows.faults import ENV as FAULTS
from celery_flows.registry import scripts
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import BROKER_ENV, FLOWS, ROOT, run_counts

CHUNK = "5"
_CANCEL = ("import sys\nimport tests.proj as p\n"
           "p.flows.cancel(sys.argv[1])\nprint('cancel returned')\n")


def _raw_states(proj: Any, fid: str) -> dict[str, str]:
    """The records as stored (readers show a cancelled flow's nodes cancelled at once)."""
    raw = proj.flows.store.client.hgetall(proj.flows.store.keys.nodes(fid))
    # a compact record leaves out a state at its default (define/records.py)
    return {k.decode(): json.loads(v).get("state", "pending") for k, v in raw.items()}


def _big_flow(proj: Any, width: int) -> Flow:
    """A running node holding ``width`` dependents, and ``width`` more behind another."""
    f = Flow("big")
    hold = f.add(proj.wait_for_key.si("release-hold"), id="hold")
    later = f.add(proj.wait_for_key.si("release-later"), id="later")
    for i in range(width):
        f.add(proj.ident.s(), id=f"child{i}", after=[hold])
        f.add(proj.ident.si(i), id=f"other{i}", after=[later])
    return f


def _wait_running(handle: Any, *nids: str) -> None:
    wait_until(lambda: all(handle.store.node(handle.id, n)["state"] == NodeState.RUNNING.value
                           for n in nids), "the holding nodes to run", timeout=30)


def _all_cancelled(handle: Any) -> None:
    nodes = handle.inspect()["nodes"]
    assert {n["state"] for n in nodes.values()} == {"cancelled"}, nodes
    assert {s.value for s in handle.node_states().values()} == {"cancelled"}


def test_fan_in_counts_outside_the_record_and_gets_the_ordered_list(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=4)
    f = Flow("fan-in")
    deps = [f.add(proj.ident.si(i), id=f"d{i}").id for i in range(60)]
    f.add(proj.ident.s(), id="sink", after=list(reversed(deps)))
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=120) == FlowState.SUCCEEDED
    assert handle.results()["sink"] == list(reversed(range(60)))
    assert run_counts(redis_db, handle.id)["sink"] == 1
    # the sink's record is not rewritten per completion: its counter lives elsewhere
    assert "waiting" not in proj.flows.store.node(handle.id, "sink")


def test_chunked_cancel_reports_everything_and_runs_nothing_after(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proj = import_app("tests.proj")
    monkeypatch.setattr(scripts, "CHUNK", int(CHUNK))
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=3)
    handle = proj.flows.submit(_big_flow(proj, 30))
    _wait_running(handle, "hold", "later")
    preview = proj.flows.cancel(handle.id, dry_run=True)
    assert len(set(preview["cancelled"])) == 62
    assert handle.state() == FlowState.RUNNING, "a dry run changes nothing"
    report = proj.flows.cancel(handle.id, terminate=True)
    assert sorted(set(report["cancelled"])) == sorted(handle.node_states())
    assert len(report["terminated"]) == 2
    assert handle.state() == FlowState.CANCELLED
    assert set(_raw_states(proj, handle.id).values()) == {"cancelled"}
    _all_cancelled(handle)
    meta = proj.flows.store.meta(handle.id) or {}
    assert meta["done"] == meta["total"] and "cancel_cursor" not in meta
    redis_db.client.set("release-hold", 1)
    redis_db.client.set("release-later", 1)
    assert not redis_db.client.zcard(proj.flows.store.keys.cancelling)
    counts = run_counts(redis_db, handle.id)
    assert not any(counts[n] for n in handle.node_states() if n not in ("hold", "later"))


def test_producer_killed_mid_chunked_cancel_the_sweeper_finishes(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    plain = worker_factory("tests.proj", concurrency=3)
    handle = proj.flows.submit(_big_flow(proj, 30))
    _wait_running(handle, "hold", "later")
    env = {**os.environ, BROKER_ENV: redis_db.celery_url, FAULTS: "cancel-step@2=kill",
           "CELERY_FLOWS_CHUNK": CHUNK, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _CANCEL, handle.id], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "cancel returned" not in done.stdout
    # killed after two bounded steps: records remain to write, yet no reader sees them
    assert set(_raw_states(proj, handle.id).values()) != {"cancelled"}
    assert handle.state() == FlowState.CANCELLED
    _all_cancelled(handle)
    # the holding bodies finish now: their completions change nothing, release nothing
    redis_db.client.set("release-hold", 1)
    redis_db.client.set("release-later", 1)
    wait_until(lambda: "wait_for_key" in plain.log() and run_counts(redis_db, handle.id)
               ["hold"] == 1, "the held bodies to end", timeout=30)
    _all_cancelled(handle)
    worker_factory("tests.proj", extra_args=FLOWS,
                   env={"CELERY_FLOWS_CHUNK": CHUNK})
    # its last step writes the last records, then a second call drops the flow from the
    # cancelling index: wait for both
    wait_until(lambda: set(_raw_states(proj, handle.id).values()) == {"cancelled"}
               and not redis_db.client.zcard(proj.flows.store.keys.cancelling),
               "the sweeper to finish the cancel", timeout=60)
    meta = proj.flows.store.meta(handle.id) or {}
    assert meta["done"] == meta["total"] and "cancel_cursor" not in meta
    counts = run_counts(redis_db, handle.id)
    assert not any(counts[n] for n in handle.node_states() if n not in ("hold", "later"))
