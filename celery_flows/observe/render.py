"""Drawing a flow's ``inspect`` document: the text tree of ``flows inspect``, Mermaid and
Graphviz dot for ``flows graph``."""

from __future__ import annotations

from typing import Any

from ..registry import Store
from .inspect import describe

__all__ = ["render_tree", "to_dot", "to_mermaid", "watch"]


def _fmt_secs(a: Any, b: Any) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return f"{b - a:.2f}s"
    return ""


#: A map's items drawn one by one; past this many, the first ones that did not succeed
#: are drawn, and the rest counted on one line
SHOWN_ITEMS = 24


def _shown_items(items: list[str], nodes: dict[str, Any]) -> tuple[list[str], str]:
    """The items of a map to draw, and the line that counts the others ('' if none)."""
    if len(items) <= SHOWN_ITEMS:
        return items, ""
    first = [i for i in items if nodes[i]["state"] != "succeeded"][:SHOWN_ITEMS] \
        or items[:SHOWN_ITEMS]
    shown = set(first)
    counts: dict[str, int] = {}
    for i in items:
        if i not in shown:
            counts[nodes[i]["state"]] = counts.get(nodes[i]["state"], 0) + 1
    return [i for i in items if i in shown], (
        f"... {len(items) - len(first)} more items: " +
        ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


def render_tree(doc: dict[str, Any]) -> str:
    """A node is drawn under its first dependency (a map's items under their map);
    other dependencies are named."""
    nodes: dict[str, Any] = doc["nodes"]
    children: dict[str | None, list[str]] = {}
    for nid, n in nodes.items():
        parent = n["after"][0] if n["after"] else None
        children.setdefault(parent, []).append(nid)
    more: dict[str, str] = {}
    for nid, n in nodes.items():
        if n.get("items") and nid in children:
            items = [c for c in children[nid] if nodes[c].get("map") == nid]
            shown, more[nid] = _shown_items(items, nodes)
            children[nid] = [c for c in children[nid] if c not in set(items) - set(shown)]
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
        if nid.startswith("\0"):
            lines.append(f"{prefix}{'└─ ' if last else '├─ '}{nid[1:]}")
            continue
        lines.append(line(nid, prefix, last))
        kids = children.get(nid, [])
        if more.get(nid):
            kids = [*kids, "\0" + more[nid]]
        child_prefix = prefix + ("   " if last else "│  ")
        for i, k in enumerate(reversed(kids)):
            stack.append((k, child_prefix, i == 0))
    return "\n".join(lines)


def watch(store: Store, fid: str, echo: Any, interval: float = 1.0) -> dict[str, Any]:
    """Redraw the tree whenever the flow's event stream has something new (no polling
    of the whole flow), until the flow is terminal; returns the last document."""
    after = store.last_event_id(fid)
    while True:
        doc = describe(store, fid)
        echo("\x1b[2J\x1b[H" + render_tree(doc))
        if doc["state"] in ("succeeded", "failed", "cancelled"):
            return doc
        while True:
            # read before looking at the state: a terminal state then means its event
            # was read, or comes in the next read
            events = store.read_events(fid, after, block=interval)
            if events:
                after = events[-1]["id"]
                # drain what else arrived, then redraw once
                while events:
                    events = store.read_events(fid, after)
                    after = events[-1]["id"] if events else after
                break
            meta = store.meta(fid)
            if meta is None or meta.get("state") in ("succeeded", "failed", "cancelled"):
                break


def _graph_nodes(doc: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The boxes and edges of a drawing: a map's items as in the tree (past
    SHOWN_ITEMS, one box counts the others)."""
    nodes: dict[str, Any] = dict(doc["nodes"])
    for nid, n in doc["nodes"].items():
        if not n.get("items"):
            continue
        items = [c for c, m in doc["nodes"].items() if m.get("map") == nid]
        shown, line = _shown_items(items, doc["nodes"])
        for c in set(items) - set(shown):
            del nodes[c]
        if line:
            nodes[f"{nid}[...]"] = {"state": "items", "after": [nid], "label": line[4:]}
    edges = [(dep, nid) for nid, n in nodes.items() for dep in n["after"] if dep in nodes]
    return nodes, edges


def to_mermaid(doc: dict[str, Any]) -> str:
    nodes, edges = _graph_nodes(doc)
    ids = {nid: f"n{i}" for i, nid in enumerate(nodes)}
    lines = ["flowchart TD"]
    for nid, n in nodes.items():
        label = n.get("label") or n["state"]
        lines.append(f'    {ids[nid]}["{nid}<br/>{label}"]:::{n["state"]}')
    for dep, nid in edges:
        lines.append(f"    {ids[dep]} --> {ids[nid]}")
    colours = {"succeeded": "#c8e6c9", "failed": "#ffcdd2", "running": "#bbdefb",
               "skipped": "#eeeeee", "cancelled": "#e0e0e0", "queued": "#fff9c4"}
    for state, colour in colours.items():
        lines.append(f"    classDef {state} fill:{colour}")
    return "\n".join(lines)


def to_dot(doc: dict[str, Any]) -> str:
    nodes, edges = _graph_nodes(doc)
    lines = [f'digraph "{doc["id"]}" {{', "    rankdir=TB;"]
    for nid, n in nodes.items():
        lines.append(f'    "{nid}" [label="{nid}\\n{n.get("label") or n["state"]}"];')
    for dep, nid in edges:
        lines.append(f'    "{dep}" -> "{nid}";')
    lines.append("}")
    return "\n".join(lines)
