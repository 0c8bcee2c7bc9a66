"""States, option vocabularies, id rules and the flat node records a flow compiles to.

A node record is the JSON document stored per node in ``<prefix>:{fid}:nodes``; the Lua
transitions read and update it, Python builds it here. Field names are short because
every transition decodes them:

======== =====================================================================
task     Celery task name (``None`` for external nodes)
kind     ``task`` | ``external`` | ``sensor``
after    dependency node ids, in order
deps_of  dependents (filled in by :func:`link`)
input    how results reach the args: a node id, a list of refs or
         ``{"map": [[k, ref], ...]}`` (a dict in that key order; pairs, because cjson
         does not keep an object's key order)
         (``None``: nothing is prepended, e.g. an immutable signature)
queue, priority, rate, policy, rule, max_rec, timeout, poke   node options
epol     set on a sub-flow's final nodes only: the sub-flow node's policy, applied to
         outgoing edges when the node failed or was skipped as ``upstream_failed``
fpol     policy deciding whether a failure fails the whole flow
ctx      field of the args hash holding the node's context overlay (sub-flows)
lp       longest path in nodes to a sink, from submit (:func:`longest_paths`)
mlen, mact   a map's max_length and max_active (SPEC section 12)
maps     on a node some map takes as its whole input: those maps (the completion
         that records it splits its result into their items: engine/maps.py)
k, xtok, over   an expanded map: its item count, the token of its staged elements,
         the node it expanded over (its ``after`` is then its items)
item, of, xin   a map's item: its index, its map, the args-hash field of its element
         (an item is written at its first change; until then it reads as made from its
         map: lua/engine/cache.lua item_record, :func:`item_record`)

User data (arguments, signature options, contexts, results) never goes into a record:
it is stored as serialised blobs that Lua only copies (see :mod:`celery_flows.codec`).
state, attempt, waiting, removed, skip_reason, error, ... runtime fields
======== =====================================================================
"""

from __future__ import annotations

import re
from typing import Any, TypeAlias, TypedDict, cast

from ..errors import FlowDefinitionError
from .states import NodeState

__all__ = ["ITEM_RE", "LIST_FIELDS", "NodeRecord", "Ref", "as_list", "check_acyclic",
           "compact", "context_field", "item_ids", "item_record", "link", "longest_paths",
           "map_pairs", "mark_maps", "new_record", "ref_ids", "rename_ref", "shown_state",
           "with_defaults"]

Ref: TypeAlias = "str | list[Ref] | dict[str, Any] | None"


def context_field(scope: str = "") -> str:
    """The field of the args hash holding a context: the flow's (``scope=""``) or the
    overlay of the sub-flow node ``scope`` (a record's ``ctx`` names it; ``#`` is never
    in a node id)."""
    return f"ctx#{scope}"


class NodeRecord(TypedDict, total=False):
    """A node's record as stored (JSON) and as the Lua transitions keep it. The
    definition fields come from :func:`new_record`; the others are written by the
    transitions while the flow runs (never all present at once, hence ``total=False``).
    """

    # definition
    task: str | None
    kind: str
    after: list[str]
    deps_of: list[str]
    input: Ref
    queue: str | None
    priority: int | None
    rate: str | None
    policy: str
    epol: str | None
    fpol: str
    rule: str
    max_rec: int | None
    timeout: float | None
    poke: float | None
    ctx: str | None
    seq: int
    lp: int  # longest path to a sink, in nodes (longest_paths)
    # runtime
    state: str
    attempt: int
    waiting: int
    removed: list[str]
    skip_reason: str | None
    error: str | None
    task_ids: list[str]
    starts: list[str]
    retries: int
    recoveries: int
    queued_at: float | None
    released_at: float | None
    ready_at: float | None
    retry_at: float | None
    started_at: float | None
    finished_at: float | None
    worker: str | None
    lease: str | None
    held: dict[str, Any]
    progress: list[dict[str, Any]]
    history: list[Any]
    ignored: bool
    cancel_reason: str | None
    counted_fail: bool
    prev_state: str | None
    putback: bool
    sensor_since: float | None
    opts: dict[str, Any]  # format 1.0 kept signature options here
    # maps
    mlen: int
    mact: int | None
    maps: list[str]
    k: int
    xtok: str
    over: str
    item: int
    of: str
    xin: str


def map_pairs(ref: dict[str, Any]) -> list[tuple[str, Ref]]:
    """The (key, ref) pairs of a ``{"map": ...}`` ref, in order (a dict in records
    written before the pairs form)."""
    m = ref["map"]
    if isinstance(m, dict):
        return list(m.items())
    return [(k, r) for k, r in m]


