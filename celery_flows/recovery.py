"""Leases, heartbeats and recovery: no node is lost when a worker dies.

- Every worker of a Flows app has an *instance id* and heartbeats it (Redis ``TIME``).
- A node is *leased* from the moment a worker receives its message (``task_received``,
  main process) until its outcome is recorded: the task id sits in the instance's lease
  set, and ``start.lua`` names the instance in the node record.
- **Reconcile** (every worker, for itself): a leased task the worker no longer holds
  (not active, not reserved) for a while, with no outcome recorded - its pool child
  died inside the completion path - is settled from the result backend when a
  result is stored there, or else recovered as a new attempt.
- **Recover** (``--flows`` workers, for the others): an instance whose heartbeat is
  older than ``flows_lease_timeout`` is lost; each of its leased nodes that is still
  current and not started elsewhere runs again as a new attempt (``recover.lua``), up
  to ``max_recoveries``. A lock per lost instance keeps managers from duplicating work;
  ``recover.lua`` is idempotent anyway.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

from celery import states

from . import faults
from .dispatch import TaskRef, parse_task_id, task_nonce
from .models import NodeState

if TYPE_CHECKING:
    from .core import Flows

logger = logging.getLogger(__name__)

# The lease holder of this worker (set in the main process before the pool forks, so
# pool children report under the same instance). None outside workers.
INSTANCE: str | None = None

RECONCILE_GRACE = 10.0  # seconds a task must be gone from the worker before reconciling


def new_instance(hostname: str) -> str:
    global INSTANCE
    INSTANCE = f"{hostname or socket.gethostname()}|{os.getpid()}|{uuid.uuid4().hex[:8]}"
    return INSTANCE


def heartbeat_interval(ext: Flows) -> float:
    return max(0.2, min(ext.config.lease_timeout / 4, 5.0))


class Reconciler:
    """Settles this worker's leases whose task it no longer holds."""

    def __init__(self, ext: Flows, instance: str) -> None:
        self.ext = ext
        self.instance = instance
        self.gone_since: dict[str, float] = {}

    def held_task_ids(self) -> set[str]:
        from celery.worker import state as worker_state

        held = {getattr(r, "id", None) for r in list(worker_state.active_requests)}
        held |= {getattr(r, "id", None) for r in list(worker_state.reserved_requests)}
        return {h for h in held if h}

    def run(self) -> int:
        store = self.ext.store
        leased = store.leases(self.instance, older_than=1.0)
        if not leased:
            self.gone_since.clear()
            return 0
        held = self.held_task_ids()
        now = time.monotonic()
        acted = 0
        for task_id in leased:
            if task_id in held:
                self.gone_since.pop(task_id, None)
                continue
            first = self.gone_since.setdefault(task_id, now)
            if now - first < RECONCILE_GRACE:
                continue
            self.gone_since.pop(task_id, None)
            ref = parse_task_id(task_id)
            if ref is not None:
                acted += self.settle(ref, task_id)
            store.lease_drop(self.instance, task_id)
        return acted

    def settle(self, ref: TaskRef, task_id: str) -> int:
        if not of_current_flow(self.ext, task_id):
            return 0
        rec = self.ext.store.node(ref.flow_id, ref.node_id)
        # Only a body this instance started and still holds the lease of: anything else
        # was recorded, handed off (replace), started elsewhere, or never started here
        # (a message given back to the broker, a denied duplicate).
        if (rec is None or rec.get("attempt") != ref.attempt
                or rec.get("state") != NodeState.RUNNING.value
                or rec.get("lease") != self.instance):
            return 0
        stored = self.backend_outcome(task_id)
        if stored is not None:
            outcome, value = stored
            logger.warning("celery-flows: %s finished without its outcome being recorded; "
                           "taking it from the result backend (%s)", task_id, outcome)
            if outcome == "succeeded":
                self.ext.record(ref.flow_id, ref.node_id, ref.attempt, outcome, result=value)
            else:
                self.ext.record(ref.flow_id, ref.node_id, ref.attempt, outcome, error=value)
            return 1
        logger.warning("celery-flows: %s left worker %s without an outcome; recovering it",
                       task_id, self.instance)
        self.ext.record_lost(ref, "the task left its worker without a recorded outcome",
                             lost_instance=self.instance)
        return 1

    def backend_outcome(self, task_id: str) -> tuple[str, Any] | None:
        return backend_outcome(self.ext, task_id)


def of_current_flow(ext: Flows, task_id: str) -> bool:
    """Whether a flow task id was built with the nonce of the flow that now has its flow
    id (a flow id may be reused once the earlier flow expired)."""
    ref = parse_task_id(task_id)
    meta = ext.store.meta(ref.flow_id) if ref is not None else None
    return meta is None or meta.get("nonce") == task_nonce(task_id)


