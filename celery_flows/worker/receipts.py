"""Leases of received messages that wait in this worker for a pool slot.

A flow message is leased from its receipt until its outcome is recorded (SPEC 9). On a
single Redis, start.lua takes the lease itself in the same step as the start, so a
message the pool runs at once needs no command of its own. A message that waits in the
worker (prefetched, or behind busy pool processes) is leased here, within
:data:`RECEIPT_DELAY` of its receipt, with one command for all that arrived meanwhile.
On a cluster each receipt is leased at once, as before (``signals.on_task_received``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

__all__ = ["RECEIPT_DELAY", "Receipts", "current"]

logger = logging.getLogger(__name__)

RECEIPT_DELAY = 0.05  # seconds a received message may wait unleased in this worker

_CURRENT: Receipts | None = None


def current() -> Receipts | None:
    """The receipts of this process's worker (None outside a worker's main process)."""
    return _CURRENT


def _waiting() -> set[str]:
    """Task ids this worker received and has not handed to a pool process yet."""
    from celery.worker import state as worker_state

    active = {getattr(r, "id", None) for r in list(worker_state.active_requests)}
    return {r.id for r in list(worker_state.reserved_requests)
            if getattr(r, "id", None) and r.id not in active}


class Receipts:
    """Received flow messages waiting to be leased by one worker instance."""

    def __init__(self, store: Any, instance: str) -> None:
        self.store = store
        self.instance = instance
        self._lock = threading.Lock()
        self._pending: set[str] = set()

    def install(self) -> None:
        global _CURRENT
        _CURRENT = self

    def uninstall(self) -> None:
        global _CURRENT
        if _CURRENT is self:
            _CURRENT = None

    def add(self, task_id: str) -> None:
        with self._lock:
            self._pending.add(task_id)

    def flush(self) -> int:
        """Lease what still waits in this worker; returns how many were leased. A
        message already handed to the pool is leased by its start (start.lua)."""
        with self._lock:
            pending, self._pending = self._pending, set()
        if not pending:
            return 0
        waiting = pending & _waiting()
        if waiting:
            self.store.lease_add_many(self.instance, waiting)
        return len(waiting)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(RECEIPT_DELAY):
            try:
                self.flush()
            except Exception:
                logger.exception("celery-flows: leasing received messages failed; "
                                 "retrying")
