"""Outcomes SPEC section 4 defines beyond success and failure, on a real prefork worker."""

from __future__ import annotations

from typing import Any

from celery_flows import Flow, FlowState, FlowVersionError
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, run_counts


def test_retries_replace_ignore_unknown_time_limit_and_progress(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj: Any = import_app("tests.proj")

    # registered in this producer only: the worker reports it as unknown
    @proj.app.task(name="tests.proj.producer_only", shared=False)
    def producer_only() -> None:
        return None

    worker_factory("tests.proj", extra_args=FLOWS)
    f = Flow("outcomes")
    f.add(proj.flaky.s(2), id="flaky")
    f.add(proj.replacer.s(1), id="replaced")
    f.add(proj.ignorer.s(), id="ignored")
    f.add(producer_only.s(), id="unknown")
    f.add(proj.overrun.s(), id="overrun")
    f.add(proj.reporter.s(3), id="reporter")
    f.add(proj.add.s(1, 2, 3), id="bad-args")
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.FAILED
    doc = handle.inspect()["nodes"]
    # Celery retries are one attempt, not failures
    assert doc["flaky"]["state"] == "succeeded"
    assert doc["flaky"]["retries"] == 2 and doc["flaky"]["attempts"] == 1
    assert handle.results()["flaky"] == 2
    # the replacement's result is the node's result, same attempt
    assert doc["replaced"]["state"] == "succeeded"
    assert handle.results()["replaced"] == 101
    assert doc["replaced"]["attempts"] == 1
    assert doc["ignored"]["state"] == "failed"
    assert doc["ignored"]["error"].startswith("Ignore")
    assert doc["unknown"]["state"] == "failed"
    assert doc["unknown"]["error"].startswith("NotRegistered")
    assert doc["overrun"]["state"] == "failed"
    assert "TimeLimitExceeded" in doc["overrun"]["error"]
    # a call Celery refuses to send fails its node instead of hanging the flow
    assert doc["bad-args"]["state"] == "failed"
    assert doc["bad-args"]["error"].startswith("TypeError")
    milestones = doc["reporter"]["progress"]
    assert [m["message"] for m in milestones] == ["step 1", "step 2", "step 3"]
    assert milestones[-1]["percent"] == 100
    counts = run_counts(redis_db, handle.id)
    assert counts["flaky"] == 3 and counts["overrun"] == 1


def test_finished_flows_expire_after_retention(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj: Any = import_app("tests.proj")
    proj.app.conf.flows_retention = 100
    f = Flow("short-lived")
    f.add(proj.add.s(1, 1), id="a")
    proj.app.conf.task_always_eager = True
    handle = proj.flows.submit(f)
    assert handle.state() == FlowState.SUCCEEDED
    for key in proj.flows.store.keys.flow(handle.id)[:4]:
        assert 0 < redis_db.client.ttl(key) <= 100


def test_unknown_major_version_is_refused(import_app: ImportApp, redis_db: RedisDB) -> None:
    proj: Any = import_app("tests.proj")
    proj.app.conf.task_always_eager = True
    f = Flow("versioned")
    f.add(proj.add.s(1, 1), id="a")
    handle = proj.flows.submit(f)
    redis_db.client.hset(proj.flows.store.keys.meta(handle.id), "v", "2.0")
    try:
        handle.state()
    except FlowVersionError as exc:
        assert "upgrade celery-flows" in str(exc)
    else:
        raise AssertionError("a flow of major version 2 must be refused")
    code = proj.flows.store.start(handle.id, "a", 1, "0:0", "t", "w").code
    assert code == -2
