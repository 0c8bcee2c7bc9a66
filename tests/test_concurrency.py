"""Concurrency groups (SPEC section 12): at most N flows of a key admitted at once, the
others waiting in line, on real workers and a real Redis."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from celery_flows import Flow, FlowDefinitionError, FlowState
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, cli

#: tenant: two flows of a key at once; solo: one
GROUPS = {"FLOWS_TEST_CONCURRENCY": json.dumps({"tenant": 2, "solo": 1})}


@pytest.fixture
def proj(import_app: ImportApp, monkeypatch: pytest.MonkeyPatch) -> Any:
    for k, v in GROUPS.items():
        monkeypatch.setenv(k, v)
    return import_app("tests.proj")


def spans(redis_db: RedisDB) -> dict[str, tuple[float, float]]:
    """flow id -> (start, end) of its ``span`` body."""
    out = {}
    for raw in redis_db.client.lrange("spans", 0, -1):
        fid, start, end = (raw.decode() if isinstance(raw, bytes) else raw).split("|")
        out[fid] = (float(start), float(end))
    return out


def keyed(proj: Any, key: str, seconds: float, group: str = "tenant", **opts: Any) -> Flow:
    f = Flow(f"job-{key}", concurrency=(group, key), **opts)
    f.add(proj.span.si(seconds), id="work")
    return f


def test_definition_errors_write_nothing(proj: Any, redis_db: RedisDB) -> None:
    bad: list[dict[str, Any]] = [
        {"concurrency": ("tenant", 7)},
        {"concurrency": ("tenant", "")},
        {"concurrency": ("tenant", "a b")},
        {"concurrency": "tenant"},
        {"concurrency": ("ten|ant", "acme")},
        {"concurrency": ("tenant", "acme"), "on_limit": "drop"},
    ]
    for opts in bad:
        with pytest.raises(FlowDefinitionError):
            Flow("x", **opts)
    f = Flow("x", concurrency=("nosuchgroup", "acme"))
    f.add(proj.add.si(1, 2))
    with pytest.raises(FlowDefinitionError, match="flows_concurrency_limits"):
        proj.flows.submit(f)
    parent = Flow("parent")
    with pytest.raises(FlowDefinitionError, match="sub-flow"):
        parent.add(Flow("sub", concurrency=("tenant", "acme")), id="sub")
    assert redis_db.client.keys("flows:*") == []


def test_at_most_n_per_key_in_submission_order(
    proj: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    acme = [proj.flows.submit(keyed(proj, "acme", 0.6)) for _ in range(5)]
    beta = proj.flows.submit(keyed(proj, "beta", 0.3))
    assert [h.state() for h in acme] == ["running"] * 2 + ["waiting"] * 3
    # the third flow of acme waits, its node pending, and says for what
    third = acme[2]
    assert third.state() == FlowState.WAITING
    assert third.node_states() == {"work": "pending"}
    doc = third.inspect()
    assert doc["waiting_for"] == {"group": "tenant", "key": "acme", "position": 1}
    assert acme[4].inspect()["waiting_for"]["position"] == 3
    tree = cli("inspect", third.id, broker=redis_db.celery_url, env=GROUPS)
    assert "waiting for a place in concurrency group 'tenant', key 'acme'" in tree.stdout
    stats = json.loads(cli("stats", "--json", broker=redis_db.celery_url,
                           env=GROUPS).stdout)
    assert stats["concurrency"]["tenant"]["keys"]["acme"] == {"running": 2, "queued": 3}
    text = cli("stats", broker=redis_db.celery_url, env=GROUPS).stdout
    assert "acme: 2/2 running, 3 queued" in text
    # two --flows workers: their groups services race to free and admit
    worker_factory("tests.proj", extra_args=FLOWS, env=GROUPS, concurrency=3)
    worker_factory("tests.proj", extra_args=FLOWS, env=GROUPS, concurrency=3)
    # sample the states until every flow is done: never more than 2 acme flows running
    most = 0
    while not all(h.state().terminal for h in [*acme, beta]):
        running = sum(1 for h in acme if h.state() == FlowState.RUNNING)
        most = max(most, running)
        assert running <= 2
        time.sleep(0.02)
    assert most == 2
    assert all(h.state() == FlowState.SUCCEEDED for h in [*acme, beta])
    ran = spans(redis_db)
    # released (Redis TIME) in submission order: places go first come first served
    released = [h.inspect()["nodes"]["work"]["queued_at"] for h in acme]
    assert released == sorted(released)
    # and each waiting flow started only after an earlier one of its key had ended
    ends = sorted(ran[h.id][1] for h in acme)
    for i, h in enumerate(acme[2:]):
        assert ran[h.id][0] >= ends[i]
    # never three bodies of acme at once
    for h in acme:
        start = ran[h.id][0]
        overlapping = sum(1 for g in acme if ran[g.id][0] <= start < ran[g.id][1])
        assert overlapping <= 2
    # the other key was not held back by acme's line
    assert ran[beta.id][0] < ran[acme[0].id][1]
    wait_until(lambda: proj.flows.store.conc_group_keys() == [], "every place freed")


def test_cancel_waiting_and_retry_waits_last(
    proj: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    worker_factory("tests.proj", extra_args=FLOWS, env=GROUPS, concurrency=4)
    failing = Flow("failing", concurrency=("solo", "k"))
    failing.add(proj.boom.si(), id="boom")
    failed = proj.flows.submit(failing)
    assert failed.wait(timeout=20) == FlowState.FAILED
    first = proj.flows.submit(keyed(proj, "k", 1.5, group="solo"))
    wait_until(lambda: first.state() == FlowState.RUNNING, "the first flow admitted")
    second = proj.flows.submit(keyed(proj, "k", 0.1, group="solo"))
    third = proj.flows.submit(keyed(proj, "k", 0.1, group="solo"))
    assert second.state() == third.state() == FlowState.WAITING
    # paused comes before waiting in a flow's state (SPEC section 4)
    proj.flows.pause(third.id)
    assert third.state() == FlowState.PAUSED
    proj.flows.resume(third.id)
    assert third.state() == FlowState.WAITING
    proj.flows.cancel(second.id)
    assert second.state() == FlowState.CANCELLED
    wait_until(lambda: third.inspect()["waiting_for"]["position"] == 1,
               "the cancelled flow left the line")
    # reopened by retry: it waits again, last in line, its failed node held back
    proj.flows.retry(failed.id)
    assert failed.state() == FlowState.WAITING
    assert failed.inspect()["waiting_for"]["position"] == 2
    assert first.wait(timeout=20) == FlowState.SUCCEEDED
    assert third.wait(timeout=20) == FlowState.SUCCEEDED
    assert failed.wait(timeout=20) == FlowState.FAILED
    ran = spans(redis_db)
    assert second.id not in ran
    boom_runs = [r for r in redis_db.client.lrange("runs", 0, -1)
                 if r.decode().startswith(f"{failed.id}|boom")]
    assert len(boom_runs) == 2  # ran again after the retry, once it had its place
    wait_until(lambda: proj.flows.store.conc_group_keys() == [], "every place freed")


def test_cancel_newest_and_cancel_oldest(
    proj: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    worker_factory("tests.proj", extra_args=FLOWS, env=GROUPS, concurrency=4)
    oldest = proj.flows.submit(keyed(proj, "k", 3.0, group="solo"))
    wait_until(lambda: oldest.state() == FlowState.RUNNING, "the first flow admitted")
    newest = proj.flows.submit(keyed(proj, "k", 0.1, group="solo", on_limit="cancel_newest"))
    assert newest.state() == FlowState.CANCELLED
    assert newest.node_states() == {"work": "cancelled"}
    assert oldest.state() == FlowState.RUNNING
    arriving = proj.flows.submit(keyed(proj, "k", 0.1, group="solo",
                                       on_limit="cancel_oldest"))
    assert oldest.state() == FlowState.CANCELLED
    assert arriving.wait(timeout=20) == FlowState.SUCCEEDED
    assert newest.id not in spans(redis_db)
    wait_until(lambda: proj.flows.store.conc_group_keys() == [], "every place freed")


def test_idempotent_submit_takes_one_place(
    proj: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    f = keyed(proj, "k", 0.5, group="solo", id="same")
    h = proj.flows.submit(f)
    proj.flows.submit(keyed(proj, "k", 0.5, group="solo", id="same"))
    other = proj.flows.submit(keyed(proj, "k", 0.1, group="solo"))
    assert h.state() == FlowState.RUNNING  # no worker yet: admitted, nothing ran
    assert other.inspect()["waiting_for"]["position"] == 1
    worker_factory("tests.proj", extra_args=FLOWS, env=GROUPS, concurrency=2)
    assert other.wait(timeout=20) == FlowState.SUCCEEDED
    assert h.state() == FlowState.SUCCEEDED


def test_add_bulk_and_large_flows_respect_groups(
    proj: Any, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery_flows.engine import batch

    monkeypatch.setattr(batch, "PIECE_NODES", 4)  # the 6-node flow goes in pieces
    big = Flow("big", concurrency=("solo", "k"))
    for i in range(6):
        big.add(proj.ident.si(i), id=f"n{i}")
    handles = proj.flows.add_bulk([keyed(proj, "k", 0.3, group="solo"),
                                   keyed(proj, "k", 0.3, group="solo")])
    large = proj.flows.submit(big)
    assert [h.state() for h in handles] == [FlowState.RUNNING, FlowState.WAITING]
    assert large.state() == FlowState.WAITING
    assert set(large.node_states().values()) == {"pending"}
    worker_factory("tests.proj", extra_args=FLOWS, env=GROUPS, concurrency=4)
    for h in [*handles, large]:
        assert h.wait(timeout=20) == FlowState.SUCCEEDED
    ran = spans(redis_db)
    assert ran[handles[0].id][1] <= ran[handles[1].id][0]


def test_eager_mode_ignores_groups(proj: Any) -> None:
    proj.app.conf.task_always_eager = True
    handles = [proj.flows.submit(keyed(proj, "k", 0, group="solo")) for _ in range(2)]
    assert [h.state() for h in handles] == [FlowState.SUCCEEDED, FlowState.SUCCEEDED]


def test_killed_worker_frees_the_place(
    proj: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    env = {**GROUPS, "FLOWS_TEST_LEASE": "2"}
    victim = worker_factory("tests.proj", env=env, concurrency=1, queues=("victim",))
    worker_factory("tests.proj", extra_args=FLOWS, env=env, concurrency=2)
    holder = Flow("holder", concurrency=("solo", "k"))
    holder.add(proj.sleepy.si(60), id="long", queue="victim", max_recoveries=0)
    held = proj.flows.submit(holder)
    waiting = proj.flows.submit(keyed(proj, "k", 0.1, group="solo"))
    wait_until(lambda: held.node_states()["long"] == "running", "the long node started")
    assert waiting.state() == FlowState.WAITING
    victim.kill9()
    assert held.wait(timeout=30) == FlowState.FAILED
    assert "WorkerLostError" in (held.inspect()["nodes"]["long"]["error"] or "")
    assert waiting.wait(timeout=20) == FlowState.SUCCEEDED


def test_manager_dying_between_admission_and_start(
    proj: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    dying = worker_factory("tests.proj", extra_args=FLOWS, concurrency=2,
                           env={**GROUPS, "CELERY_FLOWS_FAULTS":
                                "conc-admitted-before-start=kill"})
    first = proj.flows.submit(keyed(proj, "k", 0.3, group="solo"))
    second = proj.flows.submit(keyed(proj, "k", 0.1, group="solo"))
    assert first.wait(timeout=20) == FlowState.SUCCEEDED
    # its --flows worker admitted the second flow, then died before starting it
    wait_until(lambda: not dying.is_running(), "the manager died at the fault point")
    dying.kill9()  # its orphaned pool children too
    assert second.state() == FlowState.WAITING
    worker_factory("tests.proj", extra_args=FLOWS, env=GROUPS, concurrency=2)
    assert second.wait(timeout=20) == FlowState.SUCCEEDED


def test_producer_dying_before_its_flow_asks_for_a_place(
    proj: Any, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery_flows import faults

    monkeypatch.setenv(faults.ENV, "after-create=raise")
    faults.reload()
    try:
        with pytest.raises(faults.FaultInjected):
            proj.flows.submit(keyed(proj, "k", 0.1, group="solo", id="orphan"))
    finally:
        monkeypatch.delenv(faults.ENV)
        faults.reload()
    orphan = proj.flows.get("orphan")
    assert orphan.state() == FlowState.WAITING
    assert proj.flows.store.conc_group_keys() == []  # stored, not yet in any line
    worker_factory("tests.proj", extra_args=FLOWS, env=GROUPS, concurrency=2)
    # the sweeper takes over the dirty flow, which then asks for its place
    assert orphan.wait(timeout=30) == FlowState.SUCCEEDED


def test_expired_admitted_flow_frees_its_place(
    proj: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    stuck = proj.flows.submit(keyed(proj, "k", 0.1, group="solo"))
    waiting = proj.flows.submit(keyed(proj, "k", 0.1, group="solo"))
    assert waiting.state() == FlowState.WAITING
    # its keys gone as its retention would take them, unfinished
    redis_db.client.delete(*proj.flows.store.keys.flow(stuck.id))
    worker_factory("tests.proj", extra_args=FLOWS, env=GROUPS, concurrency=2)
    assert waiting.wait(timeout=20) == FlowState.SUCCEEDED


def test_groups_on_redis_cluster(
    cluster: str, import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {**GROUPS, "FLOWS_TEST_REGISTRY": cluster, "FLOWS_TEST_REGISTRY_CLUSTER": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proj = import_app("tests.proj")
    handles = [proj.flows.submit(keyed(proj, "k", 0.3, group="solo")) for _ in range(3)]
    assert [h.state() for h in handles] == ["running", "waiting", "waiting"]
    assert handles[2].inspect()["waiting_for"]["position"] == 2
    evicting = proj.flows.submit(keyed(proj, "k", 0.1, group="solo",
                                       on_limit="cancel_oldest"))
    assert handles[0].state() == FlowState.CANCELLED
    worker_factory("tests.proj", extra_args=FLOWS, env=env, concurrency=2)
    for h in [evicting, *handles[1:]]:
        assert h.wait(timeout=30) == FlowState.SUCCEEDED
    ran = spans(redis_db)
    order = sorted(ran, key=lambda fid: ran[fid][0])
    assert order == [evicting.id, handles[1].id, handles[2].id]
    for a, b in zip(order, order[1:], strict=False):
        assert ran[a][1] <= ran[b][0]
    wait_until(lambda: proj.flows.store.conc_group_keys() == [], "every place freed")


def test_eviction_noted_before_a_crash_is_carried_out(
    proj: Any, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery_flows import faults

    first = proj.flows.submit(keyed(proj, "k", 0.5, group="solo"))
    monkeypatch.setenv(faults.ENV, "conc-evict-before-cancel=raise")
    faults.reload()
    try:
        # the producer fails between noting the eviction and cancelling (it logs it)
        newest = proj.flows.submit(keyed(proj, "k", 0.1, group="solo",
                                         on_limit="cancel_newest"))
    finally:
        monkeypatch.delenv(faults.ENV)
        faults.reload()
    assert newest.state() == FlowState.WAITING  # not cancelled yet, not in line either
    worker_factory("tests.proj", extra_args=FLOWS, env=GROUPS, concurrency=2)
    assert newest.wait(timeout=20) == FlowState.CANCELLED
    assert first.wait(timeout=20) == FlowState.SUCCEEDED
    assert newest.id not in spans(redis_db)