def ref_ids(ref: Ref) -> list[str]:
    """Every node id a result reference mentions, in order."""
    if ref is None:
        return []
    if isinstance(ref, str):
        return [ref]
    if isinstance(ref, dict):
        return [i for _k, r in map_pairs(ref) for i in ref_ids(r)]
    return [i for r in ref for i in ref_ids(r)]


def rename_ref(ref: Ref, rename: dict[str, Ref]) -> Ref:
    if ref is None:
        return None
    if isinstance(ref, str):
        return rename.get(ref, ref)
    if isinstance(ref, dict):
        return {"map": [[k, rename_ref(r, rename)] for k, r in map_pairs(ref)]}
    return [rename_ref(r, rename) for r in ref]


def check_acyclic(records: dict[str, NodeRecord]) -> list[str]:
    """Topological order of the nodes; FlowDefinitionError naming a node on a cycle."""
    indeg = {nid: 0 for nid in records}
    for nid, rec in records.items():
        for dep in rec["after"]:
            if dep not in records:
                raise FlowDefinitionError(
                    f"node {nid!r}: 'after' names unknown node {dep!r}"
                )
            indeg[nid] += 1
    dependents: dict[str, list[str]] = {nid: [] for nid in records}
    for nid, rec in records.items():
        for dep in rec["after"]:
            dependents[dep].append(nid)
    order = [nid for nid, d in indeg.items() if d == 0]
    i = 0
    while i < len(order):
        for nxt in dependents[order[i]]:
            indeg[nxt] -= 1
            if indeg[nxt] == 0:
                order.append(nxt)
        i += 1
    if len(order) != len(records):
        stuck = sorted(nid for nid, d in indeg.items() if d > 0)
        raise FlowDefinitionError(
            f"the flow has a cycle through node {stuck[0]!r} (nodes on or after a cycle: "
            f"{', '.join(stuck[:10])})"
        )
    return order


def link(records: dict[str, NodeRecord]) -> None:
    """Fill each record's dependents list and its count of unfinished dependencies."""
    for rec in records.values():
        rec["deps_of"] = []
    for nid, rec in records.items():
        for dep in rec["after"]:
            records[dep]["deps_of"].append(nid)
    for rec in records.values():
        rec["waiting"] = len(rec["after"])


def new_record(
    *,
    task: str | None,
    kind: str = "task",
    after: list[str],
    input: Ref,
    queue: str | None = None,
    priority: int | None = None,
    rate: str | None = None,
    policy: str = "fail",
    rule: str = "all_success",
    max_rec: int | None = None,
    timeout: float | None = None,
    poke: float | None = None,
) -> NodeRecord:
    return {
        "task": task,
        "kind": kind,
        "after": list(after),
        "deps_of": [],
        "input": input,
        "queue": queue,
        "priority": priority,
        "rate": rate,
        "policy": policy,
        "epol": None,
        "fpol": policy,
        "rule": rule,
        "max_rec": max_rec,
        "timeout": timeout,
        "poke": poke,
        "ctx": None,
        "waiting": len(after),
        # the runtime fields (state, attempt, task_ids, ...) start at their default and
        # are left out: every reader puts them back (with_defaults, cache.lua load)
    }


#: Fields a stored record may omit, and the value that omission stands for. A record is
#: written without them at creation (a pending node of a 100,000-node flow then costs
#: a fraction of the full document); every reader puts them back: ``with_defaults``
#: here, ``load`` in lua/engine/cache.lua. ``fpol`` defaults to the record's ``policy``.
SCALAR_DEFAULTS: dict[str, Any] = {
    "task": None, "kind": "task", "input": None, "queue": None, "priority": None,
    "rate": None, "policy": "fail", "epol": None, "rule": "all_success", "max_rec": None,
    "timeout": None, "poke": None, "ctx": None, "state": NodeState.PENDING.value,
    "attempt": 0, "skip_reason": None, "error": None, "retries": 0,
    "recoveries": 0, "queued_at": None, "started_at": None, "finished_at": None,
    "worker": None, "ignored": False,
}
#: The stored input of a node that takes the list of its dependencies' results in
#: ``after`` order (compact): no node id is "*" (validate.ID_RE)
INPUT_AFTER = "*"
LIST_FIELDS = ("after", "deps_of", "removed", "task_ids", "starts", "progress", "history")


_OMITTED: dict[str, Any] = {**SCALAR_DEFAULTS, **{k: [] for k in LIST_FIELDS}}
_KEEP = object()


