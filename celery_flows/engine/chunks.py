"""Chunked changes of large flows: the steps of a cancel after its first, atomic one
(lua/cancel.lua makes the flow cancelled; lua/cancel_step.lua writes its node records a
bounded chunk per call), run by the canceller right away and, when it died, by the
sweeper of a ``--flows`` worker from the cancelling index."""

from __future__ import annotations

import json
import logging

from .. import faults
from ..registry import Store
from ..registry.replies import text

__all__ = ["cancel_steps", "finish_cancels"]

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
