"""A wide fan-in: the sink of many dependencies is evaluated in bounded steps (its scan,
one per claim) instead of in the completion that finished its last dependency, and its
inputs reach it whole: each dependency's result in ``after`` order, ``None`` for one it
runs past, nothing for a removed one. A worker killed between two steps loses nothing,
and a change of an edge's kind in the middle of a scan starts it again."""

from __future__ import annotations

from typing import Any

from celery_flows import Flow, FlowState
from celery_flows.faults import ENV as FAULTS
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, run_counts

# a script reads at most 20 dependency records (10 units of 2), and a node of more than
# 20 dependencies is evaluated in steps
SMALL = {"CELERY_FLOWS_CHUNK": "5"}


def _waiting(proj: Any, fid: str) -> dict[str, str]:
    raw = proj.flows.store.client.hgetall(proj.flows.store.keys.flow(fid)[6])
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_a_wide_sink_gets_every_input_in_order_after_a_worker_died_between_scan_steps(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    proj = import_app("tests.proj")
    f = Flow("wide-fan-in")
    deps = []
    for i in range(120):
        if i == 7:
            deps.append(f.add(proj.boom.si(), id=f"d{i}", failure_policy="ignore"))
        elif i == 9:
            deps.append(f.add(proj.boom.si(), id=f"d{i}", failure_policy="remove"))
        else:
            deps.append(f.add(proj.ident.si(i), id=f"d{i}"))
    f.add(proj.ident.s(), id="sink", after=deps)
    # the worker that finishes the dependencies dies at its first bounded step: the
    # sink's scan has read 20 of its 120 dependencies
    worker_factory("tests.proj", concurrency=2, env={**SMALL, FAULTS: "chore-step@1=kill"})
    handle = proj.flows.submit(f)
    wait_until(lambda: "sink|scan" in _waiting(proj, handle.id), "the scan's first step",
               timeout=60)
    assert handle.node_states()["sink"] == "pending"
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2, env=SMALL)
    assert handle.wait(timeout=120) == FlowState.SUCCEEDED
    expected = [None if i == 7 else i for i in range(120) if i != 9]
    assert handle.results()["sink"] == expected
    assert run_counts(redis_db, handle.id)["sink"] == 1
    meta = proj.flows.store.meta(handle.id) or {}
    assert "scanning" not in meta and meta["done"] == meta["total"] == "121"
    assert not [k for k in _waiting(proj, handle.id) if k.endswith("|scan")]


def test_a_wide_sink_whose_rule_fails_is_skipped_and_its_dependents_with_it(
    import_app: ImportApp, worker_factory: WorkerFactory,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2, env=SMALL)
    f = Flow("wide-skip")
    deps = [f.add(proj.ident.si(i), id=f"d{i}") for i in range(60)]
    deps.append(f.add(proj.boom.si(), id="bad"))
    sink = f.add(proj.ident.s(), id="sink", after=deps)
    f.add(proj.ident.s(), id="after-sink", after=[sink])
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=120) == FlowState.FAILED
    states = handle.node_states()
    assert states["sink"] == states["after-sink"] == "skipped"
    assert proj.flows.store.node(handle.id, "sink")["skip_reason"] == "upstream_failed"


