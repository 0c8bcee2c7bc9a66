"""``current_flow``: what a running node knows about its flow."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

from .logcontext import Token as LogToken
from .logcontext import enter_scope, leave_scope
from .outcomes import Outcomes

__all__ = ["CurrentFlow", "FlowRun", "current_flow", "enter", "leave"]


@dataclass
class FlowRun:
    """One node attempt being executed in this process (its outcome is recorded
    through ``outcomes``)."""

    outcomes: Outcomes
    id: str
    node_id: str
    attempt: int
    task_id: str
    context: dict[str, Any] = field(default_factory=dict)
    retry_recorded: bool = False
    log_token: LogToken | None = field(default=None, repr=False)

    def results(self) -> dict[str, Any]:
        return self.outcomes.dependency_results(self.id, self.node_id)

    def failures(self) -> dict[str, str]:
        return self.outcomes.dependency_failures(self.id, self.node_id)

    def progress(self, percent: float | None = None, message: str = "") -> None:
        self.outcomes.store.progress(self.id, self.node_id, self.attempt, percent, message)

    @property
    def cancelled(self) -> bool:
        """True once the flow is cancelled (or fail_fast stopped it)."""
        meta = self.outcomes.store.meta(self.id)
        if meta is None or meta.get("state") == "cancelled":
            return True
        rec = self.outcomes.store.node(self.id, self.node_id)
        return rec is None or rec.get("state") == "cancelled"


_current: contextvars.ContextVar[FlowRun | None] = contextvars.ContextVar(
    "celery_flows_current", default=None
)


def enter(run: FlowRun) -> contextvars.Token[FlowRun | None]:
    """``run`` is the node running here; log records carry its ids (logcontext.py)."""
    run.log_token = enter_scope(run.id, run.node_id)
    return _current.set(run)


def leave(token: contextvars.Token[FlowRun | None]) -> None:
    run = _current.get()
    _current.reset(token)
    if run is not None and run.log_token is not None:
        leave_scope(run.log_token)
        run.log_token = None


class CurrentFlow:
    """``current_flow``: the node attempt running in this thread (falsy outside a
    flow node's task). Its id, node id, attempt and context, its dependencies'
    results and failures, whether the flow was cancelled, and ``progress()``."""

    def _run(self) -> FlowRun:
        run = _current.get()
        if run is None:
            raise RuntimeError("current_flow is only available inside a flow node's task")
        return run

    def __bool__(self) -> bool:
        return _current.get() is not None

    def __repr__(self) -> str:
        run = _current.get()
        if run is None:
            return "<current_flow: not in a flow>"
        return f"<current_flow {run.id}/{run.node_id} attempt {run.attempt}>"

    @property
    def id(self) -> str:
        return self._run().id

    @property
    def node_id(self) -> str:
        return self._run().node_id

    @property
    def attempt(self) -> int:
        return self._run().attempt

    @property
    def context(self) -> dict[str, Any]:
        return self._run().context

    @property
    def cancelled(self) -> bool:
        return self._run().cancelled

    def results(self) -> dict[str, Any]:
        """{dependency id: result} of this node's dependencies that succeeded."""
        return self._run().results()

    def failures(self) -> dict[str, str]:
        """{dependency id: "ExcType: message"} of failed dependencies it may run past."""
        return self._run().failures()

    def progress(self, percent: float | None = None, message: str = "") -> None:
        """Record a milestone, visible in ``flows inspect``."""
        self._run().progress(percent, message)


current_flow = CurrentFlow()
