"""The core engine end to end: real redis-server, real prefork workers in subprocesses."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from celery_flows import Flow, FlowState, NodeState
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, cli, run_counts


def diamond(proj: Any, fid: str | None = None) -> Flow:
    f = Flow("diamond", id=fid)
    a = f.add(proj.add.s(1, 2), id="a")
    b = f.add(proj.mul.s(10), id="b", after=[a])
    c = f.add(proj.add.s(5), id="c", after=[a])
    f.add(proj.tsum.s(), id="d", after=[b, c])
    return f


def test_diamond_runs_each_node_once_with_results_passed(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    handle = proj.flows.submit(diamond(proj))
    assert handle.wait(timeout=30) == FlowState.SUCCEEDED
    assert handle.results() == {"a": 3, "b": 30, "c": 8, "d": 38}
    assert set(handle.node_states().values()) == {NodeState.SUCCEEDED}
    assert run_counts(redis_db, handle.id) == {"a": 1, "b": 1, "c": 1, "d": 1}


def test_wide_fan_out_fan_in_on_two_workers_runs_every_body_exactly_once(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    f = Flow("fan")
    root = f.add(proj.ident.s(1), id="root")
    leaves = [f.add(proj.add.s(i), id=f"leaf-{i}", after=[root]) for i in range(300)]
    f.add(proj.tsum.s(), id="sink", after=leaves)
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=120) == FlowState.SUCCEEDED
    results = handle.results()
    assert results["sink"] == sum(1 + i for i in range(300))
    assert all(results[f"leaf-{i}"] == 1 + i for i in range(300))
    counts = run_counts(redis_db, handle.id)
    assert len(counts) == 302
    assert set(counts.values()) == {1}


def test_acks_late_redelivery_does_not_run_the_body_again(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A visibility timeout shorter than the task makes the Redis transport redeliver the
    # message while the first delivery is still running (CELERY_NOTES trap 5).
    env = {"FLOWS_TEST_ACKS_LATE": "1", "FLOWS_TEST_VISIBILITY": "1",
           "FLOWS_TEST_RESTORE_INTERVAL": "0.1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proj = import_app("tests.proj")
    w1 = worker_factory("tests.proj", extra_args=FLOWS, env=env, concurrency=2)
    f = Flow("slow")
    s = f.add(proj.sleepy.s(6, "done"), id="slow")
    f.add(proj.ident.s(), id="after", after=[s])
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=40) == FlowState.SUCCEEDED
    assert handle.results() == {"slow": "done", "after": "done"}
    w1.wait_for_log(r"not running .*~slow~1~.* \(duplicate delivery", timeout=5)
    assert run_counts(redis_db, handle.id) == {"slow": 1, "after": 1}


def test_duplicate_and_superseded_messages_are_acked_without_running(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    w = worker_factory("tests.proj", extra_args=FLOWS)
    handle = proj.flows.submit(diamond(proj))
    assert handle.wait(timeout=30) == FlowState.SUCCEEDED
    doc = handle.inspect()
    task_id = doc["nodes"]["b"]["task_ids"][0]
    # the same attempt published again (a crash after publishing), and a message of
    # an attempt that never became current
    proj.app.send_task("tests.proj.mul", args=[3, 10], task_id=task_id)
    stale = task_id.replace("~b~1~", "~b~7~")
    proj.app.send_task("tests.proj.mul", args=[3, 10], task_id=stale)
    w.wait_for_log(r"not running .*~b~1~", timeout=15)
    w.wait_for_log(r"not running .*~b~7~", timeout=15)
    assert run_counts(redis_db, handle.id)["b"] == 1
    assert handle.results()["b"] == 30


def test_plain_tasks_queues_context_and_current_flow(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, queues=("celery", "other", "io"))
    f = Flow("misc", context={"tenant": "acme"})
    a = f.add(proj.plain_add.s(2, 3), id="plain")
    b = f.add(proj.on_other.s(), id="other", after=[a])
    c = f.add(proj.ident.s(), id="io", after=[a], queue="io", priority=3)
    d = f.add(proj.ctx_value.si("tenant"), id="ctx", after=[b, c])
    f.add(proj.deps.si(), id="deps", after=[b, c, d])
    f.add(proj.ident.si(9).set(queue="io", time_limit=30), id="sig-opts")
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=30) == FlowState.SUCCEEDED
    results = handle.results()
    assert results == {"plain": 5, "other": 5, "io": 5, "ctx": "acme",
                       "deps": {"other": 5, "io": 5, "ctx": "acme"}, "sig-opts": 9}
    nodes = handle.inspect()["nodes"]
    assert nodes["other"]["queue"] == "other"
    assert nodes["io"]["queue"] == "io"
    assert nodes["plain"]["queue"] == "celery"
    assert nodes["sig-opts"]["queue"] == "io"
    assert run_counts(redis_db, handle.id)["plain"] == 1


def test_failure_skips_dependents_and_fails_the_flow(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f = Flow("failing")
    a = f.add(proj.boom.s("bad input"), id="a")
    b = f.add(proj.ident.s(), id="b", after=[a])
    f.add(proj.ident.s(), id="c", after=[b])
    f.add(proj.add.s(1, 1), id="independent")
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=30) == FlowState.FAILED
    states = handle.node_states()
    assert states == {"a": NodeState.FAILED, "b": NodeState.SKIPPED,
                      "c": NodeState.SKIPPED, "independent": NodeState.SUCCEEDED}
    nodes = handle.inspect()["nodes"]
    assert nodes["a"]["error"] == "ValueError: bad input"
    assert nodes["b"]["skip_reason"] == "upstream_failed"
    assert run_counts(redis_db, handle.id) == {"a": 1, "independent": 1}


def test_result_size_limit_and_unserialisable_result_fail_the_node(
    import_app: ImportApp, worker_factory: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    proj = import_app("tests.proj")
    proj.app.conf.flows_max_result_bytes = 1000
    env = {"FLOWS_TEST_MAX_RESULT": "1000"}
    worker_factory("tests.proj", extra_args=FLOWS, env=env)
    f = Flow("limits")
    f.add(proj.big.s(10), id="small")
    f.add(proj.big.s(5000), id="large")
    f.add(proj.unserialisable.s(), id="weird")
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=30) == FlowState.FAILED
    nodes = handle.inspect()["nodes"]
    assert nodes["small"]["state"] == "succeeded"
    assert nodes["large"]["state"] == "failed"
    assert "flows_max_result_bytes=1000" in nodes["large"]["error"]
    assert nodes["weird"]["state"] == "failed"
    assert "EncodeError" in nodes["weird"]["error"]


def test_sub_flows_and_trees(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    sub = Flow("sub", context={"tenant": "inner"})
    x = sub.add(proj.mul.s(2), id="double")
    sub.add(proj.add.s(1), id="inc", after=[x])
    sub.add(proj.ctx_value.si("tenant"), id="ctx")
    f = Flow("outer", context={"tenant": "outer", "other": 1})
    start = f.add(proj.ident.s(5), id="start")
    s = f.add(sub, id="sub", after=[start])
    f.add(proj.ident.s(), id="end", after=[s])
    f.add(proj.tsum.s(), id="tree", children=[proj.ident.s(1), proj.ident.s(2),
                                              proj.ident.s(3)])
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=30) == FlowState.SUCCEEDED
    results = handle.results()
    assert results["sub:double"] == 10
    assert results["sub:inc"] == 11
    assert results["sub:ctx"] == "inner"
    assert results["end"] == {"inc": 11, "ctx": "inner"}
    assert results["tree"] == 6
    assert {"ident", "ident-2", "ident-3"} <= set(results)


def test_idempotent_submit_and_conflicting_redefinition(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    from celery_flows import FlowStateError

    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    h1 = proj.flows.submit(diamond(proj, fid="nightly-1"))
    h2 = proj.flows.submit(diamond(proj, fid="nightly-1"))
    assert h1.id == h2.id == "nightly-1"
    assert h1.wait(timeout=30) == FlowState.SUCCEEDED
    assert run_counts(redis_db, "nightly-1") == {"a": 1, "b": 1, "c": 1, "d": 1}
    other = Flow("diamond", id="nightly-1")
    other.add(proj.add.s(1, 2), id="a")
    with pytest.raises(FlowStateError, match="different definition"):
        proj.flows.submit(other)


def test_add_bulk_creates_all_or_nothing(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    from celery_flows import FlowDefinitionError, FlowStateError

    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    handles = proj.flows.add_bulk([diamond(proj, fid=f"bulk-{i}") for i in range(5)])
    assert [h.wait(timeout=30) for h in handles] == [FlowState.SUCCEEDED] * 5
    # Celery stores a node's result in its backend just after the success is recorded
    wait_until(lambda: len(redis_db.client.keys("celery-task-meta-*")) == 5 * 4,
               "the result backend's writes of the 20 nodes")

    def keys() -> set[bytes]:
        # the dispatch index empties and vanishes as releases finish: not flow state
        return set(redis_db.client.keys("*")) - {proj.flows.store.keys.dispatch.encode()}

    before = keys()
    index_before = redis_db.client.zrange(proj.flows.store.keys.index, 0, -1)
    clash = Flow("clash", id="bulk-2")
    clash.add(proj.add.s(0, 0))
    with pytest.raises(FlowStateError):
        proj.flows.add_bulk([diamond(proj, fid="bulk-new"), clash])
    bad = Flow("bad")
    bad.add(proj.add.s(1, 1), id="x", after=["missing"])
    with pytest.raises(FlowDefinitionError):
        proj.flows.add_bulk([diamond(proj, fid="bulk-new-2"), bad])
    assert redis_db.client.exists(*proj.flows.store.keys.flow("bulk-new")) == 0
    assert redis_db.client.exists(*proj.flows.store.keys.flow("bulk-new-2")) == 0
    assert keys() == before
    assert redis_db.client.zrange(proj.flows.store.keys.index, 0, -1) == index_before


def test_inspect_cli_text_and_json(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    f = Flow("inspected")
    a = f.add(proj.add.s(1, 2), id="a")
    f.add(proj.boom.si(), id="b", after=[a])
    f.add(proj.ident.s(), id="c", after=["b"])
    handle = proj.flows.submit(f)
    # before any worker runs: a is queued and says where it waits
    out = cli("inspect", handle.id, "--json", broker=redis_db.celery_url)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["nodes"]["a"]["state"] == "queued"
    assert "celery" in doc["nodes"]["a"]["waiting_for"]
    [queued_id] = doc["nodes"]["a"]["task_ids"]  # known before any worker starts it
    assert queued_id.startswith(f"{handle.id}~a~1~")
    assert doc["nodes"]["b"]["waiting_for"] == "dependencies: a"
    worker_factory("tests.proj", extra_args=FLOWS)
    handle.wait(timeout=30)
    out = cli("inspect", handle.id, "--json", broker=redis_db.celery_url)
    doc = json.loads(out.stdout)
    assert doc["id"] == handle.id and doc["name"] == "inspected" and doc["state"] == "failed"
    keys = {"state", "after", "queue", "attempts", "recoveries", "retries", "task_ids",
            "queued_at", "started_at", "finished_at", "error", "progress", "waiting_for"}
    for node in doc["nodes"].values():
        assert keys <= set(node)
    a_doc = doc["nodes"]["a"]
    assert a_doc["queued_at"] <= a_doc["started_at"] <= a_doc["finished_at"] <= time.time() + 5
    assert doc["nodes"]["b"]["error"] == "ValueError: boom"
    text = cli("inspect", handle.id, broker=redis_db.celery_url)
    assert text.returncode == 0
    for nid, state in (("a", "succeeded"), ("b", "failed"), ("c", "skipped")):
        assert any(nid in line and state in line for line in text.stdout.splitlines())
    missing = cli("inspect", "no-such-flow", broker=redis_db.celery_url)
    assert missing.returncode == 1
    assert "no-such-flow" in missing.stderr
    usage = cli("inspect", broker=redis_db.celery_url)
    assert usage.returncode == 2
