"""Fair share (SPEC sections 7 and 12): a rate limit or queue cap serves its waiting
flows round-robin, by concurrency key then by flow, on real Redis and real workers.

The figures asserted are counts of releases (the ``queued_at`` Redis times of the
nodes), not wall-clock bounds of this machine."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from celery_flows import Flow, FlowState
from celery_flows.engine.limits import Limiter, Limits
from celery_flows.registry import services
from celery_flows.registry.ids import member_for, order_key, share_unit
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, run_counts

FAIR = {"FLOWS_TEST_RATE_LIMITS": json.dumps({"api": "20/s"}),
        "FLOWS_TEST_QUEUE_LIMITS": json.dumps({"capped": 2, "single": 1}),
        "FLOWS_TEST_CONCURRENCY": json.dumps({"tenant": 2})}


@pytest.fixture
def fair(import_app: ImportApp, monkeypatch: pytest.MonkeyPatch) -> Any:
    for k, v in FAIR.items():
        monkeypatch.setenv(k, v)
    return import_app("tests.proj")


def released(handle: Any) -> dict[str, float]:
    """node id -> the Redis time its limiters released it."""
    return {nid: float(n["queued_at"]) for nid, n in handle.inspect()["nodes"].items()
            if n.get("queued_at") is not None}


def before(times: dict[str, float], t: float) -> int:
    return sum(1 for x in times.values() if x < t)


def between(times: dict[str, float], start: float, end: float) -> int:
    return sum(1 for x in times.values() if start < x < end)


def small_behind_big(app: Any, big: int, **options: Any) -> tuple[float, int, int]:
    """Submit a flow of ``big`` nodes, then one of 5, every node with ``options``; wait
    for the small one. Returns the seconds from its submit to its last release, the big
    flow's releases meanwhile and before it in all."""
    flows = []
    for name, n in (("big", big), ("small", 5)):
        f = Flow(name)
        for i in range(n):
            f.add(app.ident.si(i), id=f"{name[0]}{i}", **options)
        flows.append(f)
    hb = app.flows.submit(flows[0])
    hs = app.flows.submit(flows[1])
    assert hs.wait(timeout=40) == FlowState.SUCCEEDED
    start, last = float(hs.inspect()["created_at"]), max(released(hs).values())
    big_times = released(hb)
    if hb.state() == FlowState.RUNNING:
        app.flows.cancel(hb.id)
    return last - start, between(big_times, start, last), before(big_times, last)


@pytest.mark.parametrize(("limit", "options", "most"), [
    ("20/s", {"rate_limit": "api"}, 6),
    ("cap 2", {"queue": "capped"}, 7),
])
def test_small_flow_is_not_starved_behind_a_backlog_sharing_its_limit(
    fair: Any, worker_factory: WorkerFactory, redis_db: RedisDB, limit: str,
    options: dict[str, str], most: int,
) -> None:
    """300 nodes of one flow and 5 of another share a rate limit (or a queue cap), the
    big flow first: the small one is out within about one round (2 x 5 releases), not
    after the 300."""
    worker_factory("tests.proj", extra_args=FLOWS, env=FAIR, concurrency=2,
                   queues=("celery", "capped"))
    took, meanwhile, ahead = small_behind_big(fair, 300, **options)
    print(f"\nsmall flow ({limit}): {took:.3f} s from submit to its last release; "
          f"big-flow releases meanwhile: {meanwhile}, before it in all: {ahead} of 300")
    # round-robin (as slots free): b s b s b s b s b s; one queue: all 300 first
    assert meanwhile <= most, meanwhile


