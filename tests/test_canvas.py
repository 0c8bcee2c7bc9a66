"""Flow.from_canvas: the node graph a canvas becomes, and, on a real prefork worker, the
same results as Celery 5.7 running that canvas itself."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
from celery import chain, chord, group
from celery.canvas import Signature, _chain

from celery_flows import Flow, FlowDefinitionError, FlowState
from celery_flows.define.canvas import add_canvas
from celery_flows.define.records import Ref
from tests.conftest import ImportApp, RedisDB, WorkerFactory


@pytest.fixture
def proj(import_app: ImportApp) -> ModuleType:
    return import_app("tests.proj")


def graph(proj: ModuleType, canvas: Any) -> dict[str, tuple[list[str], Ref, tuple[Any, ...]]]:
    """{node id: (after, input ref, stored args)} of the compiled flow."""
    compiled = Flow.from_canvas(canvas).compile(proj.app, proj.flows.config)
    return {
        nid: (rec["after"], rec["input"], compiled.calls[nid][0])
        for nid, rec in compiled.records.items()
    }


def value(ref: Ref, results: dict[str, Any]) -> Any:
    """What a node given ``ref`` as input would receive, from the flow's results."""
    if isinstance(ref, str):
        return results[ref]
    if isinstance(ref, dict):
        return {k: value(r, results) for k, r in ref["map"].items()}
    assert ref is not None
    return [value(r, results) for r in ref]


# -- the node graph (no worker) ---------------------------------------------------------


def test_chain_passes_each_result_to_the_next_step(proj: ModuleType) -> None:
    g = graph(proj, chain(proj.add.s(1, 2), proj.add.s(3), proj.mul.s(2)))
    assert g == {
        "add": ([], None, (1, 2)),
        "add-2": (["add"], "add", (3,)),
        "mul": (["add-2"], "add-2", (2,)),
    }


def test_group_in_chain_fans_out_then_in(proj: ModuleType) -> None:
    g = graph(proj, proj.add.s(1, 1) | group(proj.add.s(10), proj.mul.s(20)) | proj.collect.s())
    assert g == {
        "add": ([], None, (1, 1)),
        "add-2": (["add"], "add", (10,)),
        "mul": (["add"], "add", (20,)),
        "collect": (["add-2", "mul"], ["add-2", "mul"], ()),
    }


def test_one_task_chord_body_gets_a_list_but_one_member_group_in_chain_is_unrolled(
    proj: ModuleType,
) -> None:
    assert graph(proj, chord([proj.add.s(1, 1)], proj.collect.s()))["collect"] == (
        ["add"], ["add"], ())
    g = graph(proj, proj.add.s(1, 1) | group(proj.add.s(5)) | proj.collect.s())
    assert g["add-2"] == (["add"], "add", (5,))
    assert g["collect"] == (["add-2"], "add-2", ())
    # Celery also unrolls it when running a chain built without `|`...
    raw = _chain(proj.add.s(1, 1), group([proj.add.s(5)]), proj.collect.s())
    assert graph(proj, raw)["collect"] == (["add-2"], "add-2", ())
    # ...whereas `group | task` builds a chord in Celery, so the list stays.
    assert graph(proj, group(proj.add.s(1, 1)) | proj.collect.s())["collect"][1] == ["add"]


def test_immutable_step_runs_after_its_predecessor_without_its_result(
    proj: ModuleType,
) -> None:
    g = graph(proj, chain(proj.add.s(1, 1), proj.ident.si(7), proj.add.s(1)))
    assert g["ident"] == (["add"], None, (7,))
    assert g["add-2"] == (["ident"], "ident", (1,))


def test_chord_in_chain_header_gets_the_preceding_result(proj: ModuleType) -> None:
    g = graph(proj, proj.ident.s(1) | chord([proj.add.s(10), proj.mul.s(10)], proj.collect.s())
              | proj.tsum.s())
    assert g["add"] == (["ident"], "ident", (10,))
    assert g["mul"] == (["ident"], "ident", (10,))
    assert g["collect"] == (["add", "mul"], ["add", "mul"], ())
    assert g["tsum"] == (["collect"], "collect", ())


