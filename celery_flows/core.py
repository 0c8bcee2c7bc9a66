"""The :class:`Flows` extension object: the facade users hold. It wires the engine of
its app (built lazily, on first use) and delegates; nothing below it imports it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import FlowsConfig
from .define.flow import Flow
from .engine import Engine, attach, logcontext
from .engine.batch import submit_batch, submit_flow
from .engine.routing import node_defaults, with_call_defaults
from .observe.handle import FlowHandle
from .registry import Store
from .registry.codec import Codec
from .worker import signals, step

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["Flows"]


class Flows:
    """Attach celery-flows to a Celery app: ``flows = Flows(app)`` (also ``app.flows``).

    Submitting (:meth:`submit`, :meth:`add_bulk`, :meth:`get`), changing running flows
    (:meth:`cancel`, :meth:`pause`, :meth:`resume`, :meth:`retry`,
    :meth:`remove_dependency`, :meth:`ignore_failure`, :meth:`add_node`,
    :meth:`signal`) and the ``@flows.task`` decorator. Configuration is read from
    ``app.conf`` on first use (SPEC section 1).
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.engine: Engine = attach(app)
        app.flows = self
        step.install(app)
        signals.connect()
        logcontext.install()  # flow_id and node_id on every log record (SPEC 11)

    def __repr__(self) -> str:
        return f"<Flows of app {self.app.main!r}>"

    def close(self) -> None:
        """Close the registry's Redis connections (they reopen on next use)."""
        self.engine.close()

    @property
    def config(self) -> FlowsConfig:
        return self.engine.config

    @property
    def store(self) -> Store:
        return self.engine.store

    @property
    def codec(self) -> Codec:
        return self.engine.codec

    def _handle(self, flow_id: str) -> FlowHandle:
        return FlowHandle(self.engine.store, self.engine.codec, flow_id)

    # -- tasks -------------------------------------------------------------------------

    def task(self, *args: Any, queue: str | None = None, priority: int | None = None,
             flow_rate_limit: str | None = None, flow_failure_policy: str | None = None,
             flow_trigger_rule: str | None = None, flow_max_recoveries: int | None = None,
             **options: Any) -> Any:
        """``app.task`` plus flow defaults for the nodes of this task.

        ``queue=`` and ``priority=`` are the node defaults and also apply to calls of the
        task outside flows (without Celery's deprecated task attributes);
        ``flow_rate_limit`` is a cluster-wide limit for flow releases (Celery's own
        ``rate_limit=`` stays per worker).
        """
        defaults = node_defaults(queue, priority, flow_failure_policy, flow_trigger_rule,
                                 flow_max_recoveries, flow_rate_limit)

        def attach_defaults(task: Any) -> Any:
            task.flows_defaults = defaults
            if queue is not None or priority is not None:
                with_call_defaults(task, queue, priority)
            return task

        if len(args) == 1 and callable(args[0]):
            return attach_defaults(self.app.task(**options)(args[0]))

        def decorator(fun: Callable[..., Any]) -> Any:
            return attach_defaults(self.app.task(*args, **options)(fun))

        return decorator

    # -- submitting ----------------------------------------------------------------------

    def submit(self, flow: Flow) -> FlowHandle:
        """Store the flow atomically and release its roots. A retried submit of an
        identical definition with the same id returns the existing flow."""
        return self._handle(submit_flow(self.engine.submitter, flow))

    def add_bulk(self, flows: list[Flow]) -> list[FlowHandle]:
        """Submit several flows as one batch: all become visible and run, or none does
        (also on Redis Cluster, and if this process dies mid-batch)."""
        return [self._handle(fid) for fid in submit_batch(self.engine.submitter, flows)]

    def get(self, flow_id: str) -> FlowHandle:
        """Handle of an existing flow; FlowNotFoundError if unknown."""
        self.engine.store.require_meta(flow_id)
        return self._handle(flow_id)

    # -- changing running flows (SPEC section 6) -------------------------------------------

    def cancel(self, flow_id: str, terminate: bool = False, dry_run: bool = False
               ) -> dict[str, Any]:
        """Cancel the flow atomically: nothing is released after it and every unfinished
        node becomes cancelled. Running bodies continue (they can watch
        ``current_flow.cancelled``) unless ``terminate=True``, which revokes them with
        Celery's ``revoke(terminate=True)`` as a best effort (prefork only)."""
        return self.engine.changes.cancel(flow_id, terminate=terminate, dry_run=dry_run)

    def pause(self, flow_id: str, dry_run: bool = False) -> dict[str, Any]:
        """Hold every node that becomes ready (as ``scheduled``) until :meth:`resume`."""
        return self.engine.changes.pause(flow_id, dry_run=dry_run)

    def resume(self, flow_id: str, dry_run: bool = False) -> dict[str, Any]:
        """Release what became ready while the flow was paused."""
        return self.engine.changes.resume(flow_id, dry_run=dry_run)

    def retry(self, flow_id: str, dry_run: bool = False) -> dict[str, Any]:
        """Run again the nodes that failed under ``"fail"`` and the nodes skipped as
        ``upstream_failed`` because of them, as new attempts; nothing else re-runs."""
        return self.engine.changes.retry(flow_id, dry_run=dry_run)

    def remove_dependency(self, flow_id: str, node_id: str, dep_id: str,
                          dry_run: bool = False) -> dict[str, Any]:
        """Drop the edge ``dep_id -> node_id`` of a node not yet released."""
        return self.engine.changes.remove_dependency(flow_id, node_id, dep_id,
                                                     dry_run=dry_run)

    def ignore_failure(self, flow_id: str, node_id: str, dry_run: bool = False
                       ) -> dict[str, Any]:
        """Count a node that failed under ``"fail"`` as ``"ignore"`` from now on."""
        return self.engine.changes.ignore_failure(flow_id, node_id, dry_run=dry_run)

    def add_node(self, flow_id: str, sig: Any, after: list[Any] | None = None,
                 node_id: str | None = None, dry_run: bool = False, **options: Any
                 ) -> dict[str, Any]:
        """Add a task to a running flow; it runs once its dependencies allow."""
        return self.engine.changes.add_node(flow_id, sig, after=after, node_id=node_id,
                                            dry_run=dry_run, **options)

    def signal(self, flow_id: str, node_id: str, result: Any = None,
               error: str | None = None) -> str:
        """Complete an external node (``awaiting``): with ``result``, or failed with
        ``error``. Returns the flow's state."""
        return self.engine.changes.signal(flow_id, node_id, result=result, error=error)
