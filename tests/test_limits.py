"""Rate limits, queue caps and release order (SPEC section 7) on real workers."""

from __future__ import annotations

import time
from typing import Any

from celery_flows import Flow, FlowState
from celery_flows.testing import wait_until
from tests.conftest import RedisDB, WorkerFactory
from tests.helpers import FLOWS, LIMITS, cli, run_counts


def max_in_window(times: list[float], window: float) -> int:
    """The most releases in any half-open window [t, t + window)."""
    times = sorted(times)
    best, j = 0, 0
    for i in range(len(times)):
        while times[i] - times[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_group_rate_limit_shared_by_two_flows(
    limited: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    worker_factory("tests.proj", extra_args=FLOWS, env=LIMITS, concurrency=2)
    worker_factory("tests.proj", extra_args=FLOWS, env=LIMITS, concurrency=2)
    handles = []
    for name in ("one", "two"):
        f = Flow(name)
        for i in range(20):
            f.add(limited.ident.si(i), id=f"n{i}", rate_limit="api")
        handles.append(limited.flows.submit(f))
    for h in handles:
        assert h.wait(timeout=30) == FlowState.SUCCEEDED
    times = [n["queued_at"] for h in handles for n in h.inspect()["nodes"].values()]
    assert len(times) == 40
    assert max_in_window(times, 1.0) <= 10
    span = max(times) - min(times)
    print(f"\n40 releases under 10/s took {span:.2f} s")
    assert 3.8 <= span < 5.0
    for h in handles:
        assert set(run_counts(redis_db, h.id).values()) == {1}


def test_flow_and_task_rate_limits(
    limited: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    worker_factory("tests.proj", extra_args=FLOWS, env=LIMITS, concurrency=2)
    f = Flow("flow-limited", rate_limit="20/s")
    for i in range(10):
        f.add(limited.ident.si(i), id=f"f{i}")
    g = Flow("task-limited")
    for i in range(10):
        g.add(limited.mul.si(i, 1), id=f"t{i}", rate_limit="10/s")
    hf, hg = limited.flows.submit(f), limited.flows.submit(g)
    assert hf.wait(timeout=30) == FlowState.SUCCEEDED
    assert hg.wait(timeout=30) == FlowState.SUCCEEDED
    ft = [n["queued_at"] for n in hf.inspect()["nodes"].values()]
    gt = [n["queued_at"] for n in hg.inspect()["nodes"].values()]
    assert max_in_window(ft, 1.0) <= 20 and max_in_window(ft, 0.5) <= 10
    assert max_in_window(gt, 1.0) <= 10
    assert max(gt) - min(gt) >= 0.85  # 10 releases at 10/s: 0.9 s from first to last


def test_queue_cap_bounds_concurrency_across_workers(
    limited: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    worker_factory("tests.proj", extra_args=FLOWS, env=LIMITS, concurrency=2,
                   queues=("celery", "capped"))
    worker_factory("tests.proj", extra_args=FLOWS, env=LIMITS, concurrency=2,
                   queues=("celery", "capped"))
    handles = []
    for k in range(2):
        f = Flow("capped", id=f"capped-{k}")
        for i in range(6):
            f.add(limited.occupy.si(0.4, i), id=f"c{i}", queue="capped")
        handles.append(limited.flows.submit(f))
    for h in handles:
        assert h.wait(timeout=60) == FlowState.SUCCEEDED
        assert set(run_counts(redis_db, h.id).values()) == {1}
        assert len(run_counts(redis_db, h.id)) == 6
    levels = [int(x) for x in redis_db.client.lrange("levels", 0, -1)]
    assert max(levels) == 2, levels
    slots = limited.flows.store.keys.limiter_state("queue:capped")
    assert redis_db.client.zcard(slots) == 0, "every slot is freed"


def test_release_order_longest_path_then_priority_then_readiness(
    limited: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    worker_factory("tests.proj", extra_args=FLOWS, env=LIMITS, concurrency=2,
                   queues=("celery", "single"))
    blocker = Flow("blocker")
    blocker.add(limited.wait_for_key.si("unblock"), id="blocker", queue="single")
    hb = limited.flows.submit(blocker)
    wait_until(lambda: hb.node_states()["blocker"] == "running", "the blocker to run")
    deep = Flow("deep")
    d = deep.add(limited.occupy.si(0.1, "deep"), id="deep", queue="single", priority=9)
    prev = d
    for i in range(3):
        prev = deep.add(limited.ident.si(i), id=f"tail{i}", after=[prev])
    hd = limited.flows.submit(deep)
    flat = Flow("flat")
    for nid, prio in (("p9", 9), ("p5", 5), ("p0", 0)):
        flat.add(limited.occupy.si(0.1, nid), id=nid, queue="single", priority=prio)
    hf = limited.flows.submit(flat)
    time.sleep(0.05)
    late = Flow("late")
    late.add(limited.occupy.si(0.1, "late"), id="late0", queue="single", priority=0)
    hl = limited.flows.submit(late)
    time.sleep(0.5)
    doc = hf.inspect()["nodes"]["p0"]
    assert doc["state"] == "scheduled" and "queue:single" in doc["waiting_for"]
    redis_db.client.set("unblock", 1)
    for h in (hb, hd, hf, hl):
        assert h.wait(timeout=30) == FlowState.SUCCEEDED
    released = {nid: n["queued_at"] for h in (hd, hf, hl)
                for nid, n in h.inspect()["nodes"].items() if nid in
                ("deep", "p9", "p5", "p0", "late0")}
    order = sorted(released, key=lambda n: released[n])
    assert order == ["deep", "p0", "late0", "p5", "p9"], released


def test_held_node_survives_a_manager_restart_and_runs_once(
    limited: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    worker_factory("tests.proj", env=LIMITS, concurrency=2, queues=("single",))
    manager = worker_factory("tests.proj", extra_args=FLOWS, env=LIMITS, concurrency=1)
    f = Flow("held")
    b = f.add(limited.wait_for_key.si("let-go"), id="blocker", queue="single")
    f.add(limited.occupy.si(0.05, "held"), id="held", queue="single")
    f.add(limited.ident.si("after"), id="after", after=[b])
    h = limited.flows.submit(f)
    wait_until(lambda: h.node_states()["blocker"] == "running", "the blocker to run")
    time.sleep(0.3)
    assert h.node_states()["held"] == "scheduled"
    manager.stop()
    worker_factory("tests.proj", extra_args=FLOWS, env=LIMITS, concurrency=1)
    redis_db.client.set("let-go", 1)
    assert h.wait(timeout=30) == FlowState.SUCCEEDED
    assert run_counts(redis_db, h.id) == {"blocker": 1, "held": 1, "after": 1}


def test_retries_are_held_in_redis_and_pass_the_limit_again(
    limited: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    worker_factory("tests.proj", extra_args=FLOWS, env=LIMITS, concurrency=2)
    f = Flow("retry-limited")
    f.add(limited.flaky_limited.si(2), id="flaky", rate_limit="five")
    h = limited.flows.submit(f)
    assert h.wait(timeout=30) == FlowState.SUCCEEDED
    node = h.inspect()["nodes"]["flaky"]
    assert node["retries"] == 2 and node["attempts"] == 1
    assert h.results()["flaky"] == 2
    assert run_counts(redis_db, h.id)["flaky"] == 3
    # the limiter saw every release: three at 5/s leave it at least 0.4 s ahead
    state = limited.flows.store.keys.limiter_state("group:five")
    assert redis_db.client.get(state) is not None


def test_stats_and_inspect_show_limits(
    limited: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    worker_factory("tests.proj", extra_args=FLOWS, env=LIMITS, concurrency=1,
                   queues=("celery", "single"))
    f = Flow("stats")
    f.add(limited.wait_for_key.si("stats-go"), id="busy", queue="single")
    f.add(limited.ident.si(1), id="waits", queue="single")
    h = limited.flows.submit(f)
    wait_until(lambda: h.node_states()["busy"] == "running", "busy to run")
    time.sleep(0.3)
    out = cli("stats", broker=redis_db.celery_url, env=LIMITS)
    assert out.returncode == 0, out.stderr
    assert "single: 1/1" in out.stdout
    assert "running: 1" in out.stdout
    text = cli("inspect", h.id, broker=redis_db.celery_url, env=LIMITS)
    assert "queue:single" in text.stdout
    redis_db.client.set("stats-go", 1)
    assert h.wait(timeout=30) == FlowState.SUCCEEDED


def test_a_slot_leaked_by_a_dead_publisher_is_collected(
    limited: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    """A process that took a queue slot and died before publishing leaks nothing: a
    --flows worker frees slots whose holder is not queued or running."""
    slots = limited.flows.store.keys.limiter_state("queue:single")
    redis_db.client.zadd(slots, {"gone-flow~n~1~abcd": time.time()})  # cap 1: full
    worker_factory("tests.proj", extra_args=FLOWS, env=LIMITS, queues=("celery", "single"))
    f = Flow("after-leak")
    f.add(limited.ident.si(1), id="a", queue="single")
    h = limited.flows.submit(f)
    assert h.wait(timeout=20) == FlowState.SUCCEEDED
    assert redis_db.client.zscore(slots, "gone-flow~n~1~abcd") is None