def test_round_robin_is_by_concurrency_key_then_by_flow(
    fair: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    """Two flows of one concurrency key (both admitted: the group allows 2) count as
    one share: the flow without a key gets every second release, not every third."""
    worker_factory("tests.proj", extra_args=FLOWS, env=FAIR, concurrency=4)
    handles = {}
    for name, width in (("a1", 40), ("a2", 40), ("b", 10)):
        f = Flow(name, concurrency=("tenant", "acme") if name != "b" else None)
        root = f.add(fair.wait_for_key.si("go"), id="root")
        for i in range(width):
            f.add(fair.ident.si(i), id=f"{name}-{i}", rate_limit="api", after=[root])
        handles[name] = fair.flows.submit(f)
    for h in handles.values():
        wait_until(lambda h=h: h.node_states()["root"] == "running", "the roots to run")
    redis_db.client.set("go", 1)
    assert handles["b"].wait(timeout=30) == FlowState.SUCCEEDED
    times = {name: released(h) for name, h in handles.items()}
    b_times = sorted(times["b"][f"b-{i}"] for i in range(10))
    first, last = b_times[0], b_times[-1]
    a1, a2 = (between(times[n], first, last) for n in ("a1", "a2"))
    print(f"\nbetween the keyless flow's first and last releases: {a1} + {a2} of the "
          "key's two flows")
    # by key: one release of the key between two of b (9); by flow it would be two (18)
    assert a1 + a2 <= 12, (a1, a2)
    assert a1 >= 2 and a2 >= 2, (a1, a2)
    for name in ("a1", "a2"):
        if handles[name].state() == FlowState.RUNNING:
            fair.flows.cancel(handles[name].id)


def blocked_beside(app: Any, xs: int, seconds: float, ys: int) -> tuple[Any, Any]:
    """Submit x, ``xs`` nodes of ``seconds`` each under the rate "api" and the cap of 1
    of queue "single", then y, ``ys`` nodes under the rate only."""
    x, y = Flow("x"), Flow("y")
    for i in range(xs):
        x.add(app.occupy.si(seconds, i), id=f"x{i}", rate_limit="api", queue="single")
    for i in range(ys):
        y.add(app.ident.si(i), id=f"y{i}", rate_limit="api")
    return app.flows.submit(x), app.flows.submit(y)


def test_a_flow_blocked_by_another_limit_keeps_its_turn(
    fair: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    """x's nodes pass the 20/s limit but wait for a cap of 1 (each runs 0.6 s); y shares
    only the rate. y is not held to x's pace (x is parked at the rate limit while the
    cap holds its node), and each x node goes out as soon as the cap frees."""
    worker_factory("tests.proj", extra_args=FLOWS, env=FAIR, concurrency=3,
                   queues=("celery", "single"))
    hx, hy = blocked_beside(fair, 6, 0.6, 30)
    assert hy.wait(timeout=30) == FlowState.SUCCEEDED
    assert hx.wait(timeout=30) == FlowState.SUCCEEDED
    span = max(released(hy).values()) - float(hy.inspect()["created_at"])
    print(f"\ny's 30 releases took {span:.2f} s from its submit at 20/s beside x")
    # 30 releases of y and the few of x meanwhile, at 0.05 s each, and 1.5 s of slack
    # (a shared machine); if x's turn held the limit while the cap was full, y would
    # wait for x's nodes (0.6 s each: 3.6 s, then its own 1.5 s)
    assert span <= (30 + 6) * 0.05 + 1.5, span
    nodes = hx.inspect()["nodes"]
    gaps = [float(nodes[f"x{i + 1}"]["queued_at"]) - float(nodes[f"x{i}"]["finished_at"])
            for i in range(5)]
    print(f"x: from a node's end to the next one's release: {[round(g, 3) for g in gaps]}")
    # the cap freed, x's next node goes within a few intervals of the rate
    assert max(gaps) <= 0.25, gaps
    assert fair.flows.store.waiting("group:api") == 0


def test_parked_and_held_nodes_survive_a_killed_manager(
    fair: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    """The only --flows worker is killed (SIGKILL) while x is parked at the rate limit
    and y waits in it: a new one releases every node, once each."""
    worker_factory("tests.proj", env=FAIR, concurrency=2, queues=("celery", "single"))
    # the manager runs no task of its own (a task lost with it would wait for its lease)
    manager = worker_factory("tests.proj", extra_args=FLOWS, env=FAIR, concurrency=1,
                             queues=("nothing",))
    hx, hy = blocked_beside(fair, 4, 0.3, 20)
    parked = fair.flows.store.keys.fair_parked("group:api")
    wait_until(lambda: redis_db.client.zcard(parked) > 0, "x to be parked at the limit")
    manager.kill9()
    time.sleep(0.5)
    assert hy.state() != FlowState.SUCCEEDED
    worker_factory("tests.proj", extra_args=FLOWS, env=FAIR, concurrency=1,
                   queues=("nothing",))
    # a node the killed releaser had claimed goes again once its claim lease ends (15 s)
    assert hx.wait(timeout=45) == FlowState.SUCCEEDED
    assert hy.wait(timeout=45) == FlowState.SUCCEEDED
    assert set(run_counts(redis_db, hx.id).values()) == {1}
    assert len(run_counts(redis_db, hy.id)) == 20
    assert set(run_counts(redis_db, hy.id).values()) == {1}


def test_a_wait_queue_written_before_fair_share_still_drains(
    fair: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    """A registry written before fair share kept one wait queue per limiter: its
    members are released (or re-filed in the fair queues) by the new releaser."""
    keys = fair.flows.store.keys
    f = Flow("old")
    for i in range(8):
        f.add(fair.ident.si(i), id=f"o{i}", rate_limit="api")
    h = fair.flows.submit(f)  # no --flows worker yet: the refused nodes stay held
    client = redis_db.client
    entries = client.zrange(keys.fair_queue("group:api"), 0, -1)
    assert len(entries) == 7  # the first went out at once
    # what was written before: the members in one zset, none of the fair keys
    client.zadd(keys.wait_queue("group:api"), {e.split(b" ", 1)[1]: 0 for e in entries})
    client.delete(*keys.fair("group:api"))
    worker_factory("tests.proj", extra_args=FLOWS, env=FAIR, concurrency=2)
    assert h.wait(timeout=30) == FlowState.SUCCEEDED
    assert set(run_counts(redis_db, h.id).values()) == {1}
    assert len(run_counts(redis_db, h.id)) == 8
    assert client.zcard(keys.wait_queue("group:api")) == 0


def test_fair_share_on_redis_cluster(
    cluster: str, import_app: ImportApp, worker_factory: WorkerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {**FAIR, "FLOWS_TEST_REGISTRY": cluster, "FLOWS_TEST_REGISTRY_CLUSTER": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, env=env, concurrency=2)
    took, meanwhile, _ahead = small_behind_big(proj, 60, rate_limit="api")
    print(f"\ncluster: small flow {took:.3f} s, big-flow releases meanwhile: {meanwhile}")
    assert meanwhile <= 6, meanwhile


# -- the rotation itself, through admit.lua and fair_head.lua, without workers ----------

def _members(flows: Any) -> list[tuple[str, str]]:
    """(member, unit) of three nodes per flow, node n2 first in §7's order (longest
    path), then n0, then n1 (readiness)."""
    out = []
    for fid, unit in flows:
        for nid, path, ready in (("n0", 1, 1.0), ("n1", 1, 2.0), ("n2", 3, 3.0)):
            out.append((member_for(order_key(path, 0, ready), fid, nid, 1), unit))
    return out


def test_rotation_by_key_then_flow_then_order(fair: Any, redis_db: RedisDB) -> None:
    store = fair.flows.store
    limits = Limits(store, fair.flows.config)
    held = [Limiter("group:slow", interval=1000.0)]  # one release, then all wait
    limits.admit(held, member_for("0" * 20, "warm", "w", 1), "warm~w~1~x", "f|warm",
                 "warm")
    key = share_unit("a1", "tenant", "acme")
    assert key == share_unit("a2", "tenant", "acme") == "k|tenant|acme"
    flows = [("a1", key), ("b", share_unit("b")), ("a2", key)]
    for member, unit in _members(flows):
        assert not limits.admit(held, member, "t", unit, member.split("|")[1]).admitted
    assert store.waiting("group:slow") == 9
    # now every admission passes the rate: the order is the rotation's alone
    store.client.delete(store.keys.limiter_state("group:slow"))
    fast = [Limiter("group:slow", interval=0.000001)]
    order = []
    while (head := store.fair_head("group:slow")).member is not None:
        fid = head.member.split("|")[1]
        assert limits.admit(fast, head.member, "t", head.unit, fid).admitted
        order.append(f"{fid}.{head.member.split('|')[2]}")
    assert order == ["a1.n2", "b.n2", "a2.n2", "b.n0", "a1.n0", "b.n1", "a2.n0",
                     "a1.n1", "a2.n1"], order
    assert store.waiting("group:slow") == 0
    assert not store.client.exists(store.keys.fair_units("group:slow"))


def test_a_parked_flow_keeps_its_turn_and_gets_it_back(
    fair: Any, redis_db: RedisDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """x's node is refused by a full cap when its turn comes at the rate: x is parked
    there (y goes), its node passes the rate's order as soon as the cap frees, and a
    flow parked PARK_SECONDS gets its turn back by itself."""
    monkeypatch.setattr(services, "PARK_SECONDS", 0.3)
    store = fair.flows.store
    limits = Limits(store, fair.flows.config)
    slots = store.keys.limiter_state("queue:c")
    rate, cap = Limiter("group:r", interval=1000.0), Limiter("queue:c", cap=1)
    limits.admit([rate], member_for("0" * 20, "warm", "w", 1), "warm~w~1~x", "f|warm",
                 "warm")
    mx, mx2, my = (member_for(order_key(1, 0, ready), fid, nid, 1)
                   for fid, nid, ready in (("x", "n", 1.0), ("x", "n2", 1.5),
                                           ("y", "n", 2.0)))
    ux, uy = share_unit("x"), share_unit("y")
    assert limits.admit([rate, cap], mx, "x~n~1~a", ux, "x").refused_by == "group:r"
    assert limits.admit([rate, cap], mx2, "x~n2~1~a", ux, "x").refused_by == "group:r"
    assert limits.admit([rate], my, "y~n~1~a", uy, "y").refused_by == "group:r"
    assert store.fair_head("group:r").member == mx  # x's turn
    store.client.delete(store.keys.limiter_state("group:r"))
    fast = Limiter("group:r", interval=0.000001)
    store.client.zadd(slots, {"other~n~1~x": 1})  # the cap is full
    refused = limits.admit([fast, cap], mx, "x~n~1~a", ux, "x")
    assert (refused.refused_by, refused.wait) == ("queue:c", -1.0)
    assert store.fair_head("group:r").member == my  # x parked: y goes meanwhile
    assert store.client.zrange(store.keys.fair_parked("group:r"), 0, -1) == [b"f|x x"]
    store.client.delete(slots)  # the cap frees: x's node passes the rate's order
    assert limits.admit([fast, cap], mx, "x~n~1~a", ux, "x").admitted
    assert store.fair_head("group:r").member == my  # x was served: its next turn is last
    assert limits.admit([fast], my, "y~n~1~a", uy, "y").admitted
    assert store.fair_head("group:r").member == mx2
    # the cap is full again (mx holds its slot): x is parked with nothing else waiting
    assert limits.admit([fast, cap], mx2, "x~n2~1~a", ux, "x").refused_by == "queue:c"
    head = store.fair_head("group:r")
    assert head.member is None and head.wake is not None and head.wake <= 0.3
    time.sleep(0.35)
    assert store.fair_head("group:r").member == mx2  # parked too long: its turn back
    assert store.waiting("group:r") == 1


def test_a_flow_waiting_for_a_slower_rate_lets_the_others_go(
    fair: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    """x's nodes pass the shared 20/s limit (its flow's rate) and a 2/s limit of their
    own: while x waits for the slow one, the shared limit serves y, and x's nodes still
    go out at 2/s."""
    worker_factory("tests.proj", extra_args=FLOWS, env=FAIR, concurrency=2)
    x = Flow("x", rate_limit="api")
    for i in range(4):
        x.add(fair.ident.si(i), id=f"x{i}", rate_limit="2/s")
    y = Flow("y")
    for i in range(30):
        y.add(fair.add.si(i, 0), id=f"y{i}", rate_limit="api")
    hx, hy = fair.flows.submit(x), fair.flows.submit(y)
    assert hy.wait(timeout=30) == FlowState.SUCCEEDED
    assert hx.wait(timeout=30) == FlowState.SUCCEEDED
    span = max(released(hy).values()) - float(hy.inspect()["created_at"])
    xs = sorted(released(hx).values())
    print(f"\ny's 30 releases took {span:.2f} s beside x; x's gaps: "
          f"{[round(b - a, 3) for a, b in zip(xs, xs[1:], strict=False)]}")
    # y's 30 and x's few at 20/s, 0.8 s of slack; if x's turn held the shared limit
    # while x waits for its own, y would go at x's pace (seen: 2.9 s)
    assert span <= (30 + 4) * 0.05 + 0.8, span
    assert max(b - a for a, b in zip(xs, xs[1:], strict=False)) <= 0.5 + 0.15
