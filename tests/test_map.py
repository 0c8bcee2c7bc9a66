"""Maps (SPEC section 12): ``f.map(sig, over=node)`` runs one item per element of
``over``'s list result, and its dependents receive the items' results in order."""

from __future__ import annotations

from celery_flows import Flow, FlowState
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, run_counts


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
