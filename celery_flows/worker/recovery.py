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
import time
from typing import Any

from .. import faults
from ..config import FlowsConfig
from ..define.states import NodeState
from ..engine import Engine
from ..engine.outcomes import current_instance
from ..registry.ids import TaskRef, instance_host, parse_task_id

__all__ = ["Reconciler", "heartbeat_interval", "recover_lost_workers", "rescue_stranded"]

logger = logging.getLogger(__name__)

RECONCILE_GRACE = 10.0  # seconds a task must be gone from the worker before reconciling
#: Seconds a manager's lock on a lost instance outlives its last sign of progress: the
#: lock is renewed after each lease, so a manager that dies mid-recovery delays the
#: next one by this much at most (recover.lua is idempotent; the lock only saves work).
RECOVERY_LOCK = 15


def heartbeat_interval(config: FlowsConfig) -> float:
    return max(0.2, min(config.lease_timeout / 4, 5.0))


class Reconciler:
    """Settles this worker's leases whose task it no longer holds."""

    def __init__(self, engine: Engine, instance: str) -> None:
        self.engine = engine
        self.instance = instance
        self.gone_since: dict[str, float] = {}

    def held_task_ids(self) -> set[str]:
        from celery.worker import state as worker_state

        held = {getattr(r, "id", None) for r in list(worker_state.active_requests)}
        held |= {getattr(r, "id", None) for r in list(worker_state.reserved_requests)}
        return {h for h in held if h}

    def run(self) -> int:
        store = self.engine.store
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
        outcomes = self.engine.outcomes
        if not outcomes.is_current(task_id):
            return 0
        # Only a body this instance started and still holds the lease of: anything else
        # was recorded, handed off (replace), started elsewhere, or never started here
        # (a message given back to the broker, a denied duplicate).
        if not _running_under(self.engine, ref, self.instance):
            return 0
        if outcomes.record_stored(ref, task_id):
            return 1
        logger.warning("celery-flows: %s left worker %s without an outcome; recovering it",
                       task_id, self.instance)
        outcomes.record_lost(ref, "the task left its worker without a recorded outcome",
                             lost_instance=self.instance)
        return 1


def _running_under(engine: Engine, ref: TaskRef, instance: str) -> bool:
    """Whether ``ref``'s attempt is running on ``instance`` (its lease holder)."""
    rec = engine.store.node(ref.flow_id, ref.node_id)
    return (rec is not None and rec.get("attempt") == ref.attempt
            and rec.get("state") == NodeState.RUNNING.value and rec.get("lease") == instance)


def recover_lost_workers(engine: Engine) -> int:
    """Manager service: recover the leases of instances whose heartbeat stopped."""
    store, outcomes, config = engine.store, engine.outcomes, engine.config
    recovered = 0
    for instance in store.lost_instances(config.lease_timeout):
        if instance == current_instance() or not store.lock_instance(instance, RECOVERY_LOCK):
            continue
        why = (f"worker {instance_host(instance)} stopped heartbeating for more than "
               f"{config.lease_timeout:g} s")
        for task_id in store.leases(instance):
            ref = parse_task_id(task_id)
            if ref is None or not outcomes.is_current(task_id):
                continue  # a message of an earlier flow with the same id: not a node
            faults.point("recover-lease")
            try:
                if not (_running_under(engine, ref, instance)
                        and outcomes.record_stored(ref, task_id)):
                    outcomes.record_lost(ref, why, lost_instance=instance)
                recovered += 1
                store.extend_lock(instance, RECOVERY_LOCK)
            except Exception:
                logger.exception("celery-flows: recovering %s failed; will retry", task_id)
                store.unlock_instance(instance)
                break
        else:
            store.forget_instance(instance)
            logger.warning("celery-flows: recovered the leases of lost worker %s", instance)
    return recovered


def _broker_queue_length(app: Any, queue: str) -> int | None:
    """Messages waiting in a Redis broker queue (all priority sub-queues); None when the
    broker is not Redis."""
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


def rescue_stranded(engine: Engine) -> int:
    """Manager service: a published node that no worker received nor started within
    ``flows_lease_timeout``, while its broker queue is empty, lost its message: publish
    it again (same attempt; a late original is a duplicate the guard acks)."""
    store, config, app = engine.store, engine.config, engine.app
    stale = store.stale_queued(config.lease_timeout)
    if not stale:
        return 0
    live = list(store.workers())
    rescued = 0
    lengths: dict[str, int | None] = {}
    for task_id in stale:
        ref = parse_task_id(task_id)
        rec = store.node(ref.flow_id, ref.node_id) if ref else None
        if (ref is None or rec is None or rec.get("attempt") != ref.attempt
                or rec.get("state") != NodeState.QUEUED.value or rec.get("lease")):
            store.drop_queued(task_id)
            continue
        if store.leased_by(live, task_id):
            continue  # a worker holds it (prefetched); its lease covers it
        queue = str(rec.get("queue") or app.conf.task_default_queue)
        if queue not in lengths:
            lengths[queue] = _broker_queue_length(app, queue)
        if lengths[queue] != 0:
            continue  # still possibly waiting in the broker (or not a Redis broker)
        token = store.mark_dirty(ref.flow_id)
        if store.requeue(ref.flow_id, ref.node_id, ref.attempt) == 1:
            logger.warning("celery-flows: %s was published %s s ago and never received; "
                           "publishing it again", task_id, config.lease_timeout)
            rescued += 1
        store.drop_queued(task_id)
        engine.dispatcher.release(ref.flow_id, token)
    return rescued