def test_ignore_failure_in_the_middle_of_a_scan_starts_it_again(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    # no worker yet: this process records the outcomes and takes one claim, so the
    # scan stops after its first step (the default chunk: 100 records a step, a node of
    # more than 100 dependencies scanned)
    proj = import_app("tests.proj")
    store = proj.flows.store
    f = Flow("scan-restart")
    deps = [f.add(proj.ident.si(i), id=f"d{i}") for i in range(300)]
    f.add(proj.ident.s(), id="sink", after=deps)
    handle = proj.flows.submit(f)
    fid = handle.id
    codec = proj.flows.codec
    store.complete(fid, "d0", 1, "failed", b"", "RuntimeError: boom")
    for i in range(1, 300):
        store.complete(fid, f"d{i}", 1, "succeeded", codec.dump_result(i))
    store.claim(fid, 15.0, 25)
    position = _waiting(proj, fid)["sink|scan"]
    # d0 was read as failed: without a new scan the sink would be skipped
    assert _waiting(proj, fid)["sink|k"].startswith("f")
    assert int(position.split()[0]) > 1
    proj.flows.ignore_failure(fid, "d0")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    assert handle.wait(timeout=120) == FlowState.SUCCEEDED
    assert handle.results()["sink"] == [None, *range(1, 300)]
    assert run_counts(redis_db, fid)["sink"] == 1


def test_a_wide_sink_in_eager_mode_gets_its_inputs(import_app: ImportApp) -> None:
    proj = import_app("tests.proj")
    proj.app.conf.task_always_eager = True
    f = Flow("wide-eager")
    deps = [f.add(proj.ident.si(i), id=f"d{i}") for i in range(150)]
    f.add(proj.tsum.s(), id="sink", after=deps)
    handle = proj.flows.submit(f)
    assert handle.state() == FlowState.SUCCEEDED
    assert handle.results()["sink"] == sum(range(150))


def test_a_retry_reopens_a_wide_sink_that_waits_for_each_dependency_not_reopened_yet(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    # 100 of the 150 dependencies fail: the retry reopens them and the sink, whose
    # waiting is not recounted (that would read all 150 records at once): its scan
    # waits at each dependency that has not run again yet
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2, env=SMALL)
    f = Flow("wide-retry")
    failing = [i for i in range(150) if i % 3]
    deps = [f.add(proj.fail_until.si("fixed", i) if i % 3 else proj.ident.si(i), id=f"d{i}")
            for i in range(150)]
    sink = f.add(proj.ident.s(), id="sink", after=deps)
    f.add(proj.ident.s(), id="total", after=[sink])
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=120) == FlowState.FAILED
    assert handle.node_states()["sink"] == "skipped"
    redis_db.client.set("fixed", 1)
    report = proj.flows.retry(handle.id)
    assert set(report["reopened"]) == {f"d{i}" for i in failing} | {"sink", "total"}
    assert handle.wait(timeout=120) == FlowState.SUCCEEDED
    assert handle.results()["sink"] == list(range(150))
    counts = run_counts(redis_db, handle.id)
    assert counts["sink"] == counts["total"] == 1
    assert all(counts[f"d{i}"] == (2 if i % 3 else 1) for i in range(150))


def test_inspect_says_a_wide_sink_is_being_evaluated_and_counts_what_it_waits_for(
    import_app: ImportApp,
) -> None:
    # no worker: the sink's scan has not begun while its dependencies are queued, and
    # stops after the one claim this process makes
    proj = import_app("tests.proj")
    store, codec = proj.flows.store, proj.flows.codec
    f = Flow("wide-inspect")
    deps = [f.add(proj.ident.si(i), id=f"d{i}") for i in range(300)]
    f.add(proj.ident.s(), id="sink", after=deps)
    handle = proj.flows.submit(f)
    waits = handle.inspect()["nodes"]["sink"]["waiting_for"]
    assert waits.startswith("dependencies: d0, d1,") and waits.endswith(" and 280 more")
    for i in range(300):
        store.complete(handle.id, f"d{i}", 1, "succeeded", codec.dump_result(i))
    store.claim(handle.id, 15.0, 25)
    assert handle.node_states()["sink"] == "pending"
    assert handle.inspect()["nodes"]["sink"]["waiting_for"] == (
        "evaluation of its 300 dependencies, a step per claim "
        "(by this process or a --flows worker)")


def test_a_dependency_removed_from_a_wide_sink_is_dropped_from_its_inputs(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
) -> None:
    # d5 never finishes: once removed, the sink's scan must pass it by, not wait for it
    proj = import_app("tests.proj")
    store, codec = proj.flows.store, proj.flows.codec
    f = Flow("wide-removed")
    deps = [f.add(proj.sleepy.si(3600) if i == 5 else proj.ident.si(i), id=f"d{i}")
            for i in range(300)]
    f.add(proj.ident.s(), id="sink", after=deps)
    handle = proj.flows.submit(f)
    proj.flows.remove_dependency(handle.id, "sink", "d5")
    for i in range(300):
        if i != 5:
            store.complete(handle.id, f"d{i}", 1, "succeeded", codec.dump_result(i))
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    wait_until(lambda: handle.node_states()["sink"] == "succeeded", "the sink to run",
               timeout=60)
    assert handle.results()["sink"] == [i for i in range(300) if i != 5]
    assert run_counts(redis_db, handle.id)["sink"] == 1
    proj.flows.cancel(handle.id, terminate=True)
