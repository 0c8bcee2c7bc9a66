"""Compiling a :class:`~celery_flows.Flow` into flat node records.

Sub-flows are inlined under ``<sub-flow id>:``, trees and explicit input shapes
(``Flow.from_canvas``) become result references, and everything is validated (ids,
composed ids, size, cycles, options, registered tasks) before a key is written; user
data (calls, options, contexts) is kept apart from the records, to be stored as blobs.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import FlowDefinitionError
from .entries import Definition, Entry
from .records import (
    NodeRecord,
    Ref,
    check_acyclic,
    context_field,
    link,
    longest_paths,
    mark_maps,
    new_record,
    ref_ids,
    rename_ref,
)
from .validate import MAX_ID_LENGTH, check_id, check_rate

if TYPE_CHECKING:
    from celery import Celery
    from celery.canvas import Signature

    from ..config import FlowsConfig

# signature options (``sig.set(...)``) sent with the node's message as given
PASSTHROUGH_OPTIONS = ("time_limit", "soft_time_limit", "expires", "headers", "routing_key",
                       "exchange", "ignore_result", "serializer", "compression")


# node id -> (args, kwargs, signature options sent as given)
Calls = dict[str, tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]]


@dataclass
class CompiledFlow:
    """What ``submit`` writes: flow options and node records in definition order; the
    user data apart, to be serialised with the app's serializer."""

    id: str
    name: str
    context: dict[str, Any]
    options: dict[str, Any]
    records: dict[str, NodeRecord]
    calls: Calls
    # args-hash field (see records.context_field) -> a sub-flow's context overlay
    contexts: dict[str, dict[str, Any]]


def compile_flow(flow: Definition, app: Celery, config: FlowsConfig, flow_id: str | None = None
                 ) -> CompiledFlow:
    """Validate and flatten; raises FlowDefinitionError before anything is written."""
    fid = flow_id or flow.id or uuid.uuid4().hex
    check_id(fid, "flow id")
    # first, and cheaply: an oversized flow must not cost the work below
    total = count_nodes(flow)
    if total > config.max_nodes:
        raise FlowDefinitionError(
            f"flow {flow.name!r} has {total} nodes (sub-flows inlined), more than "
            f"flows_max_nodes={config.max_nodes}; split it into several flows or raise "
            "app.conf.flows_max_nodes"
        )
    if flow.rate_limit is not None:
        check_rate(flow.rate_limit, config, "flow rate_limit")
    records: dict[str, NodeRecord] = {}
    calls: Calls = {}
    contexts: dict[str, dict[str, Any]] = {}
    _flatten(flow, app, config, "", records, calls, {}, None, stack=[],
             origins={}, contexts=contexts)
    order = check_acyclic(records)
    link(records)
    mark_maps(records)
    paths = longest_paths(records, order)
    for seq, (nid, rec) in enumerate(records.items()):
        rec["seq"] = seq
        rec["lp"] = paths[nid]
    options: dict[str, Any] = {
        "rate_limit": flow.rate_limit,
        "webhook": flow.webhook,
        "fail_fast": flow.fail_fast,
    }
    concurrency = getattr(flow, "concurrency", None)
    if concurrency is not None:
        # left out without a group: earlier digests stay the same
        if concurrency[0] not in config.concurrency_limits:
            known = ", ".join(map(repr, config.concurrency_limits)) or "none"
            raise FlowDefinitionError(
                f"flow {flow.name!r}: concurrency group {concurrency[0]!r} is not in "
                f"flows_concurrency_limits (configured: {known}); add it, e.g. "
                f"app.conf.flows_concurrency_limits = {{{concurrency[0]!r}: 1}}")
        options["concurrency"] = list(concurrency)
        options["on_limit"] = getattr(flow, "on_limit", "queue")
    events = tuple(getattr(flow, "webhook_events", ("flow",)))
    if events != ("flow",):  # left out at its default: earlier digests stay the same
        options["webhook_events"] = list(events)
    return CompiledFlow(
        id=fid,
        name=flow.name,
        context=flow.context,
        options=options,
        records=records,
        calls=calls,
        contexts=contexts,
    )


def count_nodes(flow: Definition) -> int:
    """Nodes of the flow with its sub-flows inlined, without inlining them: a sub-flow
    used many times is counted once (memoised), so this stays fast however the
    definition multiplies. Iterative: nesting depth costs no stack."""
    memo: dict[int, int] = {}
    stack: list[tuple[Definition, bool]] = [(flow, False)]
    open_: set[int] = set()
    while stack:
        current, expanded = stack.pop()
        key = id(current)
        if expanded:
            open_.discard(key)
            memo[key] = sum(memo[id(e.body)] if e.kind == "subflow" else 1
                            for e in current._entries.values())
            continue
        if key in memo:
            continue
        if key in open_:
            raise FlowDefinitionError(
                f"flow {current.name!r} contains itself as a sub-flow"
            )
        open_.add(key)
        stack.append((current, True))
        for entry in current._entries.values():
            if entry.kind == "subflow" and id(entry.body) not in memo:
                if id(entry.body) in open_:
                    raise FlowDefinitionError(
                        f"flow {entry.body.name!r} contains itself as a sub-flow"
                    )
                stack.append((entry.body, False))
    return memo[id(flow)]

