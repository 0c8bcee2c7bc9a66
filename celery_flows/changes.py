"""Changing a running flow (SPEC section 6): cancel, pause/resume, retry, edits, signals.

Each change is one Lua transition (see its file in ``lua/``), run with a dirty marker
and followed by a claim in the same round trip, so whatever it makes ready is
published at once (or by the sweeper if this process dies). ``dry_run=True`` runs the
same transition without writing and reports what would be released, skipped or
cancelled.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .dispatch import BATCH, CLAIM_LEASE
from .errors import FlowDefinitionError, FlowStateError
from .flow import Flow
from .models import check_node_opts, check_rate
from .store import check_code

if TYPE_CHECKING:
    from celery import Celery

    from .codec import Codec
    from .config import FlowsConfig
    from .dispatch import Dispatcher
    from .store import Store


class ChangesMixin:
    """The change methods of :class:`~celery_flows.Flows`."""

    app: Celery

    if TYPE_CHECKING:
        @property
        def store(self) -> Store: ...

        @property
        def config(self) -> FlowsConfig: ...

        @property
        def dispatcher(self) -> Dispatcher: ...

        @property
        def codec(self) -> Codec: ...

        def record(self, fid: str, nid: str, attempt: int, outcome: str, *,
                   result: Any = None, error: str = "", release: bool = True,
                   external: bool = False, task_id: str | None = None,
                   retry_delay: float | None = None) -> tuple[int, str]: ...

    def _change(self, name: str, flow_id: str, args: list[Any], dry_run: bool,
                release: bool = True) -> tuple[dict[str, Any], list[Any]]:
        store = self.store
        code, payload, state, extra, token, claim = store.change(
            name, flow_id, args, dry_run=dry_run,
            claim=(CLAIM_LEASE, BATCH) if release and not dry_run else None,
        )
        if code < 0:
            if token is not None:
                store.clear_dirty(token)
            if code == -5:
                raise FlowStateError(f"flow {flow_id!r}: {payload}; nothing was changed")
            if code == -4:
                raise FlowStateError(f"flow {flow_id!r}: {payload}; nothing was changed")
            check_code(code, flow_id)
        report: dict[str, Any] = {"released": [], "skipped": [], "cancelled": [],
                                  "reopened": []}
        report.update(json.loads(payload) if payload else {})
        report["state"] = state
        report["dry_run"] = dry_run
        if token is not None:
            if release and not self.app.conf.task_always_eager:
                self.dispatcher.release(flow_id, token, claim)
            else:
                store.clear_dirty(token)
            if release and self.app.conf.task_always_eager:
                from .eager import run_eager

                run_eager(self, flow_id)  # type: ignore[arg-type]
        return report, extra

    def cancel(self, flow_id: str, terminate: bool = False, dry_run: bool = False
               ) -> dict[str, Any]:
        """Cancel the flow atomically: nothing is released after it and every unfinished
        node becomes cancelled. Running bodies continue (they can watch
        ``current_flow.cancelled``) unless ``terminate=True``, which revokes them with
        Celery's ``revoke(terminate=True)`` as a best effort (prefork only)."""
        report, extra = self._change("cancel", flow_id, [], dry_run, release=False)
        started = json.loads(extra[0]) if extra and extra[0] else []
        report["terminated"] = started if terminate else []
        if not dry_run:
            meta = self.store.meta(flow_id) or {}
            if meta.get("webhook_pending") == "1":
                self.store.client.zadd(self.store.keys.webhooks, {flow_id: self.store.now()},
                                       nx=True)
        if terminate and started and not dry_run:
            self.app.control.revoke(started, terminate=True)
        return report

    def pause(self, flow_id: str, dry_run: bool = False) -> dict[str, Any]:
        """Hold every node that becomes ready (as ``scheduled``) until :meth:`resume`."""
        return self._change("pause", flow_id, ["pause"], dry_run, release=False)[0]

    def resume(self, flow_id: str, dry_run: bool = False) -> dict[str, Any]:
        """Release what became ready while the flow was paused."""
        return self._change("pause", flow_id, ["resume"], dry_run)[0]

    def retry(self, flow_id: str, dry_run: bool = False) -> dict[str, Any]:
        """Run again the nodes that failed under ``"fail"`` and the nodes skipped as
        ``upstream_failed`` because of them, as new attempts; nothing else re-runs."""
        return self._change("retry", flow_id, [], dry_run)[0]

    def remove_dependency(self, flow_id: str, node_id: str, dep_id: str,
                          dry_run: bool = False) -> dict[str, Any]:
        """Drop the edge ``dep_id -> node_id`` of a node not yet released."""
        return self._change("remove_dependency", flow_id, [node_id, dep_id], dry_run)[0]

    def ignore_failure(self, flow_id: str, node_id: str, dry_run: bool = False
                       ) -> dict[str, Any]:
        """Count a node that failed under ``"fail"`` as ``"ignore"`` from now on."""
        return self._change("ignore_failure", flow_id, [node_id], dry_run)[0]

    def add_node(self, flow_id: str, sig: Any, after: list[Any] | None = None,
                 node_id: str | None = None, dry_run: bool = False, **options: Any
                 ) -> dict[str, Any]:
        """Add a task to a running flow; it runs once its dependencies allow."""
        from .flow import Node
        from .models import check_id, new_record

        Flow._check_sig(sig, node_id)
        deps = [d.id if isinstance(d, Node) else d for d in (after or [])]
        for dep in deps:
            if not isinstance(dep, str):
                raise FlowDefinitionError(f"add_node: after= entry {dep!r} is not a node id")
        if len(set(deps)) != len(deps):
            raise FlowDefinitionError("add_node: after= names a node twice")
        existing = self.store.nodes(flow_id) if node_id is None else None
        if node_id is None:
            short = str(sig.task).rsplit(".", 1)[-1]
            taken = set(existing or ())
            n = 1
            node_id = short
            while node_id in taken:
                n += 1
                node_id = f"{short}-{n}"
        check_id(node_id, "node id")
        opts = check_node_opts(
            node_id, queue=options.pop("queue", None), priority=options.pop("priority", None),
            rate_limit=options.pop("rate_limit", None),
            failure_policy=options.pop("failure_policy", None),
            trigger_rule=options.pop("trigger_rule", None),
            max_recoveries=options.pop("max_recoveries", None),
        )
        if options:
            raise FlowDefinitionError(f"add_node: unknown option(s) {', '.join(options)}")
        if "rate" in opts:
            check_rate(opts["rate"], self.config, f"node {node_id!r} rate_limit")
        task = self.app.tasks.get(sig.task)
        defaults: dict[str, Any] = getattr(task, "flows_defaults", None) or {}
        merged = {**defaults, **opts}
        input_ref: Any = None
        if not sig.immutable and deps:
            input_ref = deps[0] if len(deps) == 1 else list(deps)
        rec = new_record(
            task=sig.task, after=deps, input=input_ref, queue=merged.get("queue"),
            priority=merged.get("priority"), rate=merged.get("rate"),
            policy=merged.get("policy", "fail"), rule=merged.get("rule", "all_success"),
            max_rec=merged.get("max_rec"),
        )
        from .compile import PASSTHROUGH_OPTIONS

        passthrough = {k: v for k, v in sig.options.items() if k in PASSTHROUGH_OPTIONS}
        try:
            blob = self.codec.dump_call(tuple(sig.args), dict(sig.kwargs), passthrough)
        except Exception as exc:
            raise FlowDefinitionError(f"node {node_id!r}: arguments or signature options "
                                      f"cannot be serialised: {exc}") from None
        report = self._change("add_node", flow_id,
                              [node_id, json.dumps(rec), blob, self.config.max_nodes],
                              dry_run)[0]
        report["node_id"] = node_id
        return report

    def signal(self, flow_id: str, node_id: str, result: Any = None,
               error: str | None = None) -> str:
        """Complete an external node (``awaiting``): with ``result``, or failed with
        ``error``. Returns the flow's state."""
        rec = self.store.node(flow_id, node_id)
        if rec is None:
            self.store.require_meta(flow_id)
            raise FlowStateError(f"flow {flow_id!r} has no node {node_id!r}")
        if rec.get("kind") != "external" or rec.get("state") != "awaiting":
            raise FlowStateError(
                f"node {node_id!r} is {rec.get('state')}, not an external node awaiting "
                "its signal; nothing was changed"
            )
        outcome = "failed" if error is not None else "succeeded"
        code, state = self.record(flow_id, node_id, int(rec["attempt"]), outcome,
                                  result=result, error=str(error or ""), external=True)
        if code != 1:
            raise FlowStateError(f"node {node_id!r} was completed concurrently; nothing "
                                 "was changed")
        return state
