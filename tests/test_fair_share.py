"""Fair share (SPEC sections 7 and 12): a rate limit or queue cap serves its waiting
flows round-robin, by concurrency key then by flow, on real Redis and real workers.

The figures asserted are counts of releases (the ``queued_at`` Redis times of the
nodes), not wall-clock bounds of this machine."""

from __future__ import annotations

import json
from typing import Any

import pytest

from celery_flows import Flow, FlowState
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS

FAIR = {"FLOWS_TEST_RATE_LIMITS": json.dumps({"api": "20/s"}),
        "FLOWS_TEST_QUEUE_LIMITS": json.dumps({"capped": 2, "single": 1})}


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


def test_small_flow_is_not_starved_behind_a_backlog_of_its_rate_limit(
    fair: Any, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    """300 nodes of one flow and 5 of another share a 20/s limit, the big flow first:
    the small one is out within about one round (2 x 5 releases), not after the 300."""
    worker_factory("tests.proj", extra_args=FLOWS, env=FAIR, concurrency=2)
    big = Flow("big")
    for i in range(300):
        big.add(fair.ident.si(i), id=f"b{i}", rate_limit="api")
    hb = fair.flows.submit(big)
    small = Flow("small")
    for i in range(5):
        small.add(fair.ident.si(i), id=f"s{i}", rate_limit="api")
    hs = fair.flows.submit(small)
    assert hs.wait(timeout=40) == FlowState.SUCCEEDED
    doc = hs.inspect()
    start, last = float(doc["created_at"]), max(released(hs).values())
    big_times = released(hb)
    ahead = before(big_times, last) - before(big_times, start)
    print(f"\nsmall flow: {last - start:.3f} s from submit to its last release; big-flow "
          f"releases meanwhile: {ahead}, before it in all: {before(big_times, last)} of 300")
    print(_debug_order(hb, hs))
    assert ahead <= 6, ahead
    fair.flows.cancel(hb.id)


def _debug_order(hb: Any, hs: Any) -> str:
    rel = [(t, n) for n, t in released(hb).items()] + [(t, n) for n, t in released(hs).items()]
    rel.sort()
    return " ".join(n for _t, n in rel[:30])