def _flatten(
    flow: Definition,
    app: Celery,
    config: FlowsConfig,
    prefix: str,
    records: dict[str, NodeRecord],
    calls: Calls,
    outer: dict[str, Any],
    ctx: dict[str, Any] | None,
    stack: list[Definition],
    origins: dict[str, str],
    contexts: dict[str, dict[str, Any]],
) -> dict[str, tuple[list[str], Ref]]:
    """Add this flow's nodes under ``prefix``; ``outer`` gives, for the sub-flow
    node being inlined, ``after`` (its deps in the parent) and ``input`` (its
    input ref). ``ctx`` is the context overlay of this sub-flow, stored once under
    ``contexts[context_field(prefix[:-1])]``; ``origins`` says where each composed id
    came from (for collisions). Returns for each sub-flow entry: (final node ids,
    output ref).

    Recursion follows sub-flow nesting, which composed ids bound: a sub-flow id leaves
    room for ``:x`` within 128 characters, so no flow nests deeper than 64 levels."""
    if any(f is flow for f in stack):
        raise FlowDefinitionError(f"flow {flow.name!r} contains itself as a sub-flow")
    stack = [*stack, flow]
    ctx_field = context_field(prefix[:-1]) if ctx else None
    if ctx:
        contexts[context_field(prefix[:-1])] = ctx
    # sub-flow entry id -> (its final node ids, ref that stands for its result)
    subs: dict[str, tuple[list[str], Ref]] = {}
    for entry in flow._entries.values():
        for dep in entry.after:
            if dep not in flow._entries:
                raise FlowDefinitionError(
                    f"node {prefix + entry.id!r}: 'after' names unknown node {dep!r}"
                )
    order = _entry_order(flow._entries, prefix)
    tasks = app.tasks  # a cached property, costly per access over 100,000 nodes
    for eid in order:
        entry = flow._entries[eid]
        nid = prefix + eid
        where = f"node {eid!r} of sub-flow {prefix[:-1]!r}" if prefix else f"node {nid!r}"
        if entry.kind == "map":
            last = f"{nid}[{max(int(entry.opts['mlen']) - 1, 0)}]"
            if len(last) > MAX_ID_LENGTH:
                raise FlowDefinitionError(
                    f"{where}: the id of its last item, {last[:60]}..., would be "
                    f"{len(last)} characters, more than {MAX_ID_LENGTH}; use a shorter "
                    "map id or a smaller max_length")
        if len(nid) > MAX_ID_LENGTH - (2 if entry.kind == "subflow" else 0):
            raise FlowDefinitionError(
                f"{where}: its composed id {nid[:60]}... is {len(nid)} characters; "
                f"composed ids (sub-flow ids joined by ':') may hold at most "
                f"{MAX_ID_LENGTH}" + (", the nodes inside included" if entry.kind == "subflow"
                                      else "") + "; use shorter ids or fewer levels"
            )
        # dependencies in the flat graph and the input ref, sub-flows expanded
        flat_after: list[str] = []
        input_parts: list[Ref] = []
        for dep in entry.after:
            if dep in subs:
                finals, out_ref = subs[dep]
                flat_after.extend(f for f in finals if f not in flat_after)
                input_parts.append(out_ref)
            else:
                flat_after.append(prefix + dep)
                input_parts.append(prefix + dep)
        is_root = not entry.after
        if is_root and outer:
            flat_after = list(outer["after"])
        if entry.kind == "subflow":
            sub: Definition = entry.body
            sub_outer = {
                "after": flat_after,
                "input": _input_of(input_parts, entry, is_root, outer),
            }
            sub_ctx = {**(ctx or {}), **sub.context}
            before = set(records)
            _flatten(sub, app, config, nid + ":", records, calls, sub_outer, sub_ctx, stack,
                     origins, contexts)
            added = [k for k in records if k not in before]
            if not added:
                raise FlowDefinitionError(f"sub-flow node {nid!r} has no nodes")
            used_as_dep = {d for k in added for d in records[k]["after"]}
            finals = [k for k in added if k not in used_as_dep]
            policy = entry.opts.get("policy", "fail")
            for k in added:
                if records[k]["fpol"] == "fail":
                    records[k]["fpol"] = policy
            for k in finals:
                records[k]["epol"] = policy
            sub_ref: Ref = (
                finals[0] if len(finals) == 1
                else {"map": [[k[len(nid) + 1:], k] for k in finals]}
            )
            subs[eid] = (finals, sub_ref)
            continue
        opts = dict(entry.opts)
        if entry.kind == "external":
            rec = new_record(task=None, kind="external", after=flat_after, input=None,
                             timeout=opts.get("timeout"), policy=opts.get("policy", "fail"),
                             rule=opts.get("rule", "all_success"))
        else:
            sig: Signature = entry.body
            task_name = sig.task
            task = tasks.get(task_name)
            _check_registered(app, nid, task_name, task)
            defaults: dict[str, Any] = getattr(task, "flows_defaults", None) or {}
            rate = opts.get("rate", defaults.get("rate"))
            if rate is not None:
                check_rate(rate, config, f"node {nid!r} rate_limit")
            if "input" in opts:
                # an explicit input shape (Flow.from_canvas): refs name entries
                rename: dict[str, Ref] = {e: prefix + e for e in flow._entries}
                rename.update({e: sub_out for e, (_f, sub_out) in subs.items()})
                input_ref: Ref = rename_ref(opts.pop("input"), rename)
            elif entry.children is not None:
                input_ref = [prefix + c for c in entry.children]
                if len(entry.after) > len(entry.children):
                    input_ref = input_parts
            else:
                input_ref = _input_of(input_parts, entry, is_root, outer)
            if input_ref is None and is_root and outer and "input" in entry.opts:
                # a from_canvas flow used as a sub-flow: its first tasks take the
                # sub-flow node's input, as roots of any sub-flow do
                input_ref = outer["input"]
            if sig.immutable:
                input_ref = None
            sig_opts = dict(sig.options)
            if entry.kind == "map":
                if len(entry.after) != 1:
                    raise FlowDefinitionError(f"map {nid!r}: over= takes one node")
                input_ref = input_parts[0]
            rec = new_record(
                task=task_name,
                kind=entry.kind,
                after=flat_after,
                input=input_ref,
                queue=opts.get("queue", sig_opts.get("queue") or defaults.get("queue")),
                priority=opts.get("priority", sig_opts.get("priority",
                                                         defaults.get("priority"))),
                rate=rate,
                policy=opts.get("policy", defaults.get("policy", "fail")),
                rule=opts.get("rule", defaults.get("rule", "all_success")),
                max_rec=opts.get("max_rec", defaults.get("max_rec")),
                timeout=opts.get("timeout"),
                poke=opts.get("poke"),
            )
            if entry.kind == "map":
                rec["mlen"] = opts["mlen"]
                if opts.get("mact") is not None:
                    rec["mact"] = opts["mact"]
            passthrough = {k: v for k, v in sig_opts.items() if k in PASSTHROUGH_OPTIONS}
            calls[nid] = (tuple(sig.args), dict(sig.kwargs), passthrough)
        rec["ctx"] = ctx_field
        for ref_id in ref_ids(rec["input"]):
            if ref_id not in rec["after"]:
                rec["after"].append(ref_id)
        if nid in records:
            raise FlowDefinitionError(
                f"node id {nid!r} is used twice: by {origins[nid]} and by {where}; rename "
                "one of them (a sub-flow's nodes are named '<sub-flow id>:<node id>')"
            )
        origins[nid] = where
        records[nid] = rec
    return subs


