"""What ``flows inspect`` shows: a JSON document per SPEC section 10 and a text tree."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .models import TERMINAL_NODE_STATES, NodeState

if TYPE_CHECKING:
    from .core import Flows


def _waiting_for(rec: dict[str, Any], nodes: dict[str, dict[str, Any]],
                 meta: dict[str, str], now: float) -> str | None:
    state = rec["state"]
    if state == NodeState.PENDING.value:
        open_deps = [d for d in rec["after"]
                     if d not in rec["removed"]
                     and NodeState(nodes[d]["state"]) not in TERMINAL_NODE_STATES]
        return "dependencies: " + ", ".join(open_deps) if open_deps else "evaluation"
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
    if state == NodeState.RETRYING.value and isinstance(rec.get("retry_at"), (int, float)):
        return f"its retry, due in {max(rec['retry_at'] - now, 0):.2f}s"
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


def describe(flows: Flows, fid: str) -> dict[str, Any]:
    meta = flows.store.require_meta(fid)
    nodes = flows.store.nodes(fid)
    now = flows.store.time()
    out_nodes: dict[str, Any] = {}
    for nid, rec in nodes.items():
        progress = [
            {"percent": p.get("pct"), "message": p.get("msg"), "at": p.get("at")}
            for p in rec["progress"]
        ]
        out_nodes[nid] = {
            "state": rec["state"],
            "after": rec["after"],
            "queue": rec.get("queue"),
            "attempts": rec.get("attempt", 0),
            "recoveries": rec.get("recoveries", 0),
            "retries": rec.get("retries", 0),
            "task_ids": rec["task_ids"],
            "queued_at": float(rec["released_at"]) if rec.get("released_at")
            else rec.get("queued_at"),
            "started_at": rec.get("started_at"),
            "finished_at": rec.get("finished_at"),
            "error": rec.get("error"),
            "progress": progress,
            "waiting_for": _waiting_for(rec, nodes, meta, now),
            "skip_reason": rec.get("skip_reason"),
            "task": rec.get("task"),
        }
    return {
        "id": fid,
        "name": meta.get("name"),
        "state": meta.get("state"),
        "created_at": float(meta["created_at"]) if meta.get("created_at") else None,
        "finished_at": float(meta["finished_at"]) if meta.get("finished_at") else None,
        "now": now,
        "nodes": out_nodes,
    }


def _fmt_secs(a: Any, b: Any) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return f"{b - a:.2f}s"
    return ""


def render_tree(doc: dict[str, Any]) -> str:
    """A node is drawn under its first dependency; other dependencies are named."""
    nodes: dict[str, Any] = doc["nodes"]
    children: dict[str | None, list[str]] = {}
    for nid, n in nodes.items():
        parent = n["after"][0] if n["after"] else None
        children.setdefault(parent, []).append(nid)
    counts: dict[str, int] = {}
    for n in nodes.values():
        counts[n["state"]] = counts.get(n["state"], 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    lines = [f"flow {doc['name']} [{doc['id']}]  {doc['state'].upper()}  ({summary})"]
    depth: dict[str, int] = {}
    for nid in nodes:  # definition order puts a node's first dependency before it
        parent = nodes[nid]["after"][0] if nodes[nid]["after"] else None
        depth[nid] = depth.get(parent, -1) + 1 if parent in depth else 0
    width = max((3 * depth[n] + len(n) for n in nodes), default=4)

    def line(nid: str, prefix: str, last: bool) -> str:
        n = nodes[nid]
        label = f"{prefix}{'└─ ' if last else '├─ '}{nid}"
        parts = [f"{label:<{width + 3}}  {n['state']:<9}"]
        if n["queue"]:
            parts.append(f"queue={n['queue']}")
        if n["attempts"] > 1 or n["recoveries"] or n["retries"]:
            parts.append(f"attempts={n['attempts']} retries={n['retries']} "
                         f"recoveries={n['recoveries']}")
        took = _fmt_secs(n["started_at"], n["finished_at"])
        if took:
            parts.append(took)
        extra = n["after"][1:]
        if extra:
            parts.append("also after: " + ", ".join(extra))
        if n["skip_reason"]:
            parts.append(f"({n['skip_reason']})")
        if n["progress"]:
            p = n["progress"][-1]
            pct = "" if p["percent"] is None else f"{p['percent']:g}% "
            parts.append(f"[{pct}{p['message']}]")
        if n["error"]:
            parts.append(f"error: {n['error']}")
        if n["waiting_for"]:
            parts.append(f"waiting for {n['waiting_for']}")
        return "  ".join(parts)

    stack: list[tuple[str, str, bool]] = []
    roots = children.get(None, [])
    for i, r in enumerate(reversed(roots)):
        stack.append((r, "", i == 0))
    while stack:
        nid, prefix, last = stack.pop()
        lines.append(line(nid, prefix, last))
        kids = children.get(nid, [])
        child_prefix = prefix + ("   " if last else "│  ")
        for i, k in enumerate(reversed(kids)):
            stack.append((k, child_prefix, i == 0))
    return "\n".join(lines)


def watch(flows: Flows, fid: str, echo: Any, interval: float = 1.0) -> dict[str, Any]:
    while True:
        doc = describe(flows, fid)
        echo("\x1b[2J\x1b[H" + render_tree(doc))
        if doc["state"] in ("succeeded", "failed", "cancelled"):
            return doc
        time.sleep(interval)


def to_mermaid(doc: dict[str, Any]) -> str:
    ids = {nid: f"n{i}" for i, nid in enumerate(doc["nodes"])}
    lines = ["flowchart TD"]
    for nid, n in doc["nodes"].items():
        lines.append(f'    {ids[nid]}["{nid}<br/>{n["state"]}"]:::{n["state"]}')
    for nid, n in doc["nodes"].items():
        for dep in n["after"]:
            lines.append(f"    {ids[dep]} --> {ids[nid]}")
    colours = {"succeeded": "#c8e6c9", "failed": "#ffcdd2", "running": "#bbdefb",
               "skipped": "#eeeeee", "cancelled": "#e0e0e0", "queued": "#fff9c4"}
    for state, colour in colours.items():
        lines.append(f"    classDef {state} fill:{colour}")
    return "\n".join(lines)


def to_dot(doc: dict[str, Any]) -> str:
    lines = [f'digraph "{doc["id"]}" {{', "    rankdir=TB;"]
    for nid, n in doc["nodes"].items():
        lines.append(f'    "{nid}" [label="{nid}\\n{n["state"]}"];')
    for nid, n in doc["nodes"].items():
        for dep in n["after"]:
            lines.append(f'    "{dep}" -> "{nid}";')
    lines.append("}")
    return "\n".join(lines)