def test_group_followed_by_group_gives_every_second_member_the_list(proj: ModuleType) -> None:
    g = graph(proj, group(proj.add.s(1, 1), proj.add.s(2, 2))
              | group(proj.collect.s(), proj.tsum.s()))
    assert g["collect"] == (["add", "add-2"], ["add", "add-2"], ())
    assert g["tsum"] == (["add", "add-2"], ["add", "add-2"], ())


def test_nested_groups_are_flattened_reversed_where_celery_freezes_them(
    proj: ModuleType,
) -> None:
    # Celery's group._freeze_unroll pushes nested members back with extendleft.
    g = graph(proj, chord([group(proj.add.s(1, 0), proj.add.s(2, 0)), proj.add.s(3, 0)],
                          proj.collect.s()))
    body_input = g["collect"][1]
    assert isinstance(body_input, list)
    assert [g[n][2] for n in body_input] == [(2, 0), (1, 0), (3, 0)]
    # A group applied on its own keeps them in order.
    f = Flow()
    out = add_canvas(f, group(group(proj.add.s(1, 0), proj.add.s(2, 0)), proj.add.s(3, 0)))
    assert out.result == ["add", "add-2", "add-3"]


def test_json_round_tripped_canvas_converts_like_the_original(proj: ModuleType) -> None:
    canvas = chain(proj.add.s(1, 1), group(proj.add.s(1), chain(proj.add.s(2), proj.mul.s(3))),
                   proj.collect.s())
    assert graph(proj, json.loads(json.dumps(canvas))) == graph(proj, canvas)


def test_conversion_leaves_the_canvas_untouched(proj: ModuleType) -> None:
    canvas = chord([chain(proj.add.s(1, 1), proj.mul.s(3)), proj.add.s(2, 2)],
                   proj.collect.s())
    before = json.dumps(canvas, sort_keys=True)
    Flow.from_canvas(canvas)
    assert json.dumps(canvas, sort_keys=True) == before


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: chain(p.add.s(1, 1), p.add.s(2).set(countdown=5)), "countdown"),
        (lambda p: chain(p.add.s(1, 1), p.add.s(2)).set(link_error=p.ident.s()), "link_error"),
        (lambda p: group(p.add.s(1, 1), p.add.s(2, 2)).set(eta=1), "eta"),
        (lambda p: chord([p.add.s(1, 1)], p.collect.s().set(link=p.ident.s())), "link"),
        (lambda p: p.ident.map([1, 2]), "built-in task"),
        (lambda p: p.add.chunks([(1, 2)], 1), "built-in task"),
        (lambda p: group([]), "no task"),
        (lambda p: 42, "expected a Celery signature"),
    ],
)
def test_refused_canvases(proj: ModuleType, make: Callable[[ModuleType], Any],
                          message: str) -> None:
    with pytest.raises(FlowDefinitionError, match=message):
        Flow.from_canvas(make(proj))


def test_already_applied_canvas_is_refused_for_its_task_ids(proj: ModuleType) -> None:
    canvas = chain(proj.add.s(1, 1), proj.add.s(2))
    canvas.freeze()
    with pytest.raises(FlowDefinitionError, match="task_id.*fresh"):
        Flow.from_canvas(canvas)


# -- same results as Celery on a real worker ------------------------------------------


@dataclass
class Case:
    name: str
    make: Callable[[ModuleType], Signature]
    nodes: int