def _input_of(parts: list[Ref], entry: Entry, is_root: bool, outer: dict[str, Any]) -> Ref:
    if is_root and outer:
        ref: Ref = outer["input"]
        return ref
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return list(parts)


def _entry_order(entries: dict[str, Entry], prefix: str) -> list[str]:
    """Entries in an order where dependencies come first (sub-flows must be inlined
    before their dependents); a cycle is reported by node id."""
    done: list[str] = []
    seen: set[str] = set()
    visiting: set[str] = set()
    for start in entries:
        if start in seen:
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        visiting.add(start)
        while stack:
            eid, i = stack[-1]
            deps = entries[eid].after
            if i < len(deps):
                stack[-1] = (eid, i + 1)
                dep = deps[i]
                if dep in visiting:
                    raise FlowDefinitionError(
                        f"the flow has a cycle through node {prefix + dep!r}"
                    )
                if dep not in seen:
                    visiting.add(dep)
                    stack.append((dep, 0))
            else:
                stack.pop()
                visiting.discard(eid)
                seen.add(eid)
                done.append(eid)
    return done


def _check_registered(app: Celery, nid: str, name: str, task: Any) -> None:
    if task is not None:
        return
    module = name.rsplit(".", 1)[0] if "." in name else ""
    # A producer may send by name to tasks it never imports; only a task missing from
    # a module this process did import (or a bare name) is a definite mistake.
    if module and module not in sys.modules:
        return
    raise FlowDefinitionError(
        f"node {nid!r}: task {name!r} is not registered with app {app.main!r}; "
        "check the task name or import the module that defines it"
    )
