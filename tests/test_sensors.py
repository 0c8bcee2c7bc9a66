"""Sensors (SPEC sections 7 and 8) on a real worker: a poking sensor keeps its queue
slot, and nothing in its record grows with every poke."""

from __future__ import annotations

import json
import time

import pytest

from celery_flows import Flow, FlowState, NodeState
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, run_counts


def test_a_poking_sensor_keeps_its_queue_slot_and_its_record_small(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limits = json.dumps({"capped": 1})
    monkeypatch.setenv("FLOWS_TEST_QUEUE_LIMITS", limits)
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, queues=("celery", "capped"),
                   env={"FLOWS_TEST_QUEUE_LIMITS": limits})
    f = Flow("sensing")
    f.add_sensor(proj.check_key.s("landed"), id="sensor", poke_interval=0.2, timeout=120,
                 queue="capped")
    sensing = proj.flows.submit(f)
    wait_until(lambda: run_counts(redis_db, sensing.id)["sensor"] >= 2,
               "the sensor to poke twice")
    g = Flow("other")
    g.add(proj.ident.si("x"), id="job", queue="capped")
    other = proj.flows.submit(g)
    wait_until(lambda: run_counts(redis_db, sensing.id)["sensor"] >= 10,
               "ten pokes", timeout=60)
    # the cap is the sensor's while it waits to poke again
    assert other.node_states()["job"] == NodeState.SCHEDULED
    assert run_counts(redis_db, other.id)["job"] == 0
    rec = proj.flows.store.node(sensing.id, "sensor")
    assert rec is not None and rec["retries"] >= 9
    for name in ("starts", "task_ids", "history"):
        assert len(rec.get(name) or []) <= 1, (name, rec.get(name))
    redis_db.client.set("landed", "yes")
    assert sensing.wait(timeout=30) == FlowState.SUCCEEDED
    assert other.wait(timeout=30) == FlowState.SUCCEEDED
    sensor = sensing.inspect()["nodes"]["sensor"]
    job = other.inspect()["nodes"]["job"]
    assert job["started_at"] >= sensor["finished_at"]
    assert sensing.results()["sensor"] == "yes"


def test_a_stale_poke_message_does_not_run_again(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    """The start keys of earlier pokes are dropped, so the guard refuses a message of an
    earlier poke by its retry count: re-sending one does not run its body."""
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f = Flow("sensing")
    f.add_sensor(proj.check_key.s("landed"), id="sensor", poke_interval=0.3, timeout=120)
    handle = proj.flows.submit(f)
    wait_until(lambda: run_counts(redis_db, handle.id)["sensor"] >= 3, "three pokes")
    rec = proj.flows.store.node(handle.id, "sensor")
    assert rec is not None
    task_id = rec["task_ids"][0]
    before = run_counts(redis_db, handle.id)["sensor"]
    # a copy of the first poke's message (retries=0), delivered again
    proj.check_key.apply_async(("landed",), task_id=task_id, retries=0)
    time.sleep(2)
    after = run_counts(redis_db, handle.id)["sensor"]
    # pokes go on (about 6 in 2 s); the copy made no extra run beyond them
    rec2 = proj.flows.store.node(handle.id, "sensor")
    assert rec2 is not None
    assert after - before <= rec2["retries"] - rec["retries"]
    redis_db.client.set("landed", "yes")
    assert handle.wait(timeout=30) == FlowState.SUCCEEDED
