"""The builder users touch: :class:`Flow` and the :class:`Node` handles it returns.

A flow is only a definition until it is submitted; :meth:`Flow.compile` turns it into
flat node records (see :mod:`celery_flows.models`), inlining sub-flows and trees, and
validates everything before a single key is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from celery.canvas import Signature

from ..config import FlowsConfig
from ..errors import FlowDefinitionError
from .canvas import flow_from_canvas
from .compile import CompiledFlow, compile_flow
from .entries import Entry
from .records import Ref
from .validate import (
    check_id,
    check_new_id,
    check_node_opts,
    check_rate,
    check_signature,
    new_node_id,
)

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["Flow", "Node"]


@dataclass(eq=False)
class Node:
    """Handle to a node of a :class:`Flow` under construction; pass it in ``after=``."""

    flow: Flow
    id: str

    def __repr__(self) -> str:
        return f"<Node {self.id!r} of flow {self.flow.name!r}>"


AfterSpec: TypeAlias = "str | Node"


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
        webhook_events: tuple[str, ...] | list[str] = ("flow",),
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
            check_rate(rate_limit, None, "flow rate_limit")
        if webhook is not None and (
            not isinstance(webhook, str) or not webhook.startswith(("http://", "https://"))
        ):
            raise FlowDefinitionError(
                f"flow webhook {webhook!r}: only http:// and https:// URLs are accepted"
            )
        if not isinstance(fail_fast, bool):
            raise FlowDefinitionError("flow fail_fast must be True or False")
        if isinstance(webhook_events, str) or not isinstance(webhook_events, (tuple, list)) \
                or not webhook_events or not set(webhook_events) <= {"flow", "node"}:
            raise FlowDefinitionError(
                f"flow webhook_events {webhook_events!r}: give a tuple of 'flow' and/or "
                "'node', e.g. ('flow', 'node')")
        self.name = name or "flow"
        self.id = id
        self.context = context
        self.rate_limit = rate_limit
        self.webhook = webhook
        self.webhook_events = tuple(e for e in ("flow", "node") if e in webhook_events)
        self.fail_fast = fail_fast
        self._entries: dict[str, Entry] = {}
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
            check_signature(sig, id)
            if id is None:
                id = self._gen_id(sig.task)
            kind = "task"
        check_new_id(id, self._entries, self.name)
        if ":" in id and kind == "subflow":
            raise FlowDefinitionError(f"sub-flow node id {id!r} must not contain ':'")
        opts = check_node_opts(
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
        self._entries[id] = Entry(id, kind, sig, deps, child_ids, opts)
        return Node(self, id)

    def add_external(
        self, id: str, *, after: Sequence[AfterSpec] | AfterSpec | None = None,
        timeout: float = 3600, failure_policy: str | None = None,
        trigger_rule: str | None = None,
    ) -> Node:
        """A node completed from outside with ``flows.signal()`` (awaiting until then)."""
        check_new_id(id, self._entries, self.name)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise FlowDefinitionError(f"node {id!r}: timeout must be a number of seconds > 0")
        opts = check_node_opts(id, failure_policy=failure_policy, trigger_rule=trigger_rule)
        opts["timeout"] = float(timeout)
        deps = self._resolve_after(id, after)
        self._entries[id] = Entry(id, "external", None, deps, None, opts)
        return Node(self, id)

    def add_sensor(
        self, sig: Signature, *, id: str | None = None,
        after: Sequence[AfterSpec] | AfterSpec | None = None,
        poke_interval: float = 10, timeout: float = 600, queue: str | None = None,
        failure_policy: str | None = None, trigger_rule: str | None = None,
    ) -> Node:
        """A check task re-run every ``poke_interval`` seconds until it returns truthy."""
        check_signature(sig, id)
        if id is None:
            id = self._gen_id(sig.task)
        check_new_id(id, self._entries, self.name)
        for what, value in (("poke_interval", poke_interval), ("timeout", timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise FlowDefinitionError(f"node {id!r}: {what} must be a number > 0")
        opts = check_node_opts(
            id, queue=queue, failure_policy=failure_policy, trigger_rule=trigger_rule
        )
        opts["poke"] = float(poke_interval)
        opts["timeout"] = float(timeout)
        deps = self._resolve_after(id, after)
        self._entries[id] = Entry(id, "sensor", sig, deps, None, opts)
        return Node(self, id)

    def map(
        self, sig: Signature, *, over: AfterSpec, id: str | None = None,
        max_length: int = 1024, max_active: int | None = None, queue: str | None = None,
        priority: int | None = None, rate_limit: str | None = None,
        failure_policy: str | None = None, trigger_rule: str | None = None,
        max_recoveries: int | None = None,
    ) -> Node:
        """One node per item of ``over``'s list result (SPEC section 12): ``each[0]``,
        ``each[1]``, ... each get their item as input; to its dependents the map is one
        node whose result is the list of the items' results, in order."""
        check_signature(sig, id)
        if sig.immutable:
            raise FlowDefinitionError(
                f"map {id or sig.task!r}: an immutable signature (.si()) cannot take the "
                "items; use .s()")
        if id is None:
            id = self._gen_id(sig.task)
        check_new_id(id, self._entries, self.name)
        if failure_policy == "remove":
            raise FlowDefinitionError(
                f"map {id!r}: failure_policy 'remove' is refused for maps (an item cannot "
                "leave the list); use 'fail' or 'ignore'")
        for what, value, low in (("max_length", max_length, 0), ("max_active", max_active, 1)):
            if value is None and what == "max_active":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FlowDefinitionError(f"map {id!r}: {what} must be an int >= {low}")
        opts = check_node_opts(
            id, queue=queue, priority=priority, rate_limit=rate_limit,
            failure_policy=failure_policy, trigger_rule=trigger_rule,
            max_recoveries=max_recoveries,
        )
        opts["mlen"] = max_length
        if max_active is not None:
            opts["mact"] = max_active
        if isinstance(over, (list, tuple)) or over is None:
            raise FlowDefinitionError(f"map {id!r}: over= takes one node (id or Node)")
        deps = self._resolve_after(id, over)
        self._entries[id] = Entry(id, "map", sig, deps, None, opts)
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
        return flow_from_canvas(cls(name, **options), canvas)

    # -- helpers --------------------------------------------------------------------

    def _gen_id(self, task_name: str) -> str:
        return new_node_id(task_name, self._entries, self._counts)

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

    # -- compiling ------------------------------------------------------------------

    def compile(self, app: Celery, config: FlowsConfig, flow_id: str | None = None
                ) -> CompiledFlow:
        """Validate and flatten; raises FlowDefinitionError before anything is written."""
        return compile_flow(self, app, config, flow_id)