def backend_outcome(ext: Flows, task_id: str) -> tuple[str, Any] | None:
    """("succeeded", result) or ("failed", error text) if the result backend has the
    task's final state, else None."""
    app = ext.app
    try:
        if app.conf.result_backend in (None, "disabled") or not app.backend.persistent:
            return None
        meta = app.backend.get_task_meta(task_id)
    except Exception:
        return None
    status = meta.get("status")
    if status == states.SUCCESS:
        return "succeeded", meta.get("result")
    if status == states.FAILURE:
        exc = meta.get("result")
        if type(exc).__name__ == "WorkerLostError":
            return None  # Celery's own record of the loss, not the body's outcome
        return "failed", f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) \
            else f"FAILURE: {exc!r}"
    return None


def recover_lost_workers(ext: Flows) -> int:
    """Manager service: recover the leases of instances whose heartbeat stopped."""
    store = ext.store
    recovered = 0
    for instance in store.lost_instances(ext.config.lease_timeout):
        if instance == INSTANCE or not store.lock_instance(instance):
            continue
        host = instance.split("|", 1)[0]
        why = (f"worker {host} stopped heartbeating for more than "
               f"{ext.config.lease_timeout:g} s")
        for task_id in store.leases(instance):
            ref = parse_task_id(task_id)
            if ref is None or not of_current_flow(ext, task_id):
                continue  # a message of an earlier flow with the same id: not a node
            faults.point("recover-lease")
            try:
                stored = backend_outcome(ext, task_id)
                rec = store.node(ref.flow_id, ref.node_id)
                started_here = rec is not None and rec.get("lease") == instance
                if stored is not None and started_here and rec is not None \
                        and rec.get("attempt") == ref.attempt \
                        and rec.get("state") == NodeState.RUNNING.value:
                    outcome, value = stored
                    if outcome == "succeeded":
                        ext.record(ref.flow_id, ref.node_id, ref.attempt, outcome, result=value)
                    else:
                        ext.record(ref.flow_id, ref.node_id, ref.attempt, outcome, error=value)
                else:
                    ext.record_lost(ref, why, lost_instance=instance)
                recovered += 1
            except Exception:
                logger.exception("celery-flows: recovering %s failed; will retry", task_id)
                store.client.delete(store.keys.recovering(instance))
                break
        else:
            store.forget_instance(instance)
            logger.warning("celery-flows: recovered the leases of lost worker %s", instance)
    return recovered


def _broker_queue_length(ext: Flows, queue: str) -> int | None:
    """Messages waiting in a Redis broker queue (all priority sub-queues); None when the
    broker is not Redis."""
    app = ext.app
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            client = getattr(channel, "client", None)
            if client is None or not hasattr(channel, "_q_for_pri"):
                return None
            names = {channel._q_for_pri(queue, pri) for pri in channel.priority_steps}
            return int(sum(client.llen(name) for name in names))
    except Exception:
        return None


def rescue_stranded(ext: Flows) -> int:
    """Manager service: a published node that no worker received nor started within
    ``flows_lease_timeout``, while its broker queue is empty, lost its message: publish
    it again (same attempt; a late original is a duplicate the guard acks)."""
    store = ext.store
    keys = store.keys
    stale = store.client.zrangebyscore(keys.queued, "-inf",
                                       store.now() - ext.config.lease_timeout, start=0,
                                       num=200)
    if not stale:
        return 0
    live = [inst for inst, (beat, _info) in store.workers().items()]
    rescued = 0
    lengths: dict[str, int | None] = {}
    for raw in stale:
        task_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        ref = parse_task_id(task_id)
        rec = store.node(ref.flow_id, ref.node_id) if ref else None
        if (ref is None or rec is None or rec.get("attempt") != ref.attempt
                or rec.get("state") != NodeState.QUEUED.value or rec.get("lease")):
            store.client.zrem(keys.queued, task_id)
            continue
        if any(store.client.zscore(keys.leases(inst), task_id) is not None for inst in live):
            continue  # a worker holds it (prefetched); its lease covers it
        queue = str(rec.get("queue") or ext.app.conf.task_default_queue)
        if queue not in lengths:
            lengths[queue] = _broker_queue_length(ext, queue)
        if lengths[queue] != 0:
            continue  # still possibly waiting in the broker (or not a Redis broker)
        token = store.mark_dirty(ref.flow_id)
        if int(store.run("requeue", ref.flow_id, [ref.node_id, ref.attempt])) == 1:
            logger.warning("celery-flows: %s was published %s s ago and never received; "
                           "publishing it again", task_id, ext.config.lease_timeout)
            rescued += 1
        store.client.zrem(keys.queued, task_id)
        ext.dispatcher.release(ref.flow_id, token)
    return rescued
