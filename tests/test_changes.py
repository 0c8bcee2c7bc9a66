"""Failure policies, trigger rules and changes to running flows (SPEC sections 5 and 6)."""

from __future__ import annotations

import itertools
import json
import random
import time
from typing import Any

import pytest

from celery_flows import (
    Flow,
    FlowNotFoundError,
    FlowState,
    FlowStateError,
    NodeState,
)
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, cli, run_counts

RULES = ("all_success", "all_done", "all_failed", "one_success", "one_failed", "none_failed")
EDGE_SETS: list[tuple[str, ...]] = [
    (), ("ok",), ("failed",), ("skipped",), ("removed",), ("ok", "ok"), ("failed", "failed"),
    ("ok", "failed"), ("ok", "skipped"), ("failed", "skipped"), ("ok", "removed"),
    ("failed", "removed"), ("skipped", "removed"), ("removed", "removed"),
]


def spec_rule(rule: str, edges: tuple[str, ...]) -> bool:
    """SPEC section 5's table, literally."""
    kinds = [e for e in edges if e != "removed"]
    if not kinds:
        return rule not in ("one_success", "one_failed")
    return {
        "all_success": all(k == "ok" for k in kinds),
        "all_done": True,
        "all_failed": all(k == "failed" for k in kinds),
        "one_success": any(k == "ok" for k in kinds),
        "one_failed": any(k == "failed" for k in kinds),
        "none_failed": not any(k == "failed" for k in kinds),
    }[rule]


def add_edge(f: Flow, proj: Any, kind: str, prefix: str) -> str:
    """A dependency that ends with an edge of ``kind`` to its dependents."""
    if kind == "ok":
        return f.add(proj.add.si(1, 1), id=f"{prefix}-ok").id
    if kind == "failed":
        return f.add(proj.boom.si(), id=f"{prefix}-failed").id
    if kind == "removed":
        return f.add(proj.boom.si(), id=f"{prefix}-removed", failure_policy="remove").id
    # skipped by its own trigger rule (not upstream_failed): one_failed over a success
    up = f.add(proj.add.si(1, 1), id=f"{prefix}-up")
    return f.add(proj.ident.si(1), id=f"{prefix}-skipped", after=[up],
                 trigger_rule="one_failed").id


def rule_table_flow(proj: Any, rules: tuple[str, ...] = RULES,
                    edge_sets: list[tuple[str, ...]] = EDGE_SETS) -> tuple[Flow, dict[str, bool]]:
    f = Flow("rules")
    expected: dict[str, bool] = {}
    for rule, edges in itertools.product(rules, edge_sets):
        case = f"{rule}.{'-'.join(edges) or 'none'}"
        deps = [add_edge(f, proj, kind, f"{case}.{i}") for i, kind in enumerate(edges)]
        f.add(proj.ident.si(case), id=case, after=deps, trigger_rule=rule)
        expected[case] = spec_rule(rule, edges)
    return f, expected


def check_rule_table(handle: Any, expected: dict[str, bool]) -> None:
    nodes = handle.inspect()["nodes"]
    for case, runs in expected.items():
        node = nodes[case]
        if runs:
            assert node["state"] == "succeeded", (case, node)
        else:
            assert node["state"] == "skipped", (case, node)
            failed_edge = "failed" in case.split(".", 1)[1].split("-")
            want = "upstream_failed" if failed_edge else "trigger_rule"
            assert node["skip_reason"] == want, (case, node)
    # some node failed under "fail": the flow ends failed, all nodes terminal
    assert handle.state() == FlowState.FAILED


def test_every_trigger_rule_against_every_edge_kind(import_app: ImportApp) -> None:
    proj = import_app("tests.proj")
    proj.app.conf.task_always_eager = True
    f, expected = rule_table_flow(proj)
    handle = proj.flows.submit(f)
    check_rule_table(handle, expected)


