"""Maps (SPEC section 12): ``f.map(sig, over=node)`` runs one item per element of
``over``'s list result, and its dependents receive the items' results in order."""

from __future__ import annotations

from typing import Any

import pytest
from celery import chain

from celery_flows import Flow, FlowDefinitionError, FlowState
from celery_flows.faults import ENV as FAULTS
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, LIMITS, cli, run_counts

# a step settles at most 10 edges (CELERY_FLOWS_CHUNK=5)
SMALL = {"CELERY_FLOWS_CHUNK": "5"}


def test_a_map_runs_one_item_per_element_and_passes_their_results_in_order(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    f = Flow("map")
    src = f.add(proj.numbers.s(5), id="src")
    each = f.map(proj.double.s(), over=src, id="each")
    f.add(proj.tsum.s(), id="total", after=[each])
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    results = handle.results()
    assert results["each"] == [0, 2, 4, 6, 8]
    assert [results[f"each[{i}]"] for i in range(5)] == [0, 2, 4, 6, 8]
    assert results["total"] == 20
    states = handle.node_states()
    assert list(states) == ["src", "each", *[f"each[{i}]" for i in range(5)], "total"]
    assert set(states.values()) == {"succeeded"}
    counts = run_counts(redis_db, handle.id)
    assert counts["src"] == 1 and all(counts[f"each[{i}]"] == 1 for i in range(5))
    # the items joined in the step that recorded src: the map went from pending to
    # running at once, and src's success is in the same step as its first items' release
    events = [e for e in proj.flows.store.read_events(handle.id, "0") if e["node"]]
    assert [e["state"] for e in events if e["node"] == "each"] == ["running", "succeeded"]
    src_done = next(i for i, e in enumerate(events)
                    if e["node"] == "src" and e["state"] == "succeeded")
    assert events[src_done + 1]["node"].startswith("each")


def _map_flow(proj: Any, n: int, **options: Any) -> tuple[Flow, Any]:
    f = Flow("map")
    src = f.add(proj.numbers.s(n), id="src")
    each = f.map(proj.double.s(*options.pop("args", ())), over=src, id="each", **options)
    f.add(proj.ident.s(), id="after", after=[each])
    return f, each


def test_an_empty_list_makes_the_map_succeed_with_an_empty_list(
    import_app: ImportApp, worker_factory: WorkerFactory,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f, _each = _map_flow(proj, 0)
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results() == {"src": [], "each": [], "after": []}


def test_a_list_over_max_length_or_not_a_list_fails_the_map_with_a_clear_error(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f, _each = _map_flow(proj, 5, max_length=4)
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.FAILED
    doc = handle.inspect()
    assert doc["nodes"]["each"]["state"] == "failed"
    assert "5 items, more than its max_length=4" in doc["nodes"]["each"]["error"]
    assert doc["nodes"]["after"]["state"] == "skipped"
    assert not [n for n in doc["nodes"] if n.startswith("each[")]

    # not a list: the map fails; once its input is a list, retry runs the input again
    g = Flow("not-a-list")
    src = g.add(proj.listing.s(f"flag-{redis_db.db}"), id="src")
    g.map(proj.double.s(), over=src, id="each")
    handle = proj.flows.submit(g)
    assert handle.wait(timeout=60) == FlowState.FAILED
    error = handle.inspect()["nodes"]["each"]["error"]
    assert error.startswith("TypeError") and "list or tuple" in error and "dict" in error
    proj._log.set(f"flag-{redis_db.db}", 1)
    proj.flows.retry(handle.id)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results()["each"] == [2, 4, 6]
    assert run_counts(redis_db, handle.id)["src"] == 2


def test_a_failed_item_is_the_only_one_a_retry_runs_again(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    flag = f"items-{redis_db.db}"
    f, _each = _map_flow(proj, 5, args=(flag,))
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.FAILED
    states = handle.node_states()
    assert states["each[3]"] == "failed" and states["each"] == "failed"
    assert states["after"] == "skipped"
    assert all(states[f"each[{i}]"] == "succeeded" for i in (0, 1, 2, 4))
    proj._log.set(flag, 1)
    proj.flows.retry(handle.id)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results()["after"] == [0, 2, 4, 6, 8]
    counts = run_counts(redis_db, handle.id)
    assert counts["each[3]"] == 2
    assert [counts[f"each[{i}]"] for i in (0, 1, 2, 4)] == [1, 1, 1, 1]
    assert counts["src"] == 1


def test_a_map_over_a_map_and_max_active(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=4)
    f = Flow("nested")
    src = f.add(proj.numbers.s(6), id="src")
    first = f.map(proj.gauge.s(), over=src, id="first", max_active=2)
    second = f.map(proj.double.s(), over=first, id="second")
    f.add(proj.tsum.s(), id="total", after=[second])
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    results = handle.results()
    assert results["first"] == [0, 1, 2, 3, 4, 5]
    assert results["second"] == [0, 2, 4, 6, 8, 10]
    assert results["total"] == 30
    assert int(proj._log.get("gauge-max")) <= 2


def test_many_items_are_released_in_bounded_steps(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    # a step releases at most 10 items (CELERY_FLOWS_CHUNK=5): 150 items take many
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2, env=SMALL)
    f, _each = _map_flow(proj, 150)
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=120) == FlowState.SUCCEEDED
    assert handle.results()["after"] == [2 * i for i in range(150)]
    counts = run_counts(redis_db, handle.id)
    assert all(counts[f"each[{i}]"] == 1 for i in range(150))
    meta = proj.flows.store.meta(handle.id) or {}
    assert meta["done"] == meta["total"] == str(3 + 150)


def test_maps_inside_a_sub_flow_and_in_eager_mode(
    import_app: ImportApp, worker_factory: WorkerFactory,
) -> None:
    proj = import_app("tests.proj")
    sub = Flow("sub")
    src = sub.add(proj.numbers.s(3), id="src")
    sub.map(proj.double.s(), over=src, id="each")
    f = Flow("outer")
    inner = f.add(sub, id="sub")
    f.add(proj.tsum.s(), id="total", after=[inner])
    worker_factory("tests.proj", extra_args=FLOWS)
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    results = handle.results()
    assert results["sub:each"] == [0, 2, 4] and results["sub:each[2]"] == 4
    assert results["total"] == 6

    proj.app.conf.task_always_eager = True
    g, _each = _map_flow(proj, 4)
    handle = proj.flows.submit(g)
    assert handle.state() == FlowState.SUCCEEDED
    assert handle.results()["after"] == [0, 2, 4, 6]


def test_a_map_is_checked_at_definition(import_app: ImportApp) -> None:
    proj = import_app("tests.proj")
    f = Flow("bad")
    src = f.add(proj.numbers.s(3), id="src")
    with pytest.raises(FlowDefinitionError, match="immutable"):
        f.map(proj.double.si(1), over=src)
    with pytest.raises(FlowDefinitionError, match="'remove' is refused"):
        f.map(proj.double.s(), over=src, failure_policy="remove")
    with pytest.raises(FlowDefinitionError, match="max_active"):
        f.map(proj.double.s(), over=src, max_active=0)
    with pytest.raises(FlowDefinitionError, match="reserved for map items"):
        f.map(proj.double.s(), over=src, id="each[1]")


def test_inspect_and_graph_show_the_items_under_their_map(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    flag = f"items-{redis_db.db}"
    f, _each = _map_flow(proj, 40, args=(flag,))
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.FAILED
    doc = handle.inspect()
    assert doc["nodes"]["each"]["after"] == ["src"] and doc["nodes"]["each"]["items"] == 40
    assert doc["nodes"]["each[3]"]["after"] == ["each"]
    assert doc["nodes"]["each[3]"]["map"] == "each" and doc["nodes"]["each[3]"]["item"] == 3
    tree = cli("inspect", handle.id, broker=redis_db.celery_url).stdout
    lines = tree.splitlines()
    # past a few dozen items, the ones that did not succeed are drawn and the rest counted
    assert any("each[3]" in line and "failed" in line for line in lines)
    assert not any("each[4] " in line for line in lines)
    assert any("... 39 more items: 39 succeeded" in line for line in lines)
    mermaid = cli("graph", handle.id, "--format", "mermaid", broker=redis_db.celery_url).stdout
    assert "each[...]" in mermaid and "39 more items" in mermaid
    assert mermaid.count("each[") == 2


def test_a_worker_killed_after_staging_the_items_loses_nothing_and_runs_no_item_twice(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the worker dies between staging the elements and the completion that expands the
    # map: src's outcome is not recorded; the --flows worker recovers it from the result
    # backend once the dead worker's lease expires, and the map expands then
    monkeypatch.setenv("FLOWS_TEST_LEASE", "2")
    proj = import_app("tests.proj")
    doomed = worker_factory("tests.proj", pool="solo",
                            env={FAULTS: "map-staged@1=kill", "FLOWS_TEST_LEASE": "2"})
    f, _each = _map_flow(proj, 30)
    handle = proj.flows.submit(f)
    assert doomed.process is not None
    doomed.process.wait(timeout=30)
    assert handle.node_states()["each"] == "pending"
    assert not [n for n in handle.node_states() if n.startswith("each[")]
    worker_factory("tests.proj", extra_args=FLOWS, env={"FLOWS_TEST_LEASE": "2"})
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results()["after"] == [2 * i for i in range(30)]
    counts = run_counts(redis_db, handle.id)
    assert counts["src"] == 1 and all(counts[f"each[{i}]"] == 1 for i in range(30))


def test_a_worker_killed_between_steps_of_the_items_release_loses_none(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    # 60 items, 10 a step: the worker dies at its first step after the expansion
    doomed = worker_factory("tests.proj", pool="solo",
                            env={**SMALL, FAULTS: "chore-step@1=kill"})
    f, _each = _map_flow(proj, 60)
    handle = proj.flows.submit(f)
    assert doomed.process is not None
    doomed.process.wait(timeout=30)
    states = handle.node_states()
    assert states["each"] == "running"
    assert sum(states[f"each[{i}]"] == "pending" for i in range(60)) >= 40
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2, env=SMALL)
    assert handle.wait(timeout=90) == FlowState.SUCCEEDED
    assert handle.results()["after"] == [2 * i for i in range(60)]
    counts = run_counts(redis_db, handle.id)
    assert all(counts[f"each[{i}]"] == 1 for i in range(60))


def test_items_pass_the_maps_rate_limit_and_queue_cap(
    limited: Any, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = limited
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=4,
                   queues=("celery", "capped"), env=LIMITS)
    f = Flow("limited-map")
    src = f.add(proj.numbers.s(8), id="src")
    f.map(proj.gauge.s(), over=src, id="each", queue="capped", rate_limit="five")
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results()["each"] == list(range(8))
    # the queue cap (2): never more than 2 items at once; the rate (5/s): releases at
    # least 0.2 s apart
    assert int(proj._log.get("gauge-max")) <= 2
    nodes = handle.inspect()["nodes"]
    released = sorted(nodes[f"each[{i}]"]["queued_at"] for i in range(8))
    assert all(b - a >= 0.19 for a, b in zip(released, released[1:], strict=False))


def test_fail_fast_cancels_the_items_left_retry_runs_them_and_cancel_reaches_the_rest(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    f = Flow("fast", fail_fast=True)
    src = f.add(proj.numbers.s(12), id="src")
    f.map(proj.double.s(f"never-{redis_db.db}"), over=src, id="each", max_active=1)
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.FAILED
    states = handle.node_states()
    assert states["each[3]"] == "failed"
    assert [states[f"each[{i}]"] for i in range(4, 12)] == ["cancelled"] * 8
    assert all(f"each[{i}]" not in run_counts(redis_db, handle.id) for i in range(4, 12))
    # a retry runs the failed item and the ones fail_fast cancelled, not the others
    proj._log.set(f"never-{redis_db.db}", 1)
    proj.flows.retry(handle.id)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results()["each"] == [2 * i for i in range(12)]
    counts = run_counts(redis_db, handle.id)
    assert [counts[f"each[{i}]"] for i in range(12)] == [1, 1, 1, 2] + [1] * 8

    g = Flow("cancelled")
    src = g.add(proj.numbers.s(30), id="src")
    g.map(proj.gauge.s(), over=src, id="each", max_active=2)
    handle = proj.flows.submit(g)
    wait_until(lambda: handle.node_states().get("each[1]") in ("queued", "running",
                                                               "succeeded"), "items run")
    proj.flows.cancel(handle.id)
    assert handle.wait(timeout=30) == FlowState.CANCELLED
    states = handle.node_states()
    assert states["each[29]"] == "cancelled"
    assert not [n for n, s in states.items() if s not in ("succeeded", "cancelled")]


def test_ignore_failure_of_an_item_lets_its_map_succeed_with_none_in_its_slot(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    f, _each = _map_flow(proj, 5, args=(f"never-{redis_db.db}",))
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.FAILED
    proj.flows.ignore_failure(handle.id, "each[3]")
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results()["after"] == [0, 2, 4, None, 8]
    assert run_counts(redis_db, handle.id)["each[3]"] == 1


def test_a_map_over_a_node_of_a_flow_built_from_a_canvas(
    import_app: ImportApp, worker_factory: WorkerFactory,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f = Flow.from_canvas(chain(proj.add.s(1, 2), proj.numbers.s()), name="canvas-map")
    last = f.node_ids[-1]
    each = f.map(proj.double.s(), over=last, id="each")
    f.add(proj.tsum.s(), id="total", after=[each])
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results()["each"] == [0, 2, 4]
    assert handle.results()["total"] == 6


def test_a_map_released_in_a_later_step_is_expanded_by_the_dispatcher(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    # src has 30 other dependents before the map: its completion settles 10 edges and
    # leaves the map's to a later claim, where no expansion is at hand; the dispatcher
    # that claims the map splits src's result itself (lua/expand.lua)
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2, env=SMALL)
    f = Flow("late-map")
    src = f.add(proj.numbers.s(4), id="src")
    for i in range(30):
        f.add(proj.ident.si(i), id=f"other{i}", after=[src])
    each = f.map(proj.double.s(), over=src, id="each")
    f.add(proj.tsum.s(), id="total", after=[each])
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results()["each"] == [0, 2, 4, 6] and handle.results()["total"] == 12
    events = [e["state"] for e in proj.flows.store.read_events(handle.id, "0")
              if e["node"] == "each"]
    assert events[-2:] == ["running", "succeeded"] and "scheduled" not in events


def test_item_ids_must_fit_and_an_expansion_past_flows_max_nodes_fails_the_map(
    import_app: ImportApp,
) -> None:
    proj = import_app("tests.proj")
    # read at the first use of the configuration (below)
    proj.app.conf.flows_max_nodes = 10
    f = Flow("long-ids")
    src = f.add(proj.numbers.s(3), id="src")
    f.map(proj.double.s(), over=src, id="m" * 123, max_length=1000)  # m...m[999]: 128
    f.compile(proj.app, proj.flows.config)
    g = Flow("too-long")
    src = g.add(proj.numbers.s(3), id="src")
    g.map(proj.double.s(), over=src, id="m" * 124, max_length=1000)
    with pytest.raises(FlowDefinitionError, match="its last item"):
        g.compile(proj.app, proj.flows.config)

    # eager: the expansion runs here, under this process's flows_max_nodes
    proj.app.conf.task_always_eager = True
    h, _each = _map_flow(proj, 20, max_length=100)
    handle = proj.flows.submit(h)
    assert handle.state() == FlowState.FAILED
    error = handle.inspect()["nodes"]["each"]["error"]
    assert error.startswith("MapTooLong") and "flows_max_nodes=10" in error
