"""The fair-share row (issue #13, SPEC section 12): how long a small flow waits behind
a large backlog that shares its rate limit.

One flow of ``big`` ``noop`` nodes is submitted, then one of ``small``, all under the
group ``fair`` of ``bench_app`` (20/s). The figure is the small flow's wait, from its
``submit()`` to its ``wait()`` returning; beside it, how many of the big flow's nodes
the limiter released meanwhile. Round-robin serves the two flows in turn, so the small
flow is done in about 2 x ``small`` releases; one queue in §7's order alone (before
fair share) would release the whole backlog first: ``big`` / 20 s (15 s at 300). The
big flow is cancelled after each round and its held nodes drained before the next.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.harness import Bench, Figure
from celery_flows import Flow, FlowState

RATE = 20.0  # bench_app's flows_rate_limits["fair"]
LIMITER = "group:fair"


def _flow(bench: Bench, name: str, n: int) -> Flow:
    f = Flow(name)
    for i in range(n):
        f.add(bench.tasks.noop.si(), id=f"n{i}", rate_limit="fair")
    return f


def _released(handle: object) -> list[float]:
    nodes = handle.inspect()["nodes"]  # type: ignore[attr-defined]
    return [float(n["queued_at"]) for n in nodes.values() if n.get("queued_at")]


def fair_wait(bench: Bench, big: int, small: int, rounds: int) -> Figure:
    fig = Figure("fair share", f"{small}-node flow behind {big} nodes at 20/s",
                 "small flow's wait <= 1 s", 1.0, unit="s")
    fig.extra.update(backlog_s=big / RATE, one_round_s=2 * small / RATE, meanwhile=[])

    def one() -> float:
        hb = bench.flows.submit(_flow(bench, "fair-big", big))
        started = time.perf_counter()
        hs = bench.flows.submit(_flow(bench, "fair-small", small))
        assert hs.wait(timeout=bench.timeout) is FlowState.SUCCEEDED
        took = time.perf_counter() - started
        created = float(hs.inspect()["created_at"])
        last = max(_released(hs))
        fig.extra["meanwhile"].append(
            sum(1 for t in _released(hb) if created < t < last))
        if hb.state() is FlowState.RUNNING:
            bench.flows.cancel(hb.id)
        # the releaser drops the cancelled flow's held nodes before the next round
        deadline = time.monotonic() + 60
        while bench.flows.store.waiting(LIMITER) and time.monotonic() < deadline:
            time.sleep(0.05)
        return took

    def body(f: Figure) -> None:
        bench.alternate(f, {"small_wait": one}, rounds)
        del f.extra["meanwhile"][0]  # the warm-up's
        f.value = statistics.median(f.sides["small_wait"])
        f.extra["meanwhile_median"] = statistics.median(f.extra["meanwhile"])

    return bench.guarded(fig, body)