def test_trigger_rules_on_real_workers(
    import_app: ImportApp, worker_factory: WorkerFactory
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    f, expected = rule_table_flow(
        proj, rules=("all_success", "all_failed", "one_success", "none_failed"),
        edge_sets=[(), ("ok", "failed"), ("skipped",), ("failed", "removed")],
    )
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.FAILED
    check_rule_table(handle, expected)


def test_policies_and_flow_state_precedence(import_app: ImportApp) -> None:
    proj = import_app("tests.proj")
    proj.app.conf.task_always_eager = True
    # only "ignore" and "remove" failures: the flow succeeds
    f = Flow("tolerant")
    ign = f.add(proj.boom.si("ignored"), id="ign", failure_policy="ignore")
    rem = f.add(proj.boom.si("removed"), id="rem", failure_policy="remove")
    ok = f.add(proj.add.si(1, 2), id="ok")
    f.add(proj.collect.s(), id="sees", after=[ign, rem, ok])
    f.add(proj.deps.si(), id="deps", after=[ign, ok])
    handle = proj.flows.submit(f)
    assert handle.state() == FlowState.SUCCEEDED
    results = handle.results()
    # ignored failure -> None in its slot; removed dependency dropped from the list
    assert results["sees"] == [[None, 3]]
    assert results["deps"] == {"ok": 3}
    # a handler that runs after a "fail" failure does not make the flow succeed
    g = Flow("handled")
    bad = g.add(proj.boom.si(), id="bad")
    g.add(proj.add.si(0, 0), id="handler", after=[bad], trigger_rule="one_failed")
    h2 = proj.flows.submit(g)
    assert h2.node_states()["handler"] == NodeState.SUCCEEDED
    assert h2.state() == FlowState.FAILED


def test_failures_visible_to_nodes_that_run_past_them(
    import_app: ImportApp, worker_factory: WorkerFactory
) -> None:
    proj = import_app("tests.proj")
    proj.app.conf.task_always_eager = True
    f = Flow("past")
    a = f.add(proj.boom.si("it broke"), id="a", failure_policy="ignore")
    f.add(proj.reads_failures.si(), id="b", after=[a])
    handle = proj.flows.submit(f)
    assert handle.results()["b"] == {"a": "ValueError: it broke"}


def test_fail_fast_cancels_the_rest_and_the_flow_fails(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    f = Flow("fast", fail_fast=True)
    slow = f.add(proj.cooperative.si(20), id="slow")
    f.add(proj.ident.s(), id="after-slow", after=[slow])
    # "bad" fails only once "slow" runs: otherwise fail_fast may cancel "slow" before
    # its body starts, and nothing would be there to see the cancel
    gate = f.add(proj.wait_for_key.si("slow-is-running"), id="gate")
    f.add(proj.boom.si(), id="bad", after=[gate])
    handle = proj.flows.submit(f)
    _wait_state(handle, "slow", NodeState.RUNNING)
    redis_db.client.set("slow-is-running", 1)
    assert handle.wait(timeout=30) == FlowState.FAILED
    states = handle.node_states()
    assert states["bad"] == NodeState.FAILED
    assert states["slow"] == NodeState.CANCELLED
    assert states["after-slow"] == NodeState.CANCELLED
    # the running body saw it and stopped early
    deadline = time.monotonic() + 10
    while not redis_db.client.lrange("saw_cancel", 0, -1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_db.client.lrange("saw_cancel", 0, -1) == [b"slow"]
    assert run_counts(redis_db, handle.id)["after-slow"] == 0


def test_cancel_stops_downstream_even_of_running_nodes(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    f = Flow("to-cancel")
    hold = f.add(proj.wait_for_key.si("release-hold"), id="hold")
    f.add(proj.ident.s(), id="next", after=[hold])
    f.add(proj.ident.s(), id="queued-one", after=[f.add(proj.sleepy.si(0.5, 1), id="x")])
    handle = proj.flows.submit(f)
    _wait_state(handle, "hold", NodeState.RUNNING)
    preview = proj.flows.cancel(handle.id, dry_run=True)
    assert set(preview["cancelled"]) >= {"hold", "next"}
    assert handle.state() == FlowState.RUNNING, "a dry run changes nothing"
    report = proj.flows.cancel(handle.id)
    assert handle.state() == FlowState.CANCELLED
    assert "hold" in report["cancelled"] and "next" in report["cancelled"]
    redis_db.client.set("release-hold", 1)
    time.sleep(1.5)  # the running body finishes: its late success changes nothing
    nodes = handle.inspect()["nodes"]
    assert nodes["hold"]["state"] == "cancelled"
    late = [h for h in proj.flows.store.node(handle.id, "hold")["history"] if h.get("late")]
    assert [h["outcome"] for h in late] == ["succeeded"]
    counts = run_counts(redis_db, handle.id)
    assert counts["next"] == 0 and counts["queued-one"] == 0
    with pytest.raises(FlowStateError, match="already finished"):
        proj.flows.cancel(handle.id)


def test_cancel_with_terminate_revokes_the_running_task_once(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    w = worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    f = Flow("terminate")
    f.add(proj.sleepy.si(30), id="long")
    handle = proj.flows.submit(f)
    _wait_state(handle, "long", NodeState.RUNNING)
    report = proj.flows.cancel(handle.id, terminate=True)
    assert len(report["terminated"]) == 1
    w.wait_for_log(r"Terminating .*~long~1~", timeout=15)
    time.sleep(1)
    rec = proj.flows.store.node(handle.id, "long")
    assert rec["state"] == "cancelled"
    late = [h for h in rec["history"] if h.get("late")]
    assert len(late) == 1 and "TaskRevokedError" in late[0]["error"]


def test_retry_reruns_only_failed_and_blocked_nodes(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    f = Flow("retryable")
    a = f.add(proj.add.si(1, 1), id="a")
    b = f.add(proj.fail_until.si("fixed", "b-ok"), id="b", after=[a])
    f.add(proj.ident.s(), id="c", after=[b])
    f.add(proj.add.si(2, 2), id="d", after=[a])
    f.add(proj.ident.si("handler"), id="handler", after=[b], trigger_rule="all_done")
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=30) == FlowState.FAILED
    assert handle.node_states()["c"] == NodeState.SKIPPED
    with pytest.raises(FlowStateError):
        proj.flows.resume(handle.id)
    preview = proj.flows.retry(handle.id, dry_run=True)
    assert set(preview["reopened"]) == {"b", "c"} and preview["released"] == ["b"]
    assert handle.state() == FlowState.FAILED
    redis_db.client.set("fixed", 1)
    proj.flows.retry(handle.id)
    assert handle.wait(timeout=30) == FlowState.SUCCEEDED
    assert handle.results()["c"] == "b-ok"
    counts = run_counts(redis_db, handle.id)
    assert counts == {"a": 1, "b": 2, "c": 1, "d": 1, "handler": 1}
    nodes = handle.inspect()["nodes"]
    assert nodes["b"]["attempts"] == 2 and len(nodes["b"]["task_ids"]) == 2
    with pytest.raises(FlowStateError, match="finished"):
        proj.flows.pause(handle.id)


def test_ignore_failure_reopens_a_failed_flow(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f = Flow("ignorable")
    a = f.add(proj.boom.si(), id="a")
    b = f.add(proj.ident.si("b"), id="b", after=[a])
    f.add(proj.ident.si("c"), id="c", after=[b])
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=30) == FlowState.FAILED
    with pytest.raises(FlowStateError, match="not failed"):
        proj.flows.ignore_failure(handle.id, "b")
    proj.flows.ignore_failure(handle.id, "a")
    assert handle.wait(timeout=30) == FlowState.SUCCEEDED
    assert handle.results() == {"b": "b", "c": "c"}


def test_pause_holds_ready_nodes_and_resume_releases_them(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f = Flow("pausable")
    hold = f.add(proj.wait_for_key.si("go"), id="hold")
    f.add(proj.ident.s(), id="next", after=[hold])
    handle = proj.flows.submit(f)
    _wait_state(handle, "hold", NodeState.RUNNING)
    proj.flows.pause(handle.id)
    assert handle.state() == FlowState.PAUSED
    with pytest.raises(FlowStateError, match="already paused"):
        proj.flows.pause(handle.id)
    redis_db.client.set("go", 1)
    _wait_state(handle, "hold", NodeState.SUCCEEDED)
    time.sleep(1.5)
    assert handle.node_states()["next"] == NodeState.SCHEDULED
    assert run_counts(redis_db, handle.id)["next"] == 0
    doc = handle.inspect()
    assert "paused" in doc["nodes"]["next"]["waiting_for"]
    assert proj.flows.resume(handle.id, dry_run=True)["released"] == ["next"]
    assert handle.state() == FlowState.PAUSED
    proj.flows.resume(handle.id)
    assert handle.wait(timeout=30) == FlowState.SUCCEEDED
    assert handle.results()["next"] == "go"


def test_add_node_remove_dependency_and_illegal_changes(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f = Flow("editable")
    hold = f.add(proj.wait_for_key.si("edit-go"), id="hold")
    other = f.add(proj.ident.si(7), id="other")
    f.add(proj.ident.si("joined"), id="join", after=[hold, other])
    handle = proj.flows.submit(f)
    _wait_state(handle, "other", NodeState.SUCCEEDED)
    # illegal changes raise and change nothing
    with pytest.raises(FlowStateError, match="does not depend"):
        proj.flows.remove_dependency(handle.id, "join", "join")
    with pytest.raises(FlowStateError, match="no node"):
        proj.flows.remove_dependency(handle.id, "join", "ghost")
    with pytest.raises(FlowStateError, match="is succeeded"):
        proj.flows.ignore_failure(handle.id, "other")
    with pytest.raises(FlowNotFoundError):
        proj.flows.pause("ghost-flow")
    # a new node after a finished one runs at once, with its result
    report = proj.flows.add_node(handle.id, proj.add.s(1), after=["other"], node_id="extra")
    assert report["released"] == ["extra"]
    with pytest.raises(FlowStateError, match="already used"):
        proj.flows.add_node(handle.id, proj.add.s(1), after=["other"], node_id="extra")
    # the join no longer waits for the held node
    preview = proj.flows.remove_dependency(handle.id, "join", "hold", dry_run=True)
    assert preview["released"] == ["join"]
    assert handle.node_states()["join"] == NodeState.PENDING
    proj.flows.remove_dependency(handle.id, "join", "hold")
    _wait_state(handle, "join", NodeState.SUCCEEDED)
    redis_db.client.set("edit-go", 1)
    assert handle.wait(timeout=30) == FlowState.SUCCEEDED
    assert handle.results()["extra"] == 8
    assert set(run_counts(redis_db, handle.id).values()) == {1}


def test_concurrent_changes_and_completions_stay_consistent(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    """remove_dependency / add_node racing the dependency's completion: every node runs
    exactly once and no flow is left unfinished."""
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    rng = random.Random(7)
    handles = []
    for i in range(40):
        f = Flow("race", id=f"race-{i}")
        dep = f.add(proj.sleepy.si(rng.choice([0, 0.01, 0.03, 0.05]), i), id="dep")
        f.add(proj.ident.si(i), id="child", after=[dep])
        handles.append(proj.flows.submit(f))
        time.sleep(rng.random() * 0.05)
        for action in rng.sample(["remove", "add"], 2):
            try:
                if action == "remove":
                    proj.flows.remove_dependency(f"race-{i}", "child", "dep")
                else:
                    proj.flows.add_node(f"race-{i}", proj.ident.s(), after=["dep"],
                                        node_id="late")
            except FlowStateError:
                pass  # the dependency finished first: a legal refusal
    for h in handles:
        assert h.wait(timeout=60) == FlowState.SUCCEEDED, h.inspect()
        counts = run_counts(redis_db, h.id)
        assert set(counts.values()) == {1}, (h.id, counts)
        assert set(h.node_states()) <= {"dep", "child", "late"}
        assert len(counts) == len(h.node_states())


def test_cli_changes(import_app: ImportApp, worker_factory: WorkerFactory,
                     redis_db: RedisDB) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f = Flow("cli")
    f.add(proj.fail_until.si("cli-fixed"), id="a")
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=30) == FlowState.FAILED
    dry = cli("retry", handle.id, "--dry-run", broker=redis_db.celery_url)
    assert dry.returncode == 0, dry.stderr
    assert "would be released: a" in dry.stdout
    assert handle.state() == FlowState.FAILED
    redis_db.client.set("cli-fixed", 1)
    out = cli("retry", handle.id, broker=redis_db.celery_url)
    assert out.returncode == 0 and "released: a" in out.stdout
    assert handle.wait(timeout=30) == FlowState.SUCCEEDED
    refused = cli("pause", handle.id, broker=redis_db.celery_url)
    assert refused.returncode == 1 and "finished" in refused.stderr
    missing = cli("cancel", "nope", broker=redis_db.celery_url)
    assert missing.returncode == 1
    listed = cli("list", "--state", "succeeded", broker=redis_db.celery_url)
    assert handle.id in listed.stdout
    graph = cli("graph", handle.id, "--format", "dot", broker=redis_db.celery_url)
    assert graph.returncode == 0 and '"a"' in graph.stdout
    assert json.loads(cli("inspect", handle.id, "--json",
                          broker=redis_db.celery_url).stdout)["state"] == "succeeded"


def _wait_state(handle: Any, node: str, state: NodeState, timeout: float = 20) -> None:
    wait_until(lambda: handle.node_states()[node] == state, f"{node} to be {state}", timeout)


def test_external_node_completed_by_signal_and_cli(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f = Flow("approval")
    a = f.add(proj.add.si(1, 1), id="a")
    gate = f.add_external("approve", after=[a])
    f.add(proj.ident.s(), id="after", after=[gate])
    other = f.add_external("other")
    f.add(proj.ident.s(), id="after-other", after=[other], trigger_rule="all_done")
    handle = proj.flows.submit(f)
    _wait_state(handle, "approve", NodeState.AWAITING)
    assert "external signal" in handle.inspect()["nodes"]["approve"]["waiting_for"]
    with pytest.raises(FlowStateError, match="not an external node"):
        proj.flows.signal(handle.id, "a", result=1)
    proj.flows.signal(handle.id, "approve", result={"by": "alice"})
    out = cli("signal", handle.id, "other", "--error", "rejected",
              broker=redis_db.celery_url)
    assert out.returncode == 0, out.stderr
    bad = cli("signal", handle.id, "other", "--result", "{not json",
              broker=redis_db.celery_url)
    assert bad.returncode == 2
    assert handle.wait(timeout=30) == FlowState.FAILED
    results = handle.results()
    assert results["after"] == {"by": "alice"}
    assert results["after-other"] is None
    assert handle.inspect()["nodes"]["other"]["error"] == "rejected"
