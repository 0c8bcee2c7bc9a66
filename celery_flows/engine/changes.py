"""Changing a running flow (SPEC section 6): cancel, pause/resume, retry, edits, signals.

Each change is one Lua transition (see its file in ``lua/``), run with a dirty marker
and followed by a claim in the same round trip, so whatever it makes ready is
published at once (or by the sweeper if this process dies). ``dry_run=True`` runs the
same transition without writing and reports what would be released, skipped or
cancelled.
"""

from __future__ import annotations

import json
from typing import Any

from .. import faults
from ..define.compile import PASSTHROUGH_OPTIONS
from ..define.flow import Node
from ..define.records import new_record
from ..define.states import NodeState
from ..define.validate import check_id, check_node_opts, check_rate, check_signature, new_node_id
from ..errors import FlowDefinitionError, FlowStateError
from ..registry import scripts
from ..registry.codes import raise_for
from ..registry.replies import Change, Marked, text
from .chunks import cancel_steps, retry_report, stage_retry
from .dispatch import CLAIM
from .eager import run_eager
from .outcomes import OnOutcomes
from .routing import task_defaults

__all__ = ["Changes"]

_EMPTY_REPORT = ("released", "skipped", "cancelled", "reopened")


class Changes(OnOutcomes):
    """The change methods behind :class:`~celery_flows.Flows`."""

    @property
    def _eager(self) -> bool:
        return bool(self.app.conf.task_always_eager)

    def _claim(self, dry_run: bool) -> tuple[float, int] | None:
        return None if dry_run else CLAIM

    def _finish(self, flow_id: str, marked: Marked[Change], dry_run: bool,
                release: bool = True) -> tuple[dict[str, Any], list[Any]]:
        """The report of a change; publishes what it released (or runs it eagerly)."""
        store = self.store
        change = marked.reply
        if change.code < 0:
            if marked.token:
                store.clear_dirty(marked.token)
            raise_for(change.code, flow_id, change.payload)
        report: dict[str, Any] = {key: [] for key in _EMPTY_REPORT}
        report.update(json.loads(change.payload) if change.payload else {})
        report["state"] = change.state
        report["dry_run"] = dry_run
        if marked.token:
            if release and not self._eager:
                self.dispatcher.release(flow_id, marked.token, marked.claim)
            else:
                store.clear_dirty(marked.token)
            if release and self._eager:
                run_eager(self.outcomes, flow_id)
        return report, change.extra

    def cancel(self, flow_id: str, terminate: bool = False, dry_run: bool = False
               ) -> dict[str, Any]:
        """Cancel the flow atomically: nothing is released after it and every unfinished
        node becomes cancelled. Running bodies continue (they can watch
        ``current_flow.cancelled``) unless ``terminate=True``, which revokes them with
        Celery's ``revoke(terminate=True)`` as a best effort (prefork only)."""
        try:
            report, extra = self._finish(flow_id, self.store.cancel(flow_id, dry_run),
                                         dry_run, release=False)
        except Exception:
            if not dry_run:
                self.store.cancel_done(flow_id)
            raise
        started = json.loads(extra[0]) if extra and extra[0] else []
        if len(extra) > 1 and text(extra[1]) == "1":
            # a large flow: cancelled already, its nodes written a chunk per call
            cancelled, more = cancel_steps(self.store, flow_id, dry_run)
            report["cancelled"] = cancelled
            started += more
        elif not dry_run:
            self.store.cancel_done(flow_id)
        report["terminated"] = started if terminate else []
        if not dry_run:
            meta = self.store.meta(flow_id) or {}
            if meta.get("webhook_pending") == "1":
                self.store.queue_webhook(flow_id)
        if terminate and started and not dry_run:
            self.app.control.revoke(started, terminate=True)
        return report

    def pause(self, flow_id: str, dry_run: bool = False) -> dict[str, Any]:
        """Hold every node that becomes ready (as ``scheduled``) until :meth:`resume`."""
        return self._finish(flow_id, self.store.pause(flow_id, dry_run), dry_run,
                            release=False)[0]

    def resume(self, flow_id: str, dry_run: bool = False) -> dict[str, Any]:
        """Release what became ready while the flow was paused."""
        marked = self.store.resume(flow_id, self._claim(dry_run), dry_run)
        return self._finish(flow_id, marked, dry_run)[0]

    def _settle_first(self, flow_id: str) -> dict[str, str]:
        """Finish the bounded steps a large transition left to the claims (a fail_fast
        cancel, a retry's reopening, dependents to settle) before a change that needs
        every record written; returns the flow's meta."""
        meta = self.store.require_meta(flow_id)
        for _ in range(10_000):
            busy = meta.get("settling") == "1" or meta.get("reopening") == "1" or (
                "cancel_cursor" in meta and meta.get("state") != "cancelled")
            if not busy or meta.get("hidden"):
                break
            if meta.get("eager") == "1":
                run_eager(self.outcomes, flow_id)
            else:
                self.dispatcher.drain(flow_id)
            meta = self.store.require_meta(flow_id)
        return meta

    def retry(self, flow_id: str, dry_run: bool = False) -> dict[str, Any]:
        """Run again the nodes that failed under ``"fail"`` and the nodes skipped as
        ``upstream_failed`` because of them, as new attempts; nothing else re-runs.
        A flow of more than CHUNK nodes is retried in bounded steps (chunks.py)."""
        meta = self._settle_first(flow_id)
        if int(meta.get("total") or 0) <= scripts.CHUNK:
            marked = self.store.retry(flow_id, self._claim(dry_run), dry_run)
            return self._finish(flow_id, marked, dry_run)[0]
        for _ in range(20):
            fgen, ids, recs = stage_retry(self.store, flow_id, meta.get("state", ""))
            report = retry_report(ids, recs)
            if dry_run:
                return {"released": report["released"], "skipped": [], "cancelled": [],
                        "reopened": report["reopened"], "state": "running",
                        "dry_run": True}
            self.store.reopen_stage(flow_id, ids)
            faults.point("retry-staged")
            marked = self.store.retry_commit(flow_id, fgen, CLAIM)
            if marked.reply.code != 2:
                out = self._finish(flow_id, marked, dry_run)[0]
                out.update(report)
                return out
            self.store.clear_dirty(marked.token)
            meta = self._settle_first(flow_id)
        raise FlowStateError(f"flow {flow_id!r} kept changing while its retry was being "
                             "staged; nothing was changed, try again")

    def remove_dependency(self, flow_id: str, node_id: str, dep_id: str,
                          dry_run: bool = False) -> dict[str, Any]:
        """Drop the edge ``dep_id -> node_id`` of a node not yet released."""
        self._settle_first(flow_id)
        marked = self.store.remove_dependency(flow_id, node_id, dep_id, self._claim(dry_run),
                                              dry_run)
        return self._finish(flow_id, marked, dry_run)[0]

    def ignore_failure(self, flow_id: str, node_id: str, dry_run: bool = False
                       ) -> dict[str, Any]:
        """Count a node that failed under ``"fail"`` as ``"ignore"`` from now on."""
        self._settle_first(flow_id)
        marked = self.store.ignore_failure(flow_id, node_id, self._claim(dry_run), dry_run)
        return self._finish(flow_id, marked, dry_run)[0]

    def add_node(self, flow_id: str, sig: Any, after: list[Any] | None = None,
                 node_id: str | None = None, dry_run: bool = False, **options: Any
                 ) -> dict[str, Any]:
        """Add a task to a running flow; it runs once its dependencies allow."""
        check_signature(sig, node_id)
        deps = [d.id if isinstance(d, Node) else d for d in (after or [])]
        for dep in deps:
            if not isinstance(dep, str):
                raise FlowDefinitionError(f"add_node: after= entry {dep!r} is not a node id")
        if len(set(deps)) != len(deps):
            raise FlowDefinitionError("add_node: after= names a node twice")
        self._settle_first(flow_id)
        if node_id is None:
            node_id = new_node_id(sig.task, self.store.nodes(flow_id))
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
        merged = {**task_defaults(self.app, sig.task), **opts}
        input_ref: Any = None
        if not sig.immutable and deps:
            input_ref = deps[0] if len(deps) == 1 else list(deps)
        rec = new_record(
            task=sig.task, after=deps, input=input_ref, queue=merged.get("queue"),
            priority=merged.get("priority"), rate=merged.get("rate"),
            policy=merged.get("policy", "fail"), rule=merged.get("rule", "all_success"),
            max_rec=merged.get("max_rec"),
        )
        passthrough = {k: v for k, v in sig.options.items() if k in PASSTHROUGH_OPTIONS}
        try:
            blob = self.codec.dump_call(tuple(sig.args), dict(sig.kwargs), passthrough)
        except Exception as exc:
            raise FlowDefinitionError(f"node {node_id!r}: arguments or signature options "
                                      f"cannot be serialised: {exc}") from None
        marked = self.store.add_node(flow_id, node_id, rec, blob, self.config.max_nodes,
                                     self._claim(dry_run), dry_run)
        report = self._finish(flow_id, marked, dry_run)[0]
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
        if rec.get("kind") != "external" or rec.get("state") != NodeState.AWAITING.value:
            raise FlowStateError(
                f"node {node_id!r} is {rec.get('state')}, not an external node awaiting "
                "its signal; nothing was changed"
            )
        outcome = "failed" if error is not None else "succeeded"
        done = self.outcomes.record(flow_id, node_id, int(rec.get("attempt", 0)), outcome,
                                    result=result, error=str(error or ""), external=True)
        if done.code != 1:
            raise FlowStateError(f"node {node_id!r} was completed concurrently; nothing "
                                 "was changed")
        if self._eager:  # the flow goes on in this process
            run_eager(self.outcomes, flow_id)
            return self.store.require_meta(flow_id)["state"]
        return done.state