def compact(rec: NodeRecord) -> dict[str, Any]:
    """The record as stored at creation: without the fields at their default (no
    default is equal to a value of another type a record holds: 0 vs False never
    meet in one field)."""
    omitted = _OMITTED
    # the count of dependencies a node waits for lives in the flow's waiting hash
    # (keys.py), which create.lua fills from ``after``
    out = {k: v for k, v in rec.items() if k != "waiting" and omitted.get(k, _KEEP) != v}
    if out.get("fpol", _KEEP) == rec.get("policy", "fail"):
        del out["fpol"]
    if rec.get("deps_of"):
        # one string (ids never hold a comma, validate.ID_RE): a script that reads a
        # node of 20,000 dependents decodes one string instead of 20,000 (cjson: about
        # 0.3 ms against 7 ms), and settles its edges by offset (lua/engine/settle.lua)
        out["deps_of"] = ",".join(rec["deps_of"])
    after = rec.get("after")
    if after:
        # the same for a node of many dependencies (a fan-in's sink), read by its scan
        # by offset (lua/engine/scan.lua); the usual input of such a node, the list of
        # its dependencies' results in ``after`` order, is one mark instead of the ids
        # again
        out["after"] = ",".join(after)
        if rec.get("input") == after:
            out["input"] = INPUT_AFTER
    return out


def with_defaults(rec: dict[str, Any]) -> NodeRecord:
    """A stored record with every omitted field back at its default (in place)."""
    for k, v in SCALAR_DEFAULTS.items():
        if k not in rec:
            rec[k] = v
    deps, after = rec.get("deps_of"), rec.get("after")
    for k in LIST_FIELDS:
        rec[k] = as_list(rec.get(k))
    if isinstance(deps, str):  # stored joined (compact)
        rec["deps_of"] = deps.split(",") if deps else []
    if isinstance(after, str):
        rec["after"] = after.split(",") if after else []
        if after.startswith("#"):  # an expanded map's items: "#<k>#<map id>"
            k, _, base = after[1:].partition("#")
            rec["after"] = [f"{base}[{i}]" for i in range(int(k))]
    if rec.get("input") == INPUT_AFTER:
        rec["input"] = list(rec["after"])
    if "fpol" not in rec:
        rec["fpol"] = rec["policy"]
    return cast(NodeRecord, rec)


def mark_maps(records: dict[str, NodeRecord]) -> None:
    """Note on each node a map takes as its whole input the maps that expand over it
    (``maps``): the completion that records it then splits its result."""
    for nid, rec in records.items():
        if rec.get("kind") == "map" and rec["after"] == [rec["input"]]:
            over = records[str(rec["input"])]
            over["maps"] = [*over.get("maps", []), nid]


ITEM_RE = re.compile(r"^(.+)\[(\d+)\]$")


def item_record(m: NodeRecord, nid: str, i: int) -> NodeRecord:
    """Item ``i`` of the expanded map ``m`` as it reads before its first write (the
    Lua engine's item_record, lua/engine/cache.lua)."""
    rec: dict[str, Any] = {
        "task": m.get("task"), "deps_of": [nid], "of": nid, "item": i,
        "xin": f"@{m.get('xtok')}:{i}", "queue": m.get("queue"),
        "priority": m.get("priority"), "rate": m.get("rate"), "policy": m.get("policy"),
        "fpol": m.get("fpol"), "max_rec": m.get("max_rec"), "ctx": m.get("ctx"),
        "lp": int(m.get("lp") or 1) + 1,
    }
    rec = {k: v for k, v in rec.items() if v is not None}
    if m.get("state") == NodeState.CANCELLED.value:
        rec["state"] = NodeState.CANCELLED.value
        rec["cancel_reason"] = m.get("cancel_reason")
    return with_defaults(rec)


def item_ids(nid: str, rec: NodeRecord) -> list[str]:
    """The ids of an expanded map's items (none before it expands)."""
    if rec.get("kind") != "map" or rec.get("k") is None:
        return []
    return [f"{nid}[{i}]" for i in range(int(rec["k"]))]


def shown_state(rec: NodeRecord) -> str:
    """The state readers see of a map: pending until it expands, then running until
    it ends (lua/engine/cache.lua shown_state)."""
    state = str(rec.get("state", NodeState.PENDING.value))
    if rec.get("kind") == "map" and state in (NodeState.PENDING.value,
                                              NodeState.SCHEDULED.value):
        return str((NodeState.RUNNING if rec.get("k") is not None else NodeState.PENDING).value)
    return state


def longest_paths(records: dict[str, NodeRecord], order: list[str]) -> dict[str, int]:
    """Each node's longest path, in nodes, to a sink of the flow (itself included):
    the first key of the release order among held nodes (SPEC section 7), computed
    once here in O(V+E) instead of by every claim. Needs ``deps_of`` (:func:`link`) and
    a topological ``order`` (:func:`check_acyclic`)."""
    paths: dict[str, int] = {}
    for nid in reversed(order):
        paths[nid] = 1 + max((paths[k] for k in records[nid]["deps_of"]), default=0)
    return paths


def as_list(value: Any) -> list[Any]:
    """Lua's cjson encodes an empty array as ``{}``; read it back as a list."""
    if not value:
        return []
    return list(value)
