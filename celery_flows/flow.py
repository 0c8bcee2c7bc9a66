"""The builder users touch: :class:`Flow` and the :class:`Node` handles it returns.

A flow is only a definition until it is submitted; :meth:`Flow.compile` turns it into
flat node records (see :mod:`celery_flows.models`), inlining sub-flows and trees, and
validates everything before a single key is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from celery.canvas import Signature, _chain, _chord, group

from .config import FlowsConfig
from .errors import FlowDefinitionError
from .models import Ref, check_id, check_node_opts, check_rate

if TYPE_CHECKING:
    from celery import Celery

    from .compile import CompiledFlow
    from .config import FlowsConfig

__all__ = ["Flow", "Node"]

FORBIDDEN_SIG_OPTIONS = ("countdown", "eta", "link", "link_error", "task_id")


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
            check_rate(rate_limit, None, "flow rate_limit")
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
        opts = check_node_opts(id, failure_policy=failure_policy, trigger_rule=trigger_rule)
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
        opts = check_node_opts(
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

    def compile(self, app: Celery, config: FlowsConfig, flow_id: str | None = None
                ) -> CompiledFlow:
        """Validate and flatten; raises FlowDefinitionError before anything is written."""
        from .compile import compile_flow

        return compile_flow(self, app, config, flow_id)
