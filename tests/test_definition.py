"""Flow definitions: validation before anything is written, ids, eager mode, config."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery, chain, group

from celery_flows import (
    Flow,
    FlowDefinitionError,
    FlowNotFoundError,
    Flows,
    FlowsConfigError,
    FlowState,
    NodeState,
)
from tests.conftest import ImportApp, RedisDB


@pytest.fixture
def proj(import_app: ImportApp) -> Any:
    return import_app("tests.proj")


def _rejects(proj: Any, redis_db: RedisDB, flow: Flow, *fragments: str) -> None:
    with pytest.raises(FlowDefinitionError) as info:
        proj.flows.submit(flow)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert redis_db.client.dbsize() == 0, "a rejected flow must write nothing"


def test_cycle_is_rejected_naming_a_node(proj: Any, redis_db: RedisDB) -> None:
    f = Flow("cyclic")
    f.add(proj.add.s(1, 1), id="a", after=["c"])
    f.add(proj.add.s(1), id="b", after=["a"])
    f.add(proj.add.s(1), id="c", after=["b"])
    _rejects(proj, redis_db, f, "cycle")


def test_unknown_dependency_is_rejected(proj: Any, redis_db: RedisDB) -> None:
    f = Flow("unknown")
    f.add(proj.add.s(1, 1), id="a")
    f.add(proj.add.s(1), id="b", after=["nope"])
    _rejects(proj, redis_db, f, "'b'", "'nope'")


def test_duplicate_and_malformed_ids_are_rejected_at_add(proj: Any) -> None:
    f = Flow("ids")
    f.add(proj.add.s(1, 1), id="a")
    with pytest.raises(FlowDefinitionError, match="'a' is used twice"):
        f.add(proj.add.s(1, 1), id="a")
    for bad in ("has space", "slash/es", "", "x" * 129, "brace{}"):
        with pytest.raises(FlowDefinitionError, match="malformed"):
            f.add(proj.add.s(1, 1), id=bad)
    with pytest.raises(FlowDefinitionError, match="malformed"):
        Flow("bad", id="a b")


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"priority": 10}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"queue": ""}, "queue"),
        ({"rate_limit": "0/s"}, "rate"),
        ({"failure_policy": "explode"}, "failure_policy"),
        ({"trigger_rule": "sometimes"}, "trigger_rule"),
        ({"max_recoveries": -1}, "max_recoveries"),
    ],
)
def test_bad_node_options_are_rejected_naming_the_node(
    proj: Any, options: dict[str, Any], fragment: str
) -> None:
    f = Flow("opts")
    with pytest.raises(FlowDefinitionError, match=fragment) as info:
        f.add(proj.add.s(1, 1), id="the-node", **options)
    assert "the-node" in str(info.value)


def test_group_rate_limit_must_exist_at_submit(proj: Any, redis_db: RedisDB) -> None:
    f = Flow("limits")
    f.add(proj.add.s(1, 1), id="a", rate_limit="no-such-group")
    _rejects(proj, redis_db, f, "'a'", "flows_rate_limits")


def test_forbidden_signature_options_and_canvases(proj: Any) -> None:
    f = Flow("sigs")
    for sig in (proj.add.s(1, 1).set(countdown=5), proj.add.s(1, 1).set(task_id="x"),
                proj.add.s(1, 1).set(link=proj.ident.s())):
        with pytest.raises(FlowDefinitionError, match="not allowed"):
            f.add(sig, id="n")
    with pytest.raises(FlowDefinitionError, match="from_canvas"):
        f.add(chain(proj.add.s(1, 1), proj.ident.s()))
    with pytest.raises(FlowDefinitionError, match="from_canvas"):
        f.add(group(proj.add.s(1, 1), proj.ident.s(1)))
    with pytest.raises(FlowDefinitionError, match="signature"):
        f.add(lambda: 1)  # type: ignore[arg-type]
    with pytest.raises(FlowDefinitionError, match="built-in"):
        f.add(proj.app.signature("celery.map", args=("tests.proj.ident", [1])))


def test_unregistered_task_in_an_imported_module_is_rejected(
    proj: Any, redis_db: RedisDB
) -> None:
    f = Flow("typo")
    f.add(proj.app.signature("tests.proj.no_such_task"), id="typo")
    _rejects(proj, redis_db, f, "'typo'", "not registered")


def test_unserialisable_arguments_and_context_are_rejected(
    proj: Any, redis_db: RedisDB
) -> None:
    f = Flow("args")
    f.add(proj.ident.s(object()), id="obj")
    _rejects(proj, redis_db, f, "'obj'", "serialised")
    g = Flow("ctx", context={"when": object()})
    g.add(proj.ident.s(1))
    _rejects(proj, redis_db, g, "context")


def test_generated_node_ids(proj: Any) -> None:
    f = Flow("gen")
    first = f.add(proj.add.s(1, 1))
    second = f.add(proj.add.s(2, 2))
    f.add(proj.add.s(3, 3), id="add-3")
    fourth = f.add(proj.add.s(4, 4))
    assert (first.id, second.id, fourth.id) == ("add", "add-2", "add-4")


def test_eager_mode_runs_the_whole_flow_in_process(proj: Any, redis_db: RedisDB) -> None:
    proj.app.conf.task_always_eager = True
    f = Flow("eager", context={"tenant": "acme"})
    prev = f.add(proj.ident.s(0), id="n0")
    # a long chain: driven iteratively, so no recursion limit is reached
    for i in range(1, 1200):
        prev = f.add(proj.add.s(1), id=f"n{i}", after=[prev])
    f.add(proj.ctx_value.si("tenant"), id="ctx", after=[prev])
    f.add(proj.boom.si(), id="bad")
    handle = proj.flows.submit(f)
    assert handle.state() == FlowState.FAILED  # terminal on return
    results = handle.results()
    assert results["n1199"] == 1199
    assert results["ctx"] == "acme"
    assert handle.node_states()["bad"] == NodeState.FAILED
    assert redis_db.client.llen(b"celery") == 0, "eager mode must not publish"


def test_get_unknown_flow(proj: Any) -> None:
    with pytest.raises(FlowNotFoundError):
        proj.flows.get("missing")


def test_config_errors_name_the_key(redis_db: RedisDB) -> None:
    app = Celery("cfg", broker="memory://", set_as_current=False)
    flows = Flows(app)
    with pytest.raises(FlowsConfigError, match="flows_redis_url"):
        flows.config  # noqa: B018
    for key, value in (("flows_retention", 0), ("flows_queue_limits", {"gpu": 0}),
                       ("flows_rate_limits", {"api": "lots"}), ("flows_lease_timeout", -1),
                       ("flows_webhook_url", "ftp://x")):
        app2 = Celery("cfg2", broker=redis_db.celery_url, set_as_current=False)
        app2.conf[key] = value
        with pytest.raises(FlowsConfigError, match=key):
            Flows(app2).config  # noqa: B018


def test_evicting_redis_is_refused_at_worker_start(redis_db: RedisDB) -> None:
    from celery_flows.worker.step import check_redis

    app = Celery("evict", broker=redis_db.celery_url, set_as_current=False)
    flows = Flows(app)
    check_redis(flows.engine)  # the test server runs noeviction
    redis_db.client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(FlowsConfigError, match="noeviction"):
            check_redis(flows.engine)
    finally:
        redis_db.client.config_set("maxmemory-policy", "noeviction")


# -- composed ids, nesting and size (SPEC section 1 flows_max_nodes, section 2 ids) ------


@pytest.mark.parametrize("task_first", [True, False])
def test_a_composed_id_colliding_with_a_node_id_is_rejected_naming_both(
    proj: Any, redis_db: RedisDB, task_first: bool
) -> None:
    sub = Flow("sub")
    sub.add(proj.add.s(1, 1), id="a")
    f = Flow("collide")
    if task_first:
        f.add(proj.add.s(2, 2), id="sub:a")
    f.add(sub, id="sub")
    if not task_first:
        f.add(proj.add.s(2, 2), id="sub:a")
    _rejects(proj, redis_db, f, "'sub:a'", "node 'a' of sub-flow 'sub'", "used twice")


def test_a_composed_id_over_128_characters_is_rejected(proj: Any, redis_db: RedisDB) -> None:
    sub = Flow("sub")
    sub.add(proj.add.s(1, 1), id="n" * 40)
    f = Flow("long")
    f.add(sub, id="s" * 100)
    _rejects(proj, redis_db, f, "141 characters", "128", "'" + "n" * 40 + "'")


def test_deep_sub_flow_nesting_fails_clearly_instead_of_recursing(
    proj: Any, redis_db: RedisDB
) -> None:
    inner = Flow("leaf")
    inner.add(proj.add.s(1, 1), id="leaf")
    for _ in range(5000):
        outer = Flow("level")
        outer.add(inner, id="s")
        inner = outer
    _rejects(proj, redis_db, inner, "128", "fewer levels")


def test_nested_sub_flows_within_the_id_length_run(proj: Any, redis_db: RedisDB) -> None:
    proj.app.conf.task_always_eager = True
    inner = Flow("leaf")
    inner.add(proj.add.s(1, 1), id="leaf")
    for _ in range(60):  # "s:" * 60 + "leaf": 124 characters
        outer = Flow("level")
        outer.add(inner, id="s")
        inner = outer
    handle = proj.flows.submit(inner)
    assert handle.state() == FlowState.SUCCEEDED
    assert handle.results() == {"s:" * 60 + "leaf": 2}


def test_brackets_are_reserved_for_map_items(proj: Any) -> None:
    f = Flow("brackets")
    for bad in ("each[3]", "a]", "[b"):
        with pytest.raises(FlowDefinitionError, match="reserved for map items"):
            f.add(proj.add.s(1, 1), id=bad)
    with pytest.raises(FlowDefinitionError, match="reserved for map items"):
        f.add_external("x[0]")


def test_a_flow_over_flows_max_nodes_is_refused_before_anything_is_written(
    proj: Any, redis_db: RedisDB
) -> None:
    # 100 uses of a 1,000-node sub-flow and one more node: 100,001 nodes inlined
    block = Flow("block")
    for i in range(1000):
        block.add(proj.add.s(i, 1), id=f"n{i}")
    f = Flow("huge")
    for i in range(100):
        f.add(block, id=f"b{i}")
    f.add(proj.add.s(1, 1), id="one-more")
    _rejects(proj, redis_db, f, "100001 nodes", "flows_max_nodes=100000")
    # a definition that multiplies (a sub-flow used twice at each of 20 levels) is
    # counted without being inlined
    inner = block
    for _ in range(20):
        outer = Flow("twice")
        outer.add(inner, id="x")
        outer.add(inner, id="y")
        inner = outer
    _rejects(proj, redis_db, inner, f"{1000 * 2 ** 20} nodes", "flows_max_nodes")


def test_flows_max_nodes_bounds_submit_and_add_node(proj: Any, redis_db: RedisDB) -> None:
    from celery_flows import FlowStateError

    proj.app.conf.flows_max_nodes = 5
    sub = Flow("sub")
    sub.add(proj.add.s(1, 1), id="x")
    sub.add(proj.add.s(1, 1), id="y")

    def five() -> Flow:
        f = Flow("five")
        f.add(sub, id="sub")
        for i in range(3):
            f.add(proj.wait_for_key.s("never", 0.1), id=f"n{i}")
        return f

    six = five()
    six.add(proj.add.s(1, 1), id="sixth")
    _rejects(proj, redis_db, six, "6 nodes", "flows_max_nodes=5")
    handle = proj.flows.submit(five())  # no worker: the flow stays running
    with pytest.raises(FlowStateError, match="flows_max_nodes=5"):
        proj.flows.add_node(handle.id, proj.add.s(1, 1), node_id="extra")
    with pytest.raises(FlowStateError, match="flows_max_nodes=5"):
        proj.flows.add_node(handle.id, proj.add.s(1, 1), node_id="extra", dry_run=True)
    assert "extra" not in handle.node_states()
    assert len(handle.node_states()) == 5


@pytest.mark.parametrize("value", [0, -1, "10", True, 2.5])
def test_flows_max_nodes_must_be_a_positive_int(redis_db: RedisDB, value: Any) -> None:
    app = Celery("cfg", broker=redis_db.celery_url, set_as_current=False)
    app.conf.flows_max_nodes = value
    with pytest.raises(FlowsConfigError, match="flows_max_nodes"):
        Flows(app).config  # noqa: B018
