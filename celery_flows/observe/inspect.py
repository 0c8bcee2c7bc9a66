"""What ``flows inspect`` shows: the JSON document of SPEC section 10, and what each node
waits for. Drawing it (tree, Mermaid, dot) is render.py's."""

from __future__ import annotations

import json
from typing import Any

from ..define.records import NodeRecord
from ..define.states import TERMINAL_NODE_STATES, NodeState
from ..registry import Store
from ..registry.scripts import WIDE

# dependencies named in a pending node's waiting_for; the rest are counted
_SHOWN_DEPS = 20

__all__ = ["describe"]


def _named(ids: list[str]) -> str:
    """The first _SHOWN_DEPS ids, then how many more."""
    more = len(ids) - _SHOWN_DEPS
    return ", ".join(ids[:_SHOWN_DEPS]) + (f" and {more} more" if more > 0 else "")


def _map_waiting_for(rec: NodeRecord, nodes: dict[str, NodeRecord]) -> str | None:
    """What a map or a map's item waits for (SPEC section 12), or None for the rules
    of any node."""
    state = rec["state"]
    if rec.get("of") is not None and state == NodeState.PENDING.value:
        owner = nodes.get(str(rec["of"])) or {}
        if owner.get("mact"):
            return (f"its turn: map {rec['of']!r} runs at most {owner['mact']} items at "
                    "once (max_active)")
        return "its release, a step per claim (by this process or a --flows worker)"
    if rec.get("kind") == "map" and rec.get("k") is not None \
            and state == NodeState.RUNNING.value:
        open_items = [d for d in rec["after"]
                      if NodeState(nodes[d]["state"]) not in TERMINAL_NODE_STATES]
        if open_items:
            return (f"its items: {len(open_items)} of {rec['k']} not finished "
                    f"({_named(open_items)})")
        return ("the collection of its items' results, in the outbox (by this process or a "
                "--flows worker)")
    return None


def _waiting_for(rec: NodeRecord, nodes: dict[str, NodeRecord],
                 meta: dict[str, str], now: float) -> str | None:
    state = rec["state"]
    if rec.get("kind") == "map" or rec.get("of") is not None:
        said = _map_waiting_for(rec, nodes)
        if said is not None:
            return said
    if state == NodeState.PENDING.value and meta.get("state") == "waiting" and not rec["after"]:
        return (f"its flow's place in concurrency group {meta.get('cgroup')!r}, key "
                f"{meta.get('ckey')!r}")
    if state == NodeState.PENDING.value:
        open_deps = [d for d in rec["after"]
                     if d not in rec["removed"]
                     and NodeState(nodes[d]["state"]) not in TERMINAL_NODE_STATES]
        if open_deps:
            return "dependencies: " + _named(open_deps)
        # every edge is terminal: its trigger rule is evaluated in the step that ended
        # the last one, or, past WIDE dependencies, a step per claim (lua/engine/scan.lua)
        return (f"evaluation of its {len(rec['after'])} dependencies, a step per claim "
                "(by this process or a --flows worker)") if len(rec["after"]) > WIDE \
            else "evaluation"
    if state in (NodeState.SCHEDULED.value, NodeState.RETRYING.value) and rec.get("held"):
        held = rec["held"]
        until = held.get("until")
        if isinstance(until, (int, float)):
            when = f"next release in {max(until - now, 0):.2f}s"
        elif str(held.get("by", "")).startswith("queue:"):
            when = "until a slot frees"
        else:
            when = "behind nodes released first"
        return f"{held.get('by')} ({when}), released by a --flows worker"
    retry_at = rec.get("retry_at")
    if state == NodeState.RETRYING.value and isinstance(retry_at, (int, float)):
        return f"its retry, due in {max(retry_at - now, 0):.2f}s"
    if state == NodeState.SCHEDULED.value:
        if meta.get("paused") == "1":
            return "resume: the flow is paused"
        return "release: in the outbox, to be published by this process or a --flows worker"
    if state == NodeState.QUEUED.value:
        since = rec.get("queued_at")
        when = (f" (queued {max(now - since, 0):.1f}s ago)"
                if isinstance(since, (int, float)) else "")
        return f"a worker consuming queue {rec.get('queue')!r}{when}"
    if state == NodeState.RETRYING.value:
        return f"its Celery retry (retries so far: {rec.get('retries', 0)})"
    if state == NodeState.AWAITING.value:
        return "an external signal (flows.signal or celery flows signal)"
    return None


def _flow_waiting_for(store: Store, fid: str, meta: dict[str, str]) -> dict[str, Any] | None:
    """``{"group", "key", "position"}`` of a waiting flow (position: 1-based place in its
    key's line; None while it is being admitted or not yet in line), else None."""
    if meta.get("state") != "waiting" or not meta.get("cgroup"):
        return None
    group, key = meta["cgroup"], meta.get("ckey", "")
    return {"group": group, "key": key, "position": store.conc_position(group, key, fid)}


def describe(store: Store, fid: str) -> dict[str, Any]:
    """The ``inspect --json`` document of a flow (FlowNotFoundError if unknown)."""
    meta = store.require_meta(fid)
    nodes = store.nodes(fid)
    now = store.time()
    out_nodes: dict[str, Any] = {}
    for nid, rec in nodes.items():
        progress = [
            {"percent": p.get("pct"), "message": p.get("msg"), "at": p.get("at")}
            for p in rec["progress"]
        ]
        after = rec["after"]
        if rec.get("of") is not None:
            after = [str(rec["of"])]  # an item is drawn under its map
        elif rec.get("kind") == "map" and rec.get("over"):
            after = [str(rec["over"])]  # an expanded map's edges are its items'
        out_nodes[nid] = {
            "state": rec["state"],
            "after": after,
            "queue": rec.get("queue"),
            "attempts": rec.get("attempt", 0),
            "recoveries": rec.get("recoveries", 0),
            "retries": rec.get("retries", 0),
            "task_ids": rec["task_ids"],
            "queued_at": float(released) if (released := rec.get("released_at"))
            else rec.get("queued_at"),
            "started_at": rec.get("started_at"),
            "finished_at": rec.get("finished_at"),
            "error": rec.get("error"),
            "progress": progress,
            "waiting_for": _waiting_for(rec, nodes, meta, now),
            "skip_reason": rec.get("skip_reason"),
            "task": rec.get("task"),
        }
        if rec.get("kind") == "map":
            out_nodes[nid]["items"] = rec.get("k")  # None until it expands
        elif rec.get("of") is not None:
            out_nodes[nid]["map"] = rec["of"]
            out_nodes[nid]["item"] = rec.get("item")
    return {
        "id": fid,
        "name": meta.get("name"),
        "state": meta.get("state"),
        "created_at": float(meta["created_at"]) if meta.get("created_at") else None,
        "finished_at": float(meta["finished_at"]) if meta.get("finished_at") else None,
        "now": now,
        "nodes": out_nodes,
        # a flow waiting for its concurrency group: which, and its place in line
        "waiting_for": _flow_waiting_for(store, fid, meta),
        # the webhook's delivery log (worker/webhooks.py), newest last
        "webhooks": json.loads(meta["webhook_log"]) if meta.get("webhook_log") else [],
    }
