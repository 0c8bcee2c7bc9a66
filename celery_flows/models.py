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

User data (arguments, signature options, contexts, results) never goes into a record:
it is stored as serialised blobs that Lua only copies (see :mod:`celery_flows.codec`).
state, attempt, waiting, removed, skip_reason, error, ... runtime fields
======== =====================================================================
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, TypeAlias

from .config import RATE_RE, FlowsConfig, parse_rate
from .errors import FlowDefinitionError

# 1.1: contexts and signature options are blobs in the args hash
FORMAT_VERSION = "1.1"
FORMAT_MAJOR = 1

MAX_ID_LENGTH = 128
ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")

FAILURE_POLICIES = ("fail", "ignore", "remove")
TRIGGER_RULES = (
    "all_success", "all_done", "all_failed", "one_success", "one_failed", "none_failed",
)

Ref: TypeAlias = "str | list[Ref] | dict[str, Any] | None"


class NodeState(str, Enum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    AWAITING = "awaiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_NODE_STATES


TERMINAL_NODE_STATES = frozenset(
    {NodeState.SUCCEEDED, NodeState.FAILED, NodeState.SKIPPED, NodeState.CANCELLED}
)


class FlowState(str, Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in (FlowState.SUCCEEDED, FlowState.FAILED, FlowState.CANCELLED)


def check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        reserved = isinstance(value, str) and ("[" in value or "]" in value)
        raise FlowDefinitionError(
            f"{what} {value!r} is malformed: use 1-128 letters, digits and _ - . : only"
            + (" ('[' and ']' are reserved for map items such as each[3])" if reserved
               else "")
        )
    return value


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


def check_acyclic(records: dict[str, dict[str, Any]]) -> list[str]:
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


def link(records: dict[str, dict[str, Any]]) -> None:
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
) -> dict[str, Any]:
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
        "state": NodeState.PENDING.value,
        "attempt": 0,
        "waiting": len(after),
        "removed": [],
        "skip_reason": None,
        "error": None,
        "task_ids": [],
        "starts": [],
        "retries": 0,
        "recoveries": 0,
        "queued_at": None,
        "started_at": None,
        "finished_at": None,
        "worker": None,
        "progress": [],
        "history": [],
        "ignored": False,
    }


def as_list(value: Any) -> list[Any]:
    """Lua's cjson encodes an empty array as ``{}``; read it back as a list."""
    if not value:
        return []
    return list(value)


def check_rate(value: Any, config: FlowsConfig | None, what: str) -> None:
    if not isinstance(value, str):
        raise FlowDefinitionError(f"{what} {value!r} must be 'N/s|m|h' or a group name")
    if RATE_RE.match(value):
        try:
            parse_rate(value)
        except ValueError as exc:
            raise FlowDefinitionError(f"{what}: {exc}") from None
        return
    if config is not None and value not in config.rate_limits:
        raise FlowDefinitionError(
            f"{what} {value!r} is neither a rate like '10/s' nor a group defined in "
            "app.conf.flows_rate_limits"
        )


def check_node_opts(
    nid: str,
    *,
    queue: Any = None,
    priority: Any = None,
    rate_limit: Any = None,
    failure_policy: Any = None,
    trigger_rule: Any = None,
    max_recoveries: Any = None,
) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if queue is not None:
        if not isinstance(queue, str) or not queue:
            raise FlowDefinitionError(f"node {nid!r}: queue must be a non-empty string")
        opts["queue"] = queue
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
            raise FlowDefinitionError(f"node {nid!r}: priority must be an int from 0 to 9")
        opts["priority"] = priority
    if rate_limit is not None:
        check_rate(rate_limit, None, f"node {nid!r} rate_limit")
        opts["rate"] = rate_limit
    if failure_policy is not None:
        if failure_policy not in FAILURE_POLICIES:
            raise FlowDefinitionError(
                f"node {nid!r}: failure_policy {failure_policy!r} must be one of "
                f"{', '.join(FAILURE_POLICIES)}"
            )
        opts["policy"] = failure_policy
    if trigger_rule is not None:
        if trigger_rule not in TRIGGER_RULES:
            raise FlowDefinitionError(
                f"node {nid!r}: trigger_rule {trigger_rule!r} must be one of "
                f"{', '.join(TRIGGER_RULES)}"
            )
        opts["rule"] = trigger_rule
    if max_recoveries is not None:
        if (isinstance(max_recoveries, bool) or not isinstance(max_recoveries, int)
                or max_recoveries < 0):
            raise FlowDefinitionError(f"node {nid!r}: max_recoveries must be an int >= 0")
        opts["max_rec"] = max_recoveries
    return opts
