"""The timed rows: each a flow and its plain Celery counterpart on the same worker,
from building the canvas or flow to holding the checked final value (T1, T2, T3,
submit+wait, big vs small, cost per node), and the producer-only add_bulk row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery import chain, chord

from benchmarks.harness import Bench, Figure, ratio
from celery_flows import Flow, FlowState

#: T1 measures its floor (bench_app.trip) up to this length, T2 up to this width:
#: past them the flows are well below Celery and a floor would only lengthen the run
FLOOR_MAX_T1, FLOOR_MAX_T2 = 100, 1000


def finish(handle: Any, timeout: float) -> dict[str, Any]:
    state = handle.wait(timeout=timeout)
    assert state is FlowState.SUCCEEDED, f"flow {handle.id} ended {state.value}"
    results: dict[str, Any] = handle.results()
    return results


def chain_flow(bench: Bench, n: int, name: str = "bench-linear") -> tuple[Flow, str]:
    """N ``inc`` nodes, each after the previous one: the flow twin of ``chain``."""
    f = Flow(name)
    prev = f.add(bench.tasks.inc.s(0), id="n0")
    for i in range(1, n):
        prev = f.add(bench.tasks.inc.s(), id=f"n{i}", after=[prev])
    return f, prev.id


def independent_flow(bench: Bench, n: int, task: Any = None, name: str = "bench-wide",
                     fid: str | None = None) -> Flow:
    f = Flow(name, id=fid)
    task = task or bench.tasks.noop
    for i in range(n):
        f.add(task.si(), id=f"n{i}")
    return f


def linear(bench: Bench, config: str, n: int, rounds: int) -> Figure:
    def body(fig: Figure) -> None:
        inc, t = bench.tasks.inc, bench.timeout

        def canvas(task: Any) -> Callable[[], None]:
            def run() -> None:
                sig = chain(task.s(0), *(task.s() for _ in range(n - 1)))
                assert sig.apply_async().get(timeout=t) == n
            return run

        def flows() -> None:
            f, last = chain_flow(bench, n)
            assert finish(bench.flows.submit(f), t)[last] == n

        sides = {"celery": canvas(inc), "flows": flows}
        if n <= FLOOR_MAX_T1:
            sides["floor"] = canvas(bench.tasks.inc_trips)
        bench.alternate(fig, sides, rounds)
        ratio(fig)

    fig = Figure("T1", f"{config} N={n}", "flows/chain <= 1.0", 1.0)
    return bench.guarded(fig, body)


def fanin(bench: Bench, config: str, w: int, rounds: int) -> Figure:
    def body(fig: Figure) -> None:
        inc, tsum, t = bench.tasks.inc, bench.tasks.tsum, bench.timeout
        want = w * (w + 1) // 2

        def canvas(part: Any, body: Any) -> Callable[[], None]:
            def run() -> None:
                assert chord([part.s(i) for i in range(w)])(body.s()).get(timeout=t) == want
            return run

        celery = canvas(inc, tsum)

        def flows() -> None:
            f = Flow("bench-fanin")
            parts = [f.add(inc.s(i), id=f"p{i}") for i in range(w)]
            f.add(tsum.s(), id="sum", after=list(parts))
            assert finish(bench.flows.submit(f), t)["sum"] == want

        sides = {"celery": celery, "flows": flows}
        if w <= FLOOR_MAX_T2:
            sides["floor"] = canvas(bench.tasks.inc_trips, bench.tasks.tsum_trips)
        bench.alternate(fig, sides, rounds)
        ratio(fig)

    fig = Figure("T2", f"{config} W={w}", "flows/chord <= 0.8", 0.8)
    return bench.guarded(fig, body)


def diamonds(bench: Bench, count: int, rounds: int) -> Figure:
    def body(fig: Figure) -> None:
        inc, tsum, t = bench.tasks.inc, bench.tasks.tsum, bench.timeout

        def canvas(task: Any) -> Callable[[], None]:
            def run() -> None:
                pending = [task.apply_async((i,)) for i in range(4 * count)]
                assert [r.get(timeout=t) for r in pending] == list(range(1, 4 * count + 1))
            return run

        celery = canvas(inc)

        def flows() -> None:
            handles = []
            for i in range(count):
                f = Flow("bench-diamond")
                a = f.add(inc.s(i), id="a")
                b = f.add(inc.s(), id="b", after=[a])
                c = f.add(inc.s(), id="c", after=[a])
                f.add(tsum.s(), id="d", after=[b, c])
                handles.append(bench.flows.submit(f))
            for i, h in enumerate(handles):
                assert finish(h, t)["d"] == 2 * i + 4

        bench.alternate(fig, {"celery": celery, "flows": flows,
                              "floor": canvas(bench.tasks.inc_trips)}, rounds)
        ratio(fig)

    fig = Figure("T3", f"{count} diamonds vs {4 * count} apply_async",
                 "flows/celery <= 1.15", 1.15)
    return bench.guarded(fig, body)


def submit_wait(bench: Bench, count: int, rounds: int) -> Figure:
    def body(fig: Figure) -> None:
        inc, t = bench.tasks.inc, bench.timeout
        calls: dict[str, list[float]] = {"submit": [], "delay": []}

        def canvas(task: Any, name: str | None) -> Callable[[], None]:
            def run() -> None:
                spent = 0.0
                for i in range(count):
                    started = time.perf_counter()
                    r = task.delay(i)
                    spent += time.perf_counter() - started
                    assert r.get(timeout=t) == i + 1
                if name:
                    calls[name].append(spent / count)
            return run

        celery = canvas(inc, "delay")

        def flows() -> None:
            spent = 0.0
            for i in range(count):
                f = Flow("bench-one")
                f.add(inc.s(i), id="inc")
                started = time.perf_counter()
                h = bench.flows.submit(f)
                spent += time.perf_counter() - started
                assert finish(h, t)["inc"] == i + 1
            calls["submit"].append(spent / count)

        bench.alternate(fig, {"celery": celery, "flows": flows,
                              "floor": canvas(bench.tasks.inc_trips, None)}, rounds)
        ratio(fig)
        # the warm-up round is the first of each list
        fig.extra |= {name: {"ms_per_call_median": 1e3 * sorted(v[1:])[len(v[1:]) // 2],
                             "rounds_s": v[1:]} for name, v in calls.items()}

    fig = Figure("submit+wait", f"{count} sequential one-node flows vs delay+get",
                 "flows/celery <= 1.2", 1.2)
    return bench.guarded(fig, body)


def cost_sides(bench: Bench, size: int, submitted: Callable[[], None] | None = None
               ) -> dict[str, Callable[[], None]]:
    """The sides of the big vs small and cost-per-node rows at ``size`` nodes: one flow,
    size/10 flows of 10, ``size`` bare ``apply_async`` and the floor's. ``submitted``
    is called when a side has queued everything and starts waiting (cpu_split.py)."""
    t = bench.timeout
    mark = submitted or (lambda: None)

    def one_flow() -> None:
        h = bench.flows.submit(independent_flow(bench, size))
        mark()
        assert h.wait(timeout=t) is FlowState.SUCCEEDED

    def many_flows() -> None:
        hs = [bench.flows.submit(independent_flow(bench, 10, name="bench-ten"))
              for _ in range(size // 10)]
        mark()
        for h in hs:
            assert h.wait(timeout=t) is FlowState.SUCCEEDED

    def canvas(task: Any) -> Callable[[], None]:
        def run() -> None:
            pending = [task.apply_async() for _ in range(size)]
            mark()
            # join_native: one pub/sub wait for the whole set, not `size` round trips
            bench.app.ResultSet(pending).join_native(timeout=t)
        return run

    return {"one_flow": one_flow, "many_flows": many_flows,
            "celery": canvas(bench.tasks.noop), "floor": canvas(bench.tasks.noop_trips)}


def big_small(bench: Bench, nodes: int, rounds: int) -> list[Figure]:
    """One flow of ``nodes`` independent nodes, nodes/10 flows of 10, and ``nodes``
    bare ``apply_async`` then waiting for all: the three sides alternate."""
    many = nodes // 10
    big = Figure("big vs small", f"1 x {nodes} vs {many} x 10", "one/many <= 1.2", 1.2)
    per_many = Figure("cost per node", f"{many} flows x 10 vs {nodes} apply_async",
                      "many flows/celery <= 1.3", 1.3)
    per_one = Figure("cost per node", f"1 flow x {nodes} vs {nodes} apply_async",
                     "one flow/celery <= 1.3", 1.3)

    def body(fig: Figure) -> None:
        # The warm-up is one tenth of the size: it only has to load code and scripts.
        for name, fn in cost_sides(bench, max(10, nodes // 10)).items():
            bench.timed(fn, f"big vs small warm-up ({name})")
        bench.alternate(fig, cost_sides(bench, nodes), rounds)

    bench.guarded(big, body)
    for fig in (per_many, per_one):
        fig.sides, fig.error = big.sides, big.error
    if big.error is None:
        ratio(big, "one_flow", "many_flows")
        ratio(per_many, "many_flows", "celery")
        ratio(per_one, "one_flow", "celery")
        big.extra.pop("floor", None)  # one flow against many: no Celery side
    return [big, per_many, per_one]


def add_bulk(bench: Bench, count: int, rounds: int) -> Figure:
    """Producer call time only, with no worker consuming: ``flows.add_bulk`` of
    ``count`` five-node chains vs ``count`` root ``apply_async`` calls. The flows and
    signatures are built before the clock starts; the database is flushed after each
    round so every round starts empty."""

    def body(fig: Figure) -> None:
        inc = bench.tasks.inc

        def celery() -> float:
            sigs = [inc.s(i) for i in range(count)]
            started = time.perf_counter()
            for s in sigs:
                s.apply_async()
            spent = time.perf_counter() - started
            bench.client.flushdb()
            return spent

        def flows() -> float:
            batch = [chain_flow(bench, 5, name="bench-bulk")[0] for _ in range(count)]
            started = time.perf_counter()
            handles = bench.flows.add_bulk(batch)
            spent = time.perf_counter() - started
            assert len(handles) == count
            bench.client.flushdb()
            return spent

        bench.alternate(fig, {"celery": celery, "flows": flows}, rounds)
        ratio(fig)

    fig = Figure("add_bulk", f"{count} five-node flows vs {count} apply_async",
                 "flows/celery <= 1.5", 1.5)
    return bench.guarded(fig, body)