CASES = [
    Case("chain of 3", lambda p: chain(p.add.s(1, 2), p.add.s(3), p.mul.s(2)), 3),
    Case("a | group(b, c) | d",
         lambda p: p.add.s(1, 1) | group(p.add.s(10), p.mul.s(20)) | p.collect.s(), 4),
    Case("chord of chains",
         lambda p: chord([chain(p.add.s(1, 1), p.mul.s(3)), chain(p.add.s(2, 2), p.mul.s(5))],
                         p.collect.s()), 5),
    Case("one-task chord", lambda p: chord([p.add.s(1, 1)], p.collect.s()), 2),
    Case("one-member group in a chain",
         lambda p: p.add.s(1, 1) | group(p.add.s(5)) | p.collect.s(), 3),
    Case("one-member group ending a chain", lambda p: chain(p.add.s(1, 1), group(p.add.s(5))),
         2),
    Case("group of chains then a task",
         lambda p: group(chain(p.add.s(1, 1), p.mul.s(2)), chain(p.add.s(2, 2), p.mul.s(3)))
         | p.collect.s(), 5),
    Case("chain with .si() step", lambda p: chain(p.add.s(1, 1), p.ident.si(7), p.add.s(1)), 3),
    Case("nested chain in chain",
         lambda p: chain(p.add.s(1, 1), chain(p.add.s(2), chain(p.mul.s(3), p.add.s(4))),
                         p.mul.s(10)), 5),
    Case("group then group",
         lambda p: group(p.add.s(1, 1), p.add.s(2, 2)) | group(p.collect.s(), p.collect.s(9)),
         4),
    Case("chord with chain body",
         lambda p: chord([p.add.s(1, 1), p.add.s(2, 2)], chain(p.tsum.s(), p.mul.s(3))), 4),
    Case("chord with group body",
         lambda p: chord([p.add.s(1, 1), p.add.s(2, 2)], group(p.collect.s(), p.tsum.s())), 4),
    Case("task | chord | task",
         lambda p: chain(p.add.s(1, 1), chord([p.add.s(10), p.mul.s(10)], p.collect.s()),
                         p.collect.s()), 5),
    Case("nested groups in a chord header",
         lambda p: chord([p.add.s(0, 0), group(p.add.s(1, 0), p.add.s(2, 0), p.add.s(3, 0)),
                          p.add.s(4, 0)], p.collect.s()), 6),
    Case("nested groups in a group applied alone",
         lambda p: group(group(p.add.s(1, 0), p.add.s(2, 0)), p.add.s(3, 0)), 3),
    Case("nested groups ending a chain",
         lambda p: chain(p.add.s(0, 0), group(group(p.add.s(1), p.add.s(2)), p.add.s(3))), 4),
    Case("group first in a chain", lambda p: group(p.add.s(1, 1), p.add.s(2, 2)) | p.tsum.s(),
         3),
    Case("group first in a chain, with partial args",
         lambda p: chain(group(p.add.s(1), p.add.s(2)), p.tsum.s()).clone(args=(10,)), 3),
    Case("chord with partial args",
         lambda p: chord([p.add.s(1), p.add.s(2)], p.collect.s()).clone(args=(10,)), 3),
    Case("chord with an empty header", lambda p: chord([], p.collect.s()), 1),
    Case("group of one chain ending in a group",
         lambda p: group(chain(p.add.s(1, 1), group(p.add.s(1), p.add.s(2)))), 3),
    Case("head group unrolled twice",
         lambda p: _chain(group([group([p.add.s(1, 1)])]), p.collect.s()), 2),
]


def test_flows_match_celery_on_a_prefork_worker(
    proj: ModuleType, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    worker_factory("tests.proj", extra_args=["--flows"], concurrency=4)
    for case in CASES:
        try:
            celery_result = case.make(proj).apply_async().get(timeout=20)
        except Exception as exc:
            pytest.fail(f"{case.name}: Celery itself did not run the canvas: {exc!r}")

        flow = Flow.from_canvas(case.make(proj), name="canvas")
        # The same conversion again (ids are deterministic) says where the canvas ends.
        out = add_canvas(Flow(), case.make(proj))
        handle = proj.flows.submit(flow)
        assert handle.wait(timeout=20) == FlowState.SUCCEEDED, case.name
        results = handle.results()
        assert len(results) == case.nodes, f"{case.name}: {sorted(results)}"
        if isinstance(out.result, str):
            # A single final node: nothing else is left without a dependent.
            assert out.after == [out.result], case.name
        assert value(out.result, results) == celery_result, (
            f"{case.name}: flow gave {value(out.result, results)!r}, "
            f"Celery gave {celery_result!r}"
        )
        runs = Counter(r.decode().split("|")[1] for r in redis_db.client.lrange("runs", 0, -1)
                       if r.decode().startswith(handle.id + "|"))
        assert runs == Counter({nid: 1 for nid in results}), case.name
