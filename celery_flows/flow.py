"""The builder users touch: :class:`Flow` and the :class:`Node` handles it returns.

A flow is only a definition until it is submitted; :meth:`Flow.compile` turns it into
flat node records (see :mod:`celery_flows.models`), inlining sub-flows and trees, and
validates everything before a single key is written.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from celery.canvas import Signature, _chain, _chord, group

from .config import RATE_RE, FlowsConfig, parse_rate
from .errors import FlowDefinitionError
from .models import (
    FAILURE_POLICIES,
    TRIGGER_RULES,
    Ref,
    check_acyclic,
    check_id,
    link,
    new_record,
    ref_ids,
    rename_ref,
)

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["Flow", "Node"]

FORBIDDEN_SIG_OPTIONS = ("countdown", "eta", "link", "link_error", "task_id")
# signature options (``sig.set(...)``) sent with the node's message as given
PASSTHROUGH_OPTIONS = ("time_limit", "soft_time_limit", "expires", "headers", "routing_key",
                       "exchange", "ignore_result", "serializer", "compression")
_UNSET: Any = object()


@dataclass(eq=False)
class Node:
    """Handle to a node of a :class:`Flow` under construction; pass it in ``after=``."""

    flow: Flow
    id: str

    def __repr__(self) -> str:
        return f"<Node {self.id!r} of flow {self.flow.name!r}>"


AfterSpec: TypeAlias = "str | Node"


@dataclass
class _Entry:
    id: str
    kind: str  # task | subflow | external | sensor
    body: Any  # Signature | Flow | None
    after: list[str]
    children: list[str] | None = None
    opts: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompiledFlow:
    """What ``submit`` writes: flow options and node records in definition order."""

    id: str
    name: str
    context: dict[str, Any]
    options: dict[str, Any]
    records: dict[str, dict[str, Any]]
    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]]  # node id -> (args, kwargs)


class Flow:
    """A DAG (or tree) of Celery tasks, built with :meth:`add` and friends.

    ``Flow("nightly", context={...}, rate_limit="20/s", fail_fast=False, webhook=None,
    id=None)``: the id is generated at submit when omitted.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        id: str | None = None,
        context: dict[str, Any] | None = None,
        rate_limit: str | None = None,
        webhook: str | None = None,
        fail_fast: bool = False,
    ) -> None:
        if name is not None and not isinstance(name, str):
            raise FlowDefinitionError(f"flow name must be a string, got {name!r}")
        if id is not None:
            check_id(id, "flow id")
        if context is None:
            context = {}
        if not isinstance(context, dict):
            raise FlowDefinitionError("flow context must be a dict (JSON-serialisable)")
        if rate_limit is not None:
            _check_rate(rate_limit, None, "flow rate_limit")
        if webhook is not None and (
            not isinstance(webhook, str) or not webhook.startswith(("http://", "https://"))
        ):
            raise FlowDefinitionError(
                f"flow webhook {webhook!r}: only http:// and https:// URLs are accepted"
            )
        if not isinstance(fail_fast, bool):
            raise FlowDefinitionError("flow fail_fast must be True or False")
        self.name = name or "flow"
        self.id = id
        self.context = context
        self.rate_limit = rate_limit
        self.webhook = webhook
        self.fail_fast = fail_fast
        self._entries: dict[str, _Entry] = {}
        self._counts: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<Flow {self.name!r} nodes={len(self._entries)}>"

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def node_ids(self) -> list[str]:
        return list(self._entries)

    # -- building -------------------------------------------------------------------

    def add(
        self,
        sig: Signature | Flow,
        *,
        id: str | None = None,
        after: Sequence[AfterSpec] | AfterSpec | None = None,
        queue: str | None = None,
        priority: int | None = None,
        rate_limit: str | None = None,
        failure_policy: str | None = None,
        trigger_rule: str | None = None,
        max_recoveries: int | None = None,
        children: list[Signature] | None = None,
    ) -> Node:
        """Add a task (a Celery signature) or a sub-flow and return its :class:`Node`."""
        if isinstance(sig, Flow):
            if children:
                raise FlowDefinitionError("a sub-flow node cannot take children=")
            if sig is self:
                raise FlowDefinitionError("a flow cannot contain itself")
            if id is None:
                id = self._gen_id(sig.name)
            kind = "subflow"
        else:
            self._check_sig(sig, id)
            if id is None:
                id = self._gen_id(sig.task)
            kind = "task"
        check_id(id, "node id")
        if ":" in id and kind == "subflow":
            raise FlowDefinitionError(f"sub-flow node id {id!r} must not contain ':'")
        if id in self._entries:
            raise FlowDefinitionError(f"node id {id!r} is used twice in flow {self.name!r}")
        opts = _check_node_opts(
            id, queue=queue, priority=priority, rate_limit=rate_limit,
            failure_policy=failure_policy, trigger_rule=trigger_rule,
            max_recoveries=max_recoveries,
        )
        deps = self._resolve_after(id, after)
        child_ids: list[str] | None = None
        if children is not None:
            if not isinstance(children, (list, tuple)) or not children:
                raise FlowDefinitionError(
                    f"node {id!r}: children= must be a non-empty list of signatures"
                )
            child_ids = []
            for child in children:
                # children run before the parent and inherit its 'after'
                child_node = self.add(child, after=[*deps] or None)
                child_ids.append(child_node.id)
            deps = [*deps, *child_ids]
        self._entries[id] = _Entry(id, kind, sig, deps, child_ids, opts)
        return Node(self, id)

    def add_external(
        self, id: str, *, after: Sequence[AfterSpec] | AfterSpec | None = None,
        timeout: float = 3600, failure_policy: str | None = None,
        trigger_rule: str | None = None,
    ) -> Node:
        """A node completed from outside with ``flows.signal()`` (awaiting until then)."""
        check_id(id, "node id")
        if id in self._entries:
            raise FlowDefinitionError(f"node id {id!r} is used twice in flow {self.name!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise FlowDefinitionError(f"node {id!r}: timeout must be a number of seconds > 0")
        opts = _check_node_opts(id, failure_policy=failure_policy, trigger_rule=trigger_rule)
        opts["timeout"] = float(timeout)
        deps = self._resolve_after(id, after)
        self._entries[id] = _Entry(id, "external", None, deps, None, opts)
        return Node(self, id)

    def add_sensor(
        self, sig: Signature, *, id: str | None = None,
        after: Sequence[AfterSpec] | AfterSpec | None = None,
        poke_interval: float = 10, timeout: float = 600, queue: str | None = None,
        failure_policy: str | None = None, trigger_rule: str | None = None,
    ) -> Node:
        """A check task re-run every ``poke_interval`` seconds until it returns truthy."""
        self._check_sig(sig, id)
        if id is None:
            id = self._gen_id(sig.task)
        check_id(id, "node id")
        if id in self._entries:
            raise FlowDefinitionError(f"node id {id!r} is used twice in flow {self.name!r}")
        for what, value in (("poke_interval", poke_interval), ("timeout", timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise FlowDefinitionError(f"node {id!r}: {what} must be a number > 0")
        opts = _check_node_opts(
            id, queue=queue, failure_policy=failure_policy, trigger_rule=trigger_rule
        )
        opts["poke"] = float(poke_interval)
        opts["timeout"] = float(timeout)
        deps = self._resolve_after(id, after)
        self._entries[id] = _Entry(id, "sensor", sig, deps, None, opts)
        return Node(self, id)

    def _add_shaped(self, sig: Signature, *, after: Sequence[str], input: Ref,
                    id: str | None = None) -> Node:
        """Add a task whose input shape is given explicitly (used by from_canvas):
        ``input`` is a ref over entry ids of this flow, ``None`` for no input."""
        node = self.add(sig, id=id, after=[*after] or None)
        self._entries[node.id].opts["input"] = input
        return node

    @classmethod
    def from_canvas(cls, canvas: Signature, name: str | None = None, **options: Any) -> Flow:
        """Turn a chain, group, chord or signature (nested too) into a flow."""
        from .canvas import flow_from_canvas

        return flow_from_canvas(cls(name, **options), canvas)

    # -- helpers --------------------------------------------------------------------

    def _gen_id(self, task_name: str) -> str:
        short = str(task_name).rsplit(".", 1)[-1] or "node"
        short = "".join(c if c.isalnum() or c in "_-.:" else "_" for c in short)[:120]
        n = self._counts.get(short, 0)
        while True:
            n += 1
            candidate = short if n == 1 else f"{short}-{n}"
            if candidate not in self._entries:
                self._counts[short] = n
                return candidate

    def _resolve_after(self, id: str, after: Any) -> list[str]:
        if after is None:
            return []
        if isinstance(after, (str, Node)):
            after = [after]
        if not isinstance(after, (list, tuple)):
            raise FlowDefinitionError(
                f"node {id!r}: after= must be a list of node ids or Node objects"
            )
        out: list[str] = []
        for dep in after:
            if isinstance(dep, Node):
                if dep.flow is not self:
                    raise FlowDefinitionError(
                        f"node {id!r}: after= names node {dep.id!r} of another flow"
                    )
                dep_id = dep.id
            elif isinstance(dep, str):
                dep_id = dep
            else:
                raise FlowDefinitionError(
                    f"node {id!r}: after= entry {dep!r} is neither a node id nor a Node"
                )
            if dep_id == id:
                raise FlowDefinitionError(f"node {id!r} cannot depend on itself (a cycle)")
            if dep_id in out:
                raise FlowDefinitionError(f"node {id!r}: after= names {dep_id!r} twice")
            out.append(dep_id)
        return out

    @staticmethod
    def _check_sig(sig: Any, id: str | None) -> None:
        label = f"node {id!r}" if id else "a node"
        if isinstance(sig, (_chain, group, _chord)):
            raise FlowDefinitionError(
                f"{label}: add() takes one task signature, not a {type(sig).__name__}; "
                "use Flow.from_canvas() or add a sub-flow"
            )
        if not isinstance(sig, Signature):
            raise FlowDefinitionError(
                f"{label}: expected a Celery signature such as task.s(...), got {sig!r}"
            )
        bad = [k for k in FORBIDDEN_SIG_OPTIONS if sig.options.get(k) is not None]
        if bad:
            raise FlowDefinitionError(
                f"{label} ({sig.task}): signature option(s) {', '.join(bad)} are not "
                "allowed in a flow; express ordering with after= and let flows assign ids"
            )
        if not sig.task:
            raise FlowDefinitionError(f"{label}: signature has no task name")
        if str(sig.task).startswith("celery."):
            raise FlowDefinitionError(
                f"{label}: Celery's built-in task {sig.task!r} cannot be a flow node; "
                "wrap the work in a task of your own"
            )

    # -- compiling ------------------------------------------------------------------

    def compile(self, app: Celery, config: FlowsConfig, flow_id: str | None = None) -> CompiledFlow:
        """Validate and flatten; raises FlowDefinitionError before anything is written."""
        fid = flow_id or self.id or uuid.uuid4().hex
        check_id(fid, "flow id")
        if self.rate_limit is not None:
            _check_rate(self.rate_limit, config, "flow rate_limit")
        _check_json(self.context, "flow context")
        records: dict[str, dict[str, Any]] = {}
        calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._flatten(app, config, "", records, calls, {}, None, stack=[])
        check_acyclic(records)
        link(records)
        for seq, rec in enumerate(records.values()):
            rec["seq"] = seq
        return CompiledFlow(
            id=fid,
            name=self.name,
            context=self.context,
            options={
                "rate_limit": self.rate_limit,
                "webhook": self.webhook,
                "fail_fast": self.fail_fast,
            },
            records=records,
            calls=calls,
        )

    def _flatten(
        self,
        app: Celery,
        config: FlowsConfig,
        prefix: str,
        records: dict[str, dict[str, Any]],
        calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]],
        outer: dict[str, Any],
        ctx: dict[str, Any] | None,
        stack: list[Flow],
    ) -> dict[str, tuple[list[str], Ref]]:
        """Add this flow's nodes under ``prefix``; ``outer`` gives, for the sub-flow
        node being inlined, ``after`` (its deps in the parent) and ``input`` (its
        input ref). Returns for each sub-flow entry: (final node ids, output ref)."""
        if self in stack:
            raise FlowDefinitionError(f"flow {self.name!r} contains itself as a sub-flow")
        stack = [*stack, self]
        # sub-flow entry id -> (its final node ids, ref that stands for its result)
        subs: dict[str, tuple[list[str], Ref]] = {}
        for entry in self._entries.values():
            for dep in entry.after:
                if dep not in self._entries:
                    raise FlowDefinitionError(
                        f"node {prefix + entry.id!r}: 'after' names unknown node {dep!r}"
                    )
        order = _entry_order(self._entries, prefix)
        for eid in order:
            entry = self._entries[eid]
            nid = prefix + eid
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
                sub: Flow = entry.body
                sub_outer = {
                    "after": flat_after,
                    "input": _input_of(input_parts, entry, is_root, outer),
                }
                sub_ctx = {**(ctx or {}), **sub.context}
                _check_json(sub.context, f"sub-flow {nid!r} context")
                before = set(records)
                sub._flatten(app, config, nid + ":", records, calls, sub_outer, sub_ctx, stack)
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
                    else {"map": {k[len(nid) + 1:]: k for k in finals}}
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
                task = app.tasks.get(task_name)
                _check_registered(app, nid, task_name, task)
                defaults: dict[str, Any] = getattr(task, "flows_defaults", None) or {}
                rate = opts.get("rate", defaults.get("rate"))
                if rate is not None:
                    _check_rate(rate, config, f"node {nid!r} rate_limit")
                if "input" in opts:
                    # an explicit input shape (Flow.from_canvas): refs name entries
                    rename: dict[str, Ref] = {e: prefix + e for e in self._entries}
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
                passthrough = {k: v for k, v in sig_opts.items() if k in PASSTHROUGH_OPTIONS}
                if passthrough:
                    _check_json(passthrough, f"node {nid!r} signature options")
                    rec["opts"] = passthrough
                calls[nid] = (tuple(sig.args), dict(sig.kwargs))
            if ctx:
                rec["ctx"] = ctx
            for ref_id in ref_ids(rec["input"]):
                if ref_id not in rec["after"]:
                    rec["after"].append(ref_id)
            records[nid] = rec
        return subs


def _input_of(parts: list[Ref], entry: _Entry, is_root: bool, outer: dict[str, Any]) -> Ref:
    if is_root and outer:
        return outer["input"]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return list(parts)


def _entry_order(entries: dict[str, _Entry], prefix: str) -> list[str]:
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
    import sys

    module = name.rsplit(".", 1)[0] if "." in name else ""
    # A producer may send by name to tasks it never imports; only a task missing from
    # a module this process did import (or a bare name) is a definite mistake.
    if module and module not in sys.modules:
        return
    raise FlowDefinitionError(
        f"node {nid!r}: task {name!r} is not registered with app {app.main!r}; "
        "check the task name or import the module that defines it"
    )


def _check_rate(value: Any, config: FlowsConfig | None, what: str) -> None:
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


def _check_json(value: Any, what: str) -> None:
    import json

    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise FlowDefinitionError(f"{what} is not JSON-serialisable: {exc}") from None


def _check_node_opts(
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
        _check_rate(rate_limit, None, f"node {nid!r} rate_limit")
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
