"""User data round-trips exactly (SPEC section 2): arguments, results, flow and sub-flow
contexts and signature options come back equal to ``loads(dumps(x))`` under the app's
serializer, dict key order, big integers and empty containers included, with real
workers and in eager mode."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kombu.serialization import dumps, loads

from celery_flows import Flow, FlowState, FlowStateError
from tests.conftest import ImportApp, RedisDB, WorkerFactory

BIG = 98765432109876543  # beyond 2**53: a double cannot hold it
DATA: dict[str, Any] = {
    "zeta": BIG,
    "neg": -(2**63) + 1,
    "empty_list": [],
    "empty_dict": {},
    "unicode": "h\u00e9 \u2713 \U0001d11e \U0001f600",
    "nested": {"z": [1, {"y": [], "x": {}}], "a": [[]], "m": {"q": 2, "b": 1}},
    "alpha": 1.5,
    "none": None,
}
SUB_CONTEXT: dict[str, Any] = {"sub_big": BIG, "sub_empty": [], "zeta": {"over": []}}
DEEP_CONTEXT: dict[str, Any] = {"deep": [{}], "sub_big": -BIG}
ARGS: tuple[Any, ...] = (BIG, [], {}, "\U0001f600", {"b": [], "a": {"d": 1, "c": BIG}})
KWARGS: dict[str, Any] = {"zz": [], "aa": {}, "big": BIG, "text": "\U0001d11e"}


def exact(app: Any, value: Any, serializer: str = "task") -> str:
    """``loads(dumps(value))`` under the app's serializer, as an order- and type-
    sensitive string (``==`` on dicts ignores key order; ``1 == 1.0``)."""
    name = app.conf.task_serializer if serializer == "task" else app.conf.result_serializer
    content_type, encoding, data = dumps(value, serializer=name)
    return json.dumps(loads(data, content_type, encoding))


def same(app: Any, got: Any, expected: Any) -> None:
    assert json.dumps(got) == exact(app, expected)


def user_data_flow(proj: Any) -> Flow:
    deeper = Flow("deeper", context=DEEP_CONTEXT)
    deeper.add(proj.echo_context.si(), id="ctx")
    sub = Flow("sub", context=SUB_CONTEXT)
    sub.add(proj.echo_context.si(), id="ctx")
    sub.add(deeper, id="deeper")
    pair = Flow("pair")
    pair.add(proj.value.si({"last": []}), id="zz")
    pair.add(proj.value.si([{}]), id="aa")
    f = Flow("userdata", context=DATA)
    f.add(proj.echo_context.si(), id="ctx")
    f.add(sub, id="sub")
    p = f.add(pair, id="pair")
    f.add(proj.echo_call.s(), id="after_pair", after=[p])
    f.add(proj.echo_call.s(*ARGS, **KWARGS), id="call")
    src = f.add(proj.value.s(DATA), id="src")
    f.add(proj.value.s(), id="dep", after=[src])
    f.add(proj.echo_results.si(), id="deps", after=[src])
    f.add(proj.echo_header.s("h").set(headers={"h": DATA}), id="hdr")
    return f


def check_results(proj: Any, results: dict[str, Any]) -> None:
    app = proj.app
    same(app, results["ctx"], DATA)
    same(app, results["sub:ctx"], {**DATA, **SUB_CONTEXT})
    same(app, results["sub:deeper:ctx"], {**DATA, **SUB_CONTEXT, **DEEP_CONTEXT})
    # a sub-flow with several final nodes gives {node id: result} in definition order
    same(app, results["after_pair"], {"args": [{"zz": {"last": []}, "aa": [{}]}],
                                      "kwargs": {}})
    same(app, results["call"], {"args": list(ARGS), "kwargs": KWARGS})
    same(app, results["src"], DATA)
    same(app, results["dep"], DATA)
    same(app, results["deps"], {"src": DATA})
    same(app, results["hdr"], DATA)


def test_user_data_round_trips_through_real_workers(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.userdata_app")
    worker_factory("tests.userdata_app", extra_args=["--flows"])
    handle = proj.flows.submit(user_data_flow(proj))
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED, handle.inspect()
    check_results(proj, handle.results())
    # inspect reads the same records
    assert set(handle.inspect()["nodes"]) >= {"ctx", "sub:ctx", "sub:deeper:ctx", "hdr"}


def test_user_data_round_trips_in_eager_mode(import_app: ImportApp, redis_db: RedisDB) -> None:
    proj = import_app("tests.userdata_app")
    proj.app.conf.task_always_eager = True
    handle = proj.flows.submit(user_data_flow(proj))
    assert handle.state() == FlowState.SUCCEEDED
    check_results(proj, handle.results())


def test_resubmit_compares_user_data_exactly(import_app: ImportApp, redis_db: RedisDB) -> None:
    proj = import_app("tests.userdata_app")

    def build(context: dict[str, Any], arg: Any) -> Flow:
        f = Flow("again", id="again", context=context)
        f.add(proj.value.s(arg), id="a")
        return f

    first = proj.flows.submit(build(DATA, BIG))
    assert proj.flows.submit(build(DATA, BIG)) == first
    for context, arg in (({**DATA, "zeta": BIG + 1}, BIG), (DATA, BIG + 1),
                         ({**DATA, "empty_list": {}}, BIG), (DATA, [])):
        with pytest.raises(FlowStateError, match="different definition"):
            proj.flows.submit(build(context, arg))


def test_unserialisable_signature_options_are_rejected(
    import_app: ImportApp, redis_db: RedisDB
) -> None:
    from celery_flows import FlowDefinitionError

    proj = import_app("tests.userdata_app")
    f = Flow("opts")
    f.add(proj.value.s(1).set(headers={"h": object()}), id="n")
    with pytest.raises(FlowDefinitionError, match="'n'"):
        proj.flows.submit(f)
    assert redis_db.client.dbsize() == 0
