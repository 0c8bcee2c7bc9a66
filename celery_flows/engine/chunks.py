"""Chunked changes of large flows.

- A cancel: after its first, atomic step (lua/cancel.lua makes the flow cancelled),
  lua/cancel_step.lua writes its node records a bounded chunk per call, run by the
  canceller right away and, when it died, by the sweeper of a ``--flows`` worker from
  the cancelling index.
- A retry: its nodes are found by reading the records a page at a time, here, and
  staged in the flow's reopen set, hidden; lua/retry.lua 'commit' makes them pending to
  every reader in one small step, and the claims that follow (the retrier's, or the
  sweeper's from the dirty marker) reopen them a bounded step each (engine/reopen.lua).
  A staging that a failure, skip, cancel or reopen made stale meanwhile is redone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from .. import faults
from ..define.records import NodeRecord
from ..define.states import TERMINAL_NODE_STATES, NodeState
from ..errors import FlowStateError
from ..registry import Store
from ..registry.replies import text

__all__ = ["NOTHING_TO_RETRY", "cancel_steps", "finish_cancels", "retry_nodes",
           "retry_report", "stage_retry"]

#: retry.lua's reason, when no node failed under "fail"
NOTHING_TO_RETRY = 'nothing to retry: no node failed under failure_policy "fail"'

_TERMINAL = frozenset(state.value for state in TERMINAL_NODE_STATES)

logger = logging.getLogger("celery_flows")


def cancel_steps(store: Store, flow_id: str, dry_run: bool = False
                 ) -> tuple[list[str], list[str]]:
    """Run a chunked cancel's steps to the end: (nodes cancelled, task ids of the
    started ones). A dry run walks the nodes with its own cursor and writes nothing."""
    cancelled: list[str] = []
    started: list[str] = []
    cursor = "0"
    while True:
        step = store.cancel_step(flow_id, cursor, dry_run)
        if step.code < 0:
            break
        report = json.loads(step.payload) if step.payload else {}
        cancelled += report.get("cancelled", [])
        started += json.loads(step.extra[0]) if step.extra and step.extra[0] else []
        cursor = text(step.extra[1]) if len(step.extra) > 1 else ""
        if not dry_run:
            faults.point("cancel-step")
        if not cursor:
            break
    if not dry_run:
        store.cancel_done(flow_id)
    return cancelled, started


def finish_cancels(store: Store, grace: float) -> int:
    """Finish the chunked cancels begun more than ``grace`` seconds ago (their caller
    died, or is slow: a step run twice cancels nothing twice)."""
    n = 0
    for fid in store.stale_cancels(grace):
        try:
            cancel_steps(store, fid)
            n += 1
        except Exception:
            logger.exception("celery-flows: finishing the cancel of flow %s failed; "
                             "retrying", fid)
    return n


def _records(store: Store, flow_id: str) -> dict[str, NodeRecord]:
    recs: dict[str, NodeRecord] = {}
    cursor = 0
    while True:
        cursor, page = store.scan_nodes(flow_id, cursor)
        recs.update(page)
        if cursor == 0:
            return recs


def _failed_upstream(rec: NodeRecord) -> bool:
    """Skipped as upstream_failed, or a map failed by its items (lua/engine/reopen.lua
    failed_upstream)."""
    if rec["state"] == NodeState.SKIPPED:
        return rec.get("skip_reason") == "upstream_failed"
    return (rec["state"] == NodeState.FAILED and rec.get("kind") == "map"
            and rec.get("k") is not None
            and str(rec.get("error") or "").startswith("MapItemFailed:"))


def retry_nodes(store: Store, flow_id: str) -> tuple[str, list[str], dict[str, NodeRecord]]:
    """What a retry reopens, read a page at a time (lua/retry.lua's rule): the nodes
    that failed under "fail" or that fail_fast cancelled, and the nodes skipped as
    upstream_failed downstream of them. Returns the meta's fgen read before the
    records (the staging's version), those node ids and the records read."""
    fgen = store.client.hget(store.keys.meta(flow_id), "fgen")
    recs = _records(store, flow_id)
    ids = [nid for nid, rec in recs.items()
           if (rec["state"] == NodeState.FAILED and rec.get("counted_fail"))
           or (rec["state"] == NodeState.CANCELLED
               and rec.get("cancel_reason") == "fail_fast")]
    # a map that failed at its expansion runs again from its input (SPEC section 12)
    ids += [str(recs[nid]["after"][0]) for nid in list(ids)
            if recs[nid].get("kind") == "map" and recs[nid].get("k") is None
            and recs[nid]["state"] == NodeState.FAILED and recs[nid]["after"]
            and recs[nid]["after"][0] not in ids]
    seen = set(ids)
    i = 0
    while i < len(ids):
        for cid in recs[ids[i]].get("deps_of") or []:
            child = recs.get(cid)
            if cid not in seen and child is not None and _failed_upstream(child):
                seen.add(cid)
                ids.append(cid)
        i += 1
    return text(fgen) if fgen else "", ids, recs


def retry_report(ids: list[str], recs: Mapping[str, NodeRecord]) -> dict[str, list[str]]:
    """A chunked retry's report: every node reopened, and as released those whose every
    remaining dependency is terminal and not reopened (they ran before, so their
    trigger rule held: it holds again)."""
    staged = set(ids)
    released = []
    for nid in ids:
        rec = recs[nid]
        removed = set(rec.get("removed") or [])
        deps = [d for d in rec.get("after") or [] if d not in removed]
        if all(d not in staged and recs[d]["state"] in _TERMINAL for d in deps if d in recs):
            released.append(nid)
    return {"reopened": list(ids), "released": released}


def stage_retry(store: Store, flow_id: str, state: str
                ) -> tuple[str, list[str], dict[str, NodeRecord]]:
    """Stage a chunked retry: raises FlowStateError when there is nothing to retry."""
    if state == "cancelled":
        raise FlowStateError(f"flow {flow_id!r}: a cancelled flow cannot be retried; "
                             "nothing was changed")
    fgen, ids, recs = retry_nodes(store, flow_id)
    if not ids:
        raise FlowStateError(f"flow {flow_id!r}: {NOTHING_TO_RETRY}; nothing was changed")
    return fgen, ids, recs
