"""What the releaser of a ``--flows`` worker does each round: admit the heads of the
limiters' wait queues as soon as they allow, fire due timers (retries held in Redis,
sensor pokes, deadlines), and free queue-cap slots whose holder is gone."""

from __future__ import annotations

import time

from ..config import FlowsConfig
from ..define.states import NodeState
from ..registry import Store
from ..registry.ids import is_queue_limiter, parse_member, parse_task_id, queue_limiter
from .dispatch import Dispatcher

__all__ = ["collect_slots", "fire_timers", "release_held"]

_ALIVE = (NodeState.SCHEDULED.value, NodeState.QUEUED.value, NodeState.RUNNING.value,
          NodeState.RETRYING.value)


def release_held(store: Store, dispatcher: Dispatcher, budget: float = 0.5) -> float:
    """Admit the heads of the wait queues, each limiter's flows round-robin (fair share,
    SPEC section 12). Returns how long the caller may sleep before something could be
    admitted."""
    deadline = time.monotonic() + budget
    sleep = 0.05
    for limiter_id in store.waiting_limiters():
        tried = None
        while time.monotonic() < deadline:
            if not is_queue_limiter(limiter_id):
                # a rate limiter: wait for its next slot without a full admission try
                tat = store.limiter_tat(limiter_id)
                # a hint only (admit.lua decides with Redis TIME): wake a little early
                ahead = tat - store.now() - 0.002 if tat else 0.0
                if ahead > 0.0005:
                    sleep = min(sleep, ahead)
                    break
            head = store.fair_head(limiter_id)
            if head.member is None:
                if head.wake is None:
                    store.drop_empty_wait(limiter_id)
                else:
                    # only parked flows: their nodes wait at other limiters
                    sleep = min(sleep, max(head.wake, 0.002))
                break
            if head.member == tried:
                break  # nothing moved since the last try (a race): wait a round
            tried = head.member
            parsed = parse_member(head.member)
            if parsed is None:
                store.wait_drop(limiter_id, head.member, head.unit, "")
                continue
            sent = dispatcher.release_one(parsed.flow_id, parsed.node_id, parsed.attempt,
                                          head.member)
            if sent.outcome == "stale":
                store.wait_drop(limiter_id, head.member, head.unit, parsed.flow_id)
                continue
            if sent.outcome == "published":
                continue
            if sent.wait > 0:
                sleep = min(sleep, sent.wait)
            if sent.by and sent.by != limiter_id:
                # refused by another limiter: its flow is parked here (keeping its
                # turn) and the next flow goes, or, if it still has the turn here (a
                # short wait), the same head comes back and this queue waits for it
                continue
            break  # refused here: this queue waits; look at the others
    return max(sleep, 0.002)


def fire_timers(store: Store, dispatcher: Dispatcher) -> float:
    """Drain the outboxes of flows whose timers are due. Returns the seconds until the
    next timer (at most 1)."""
    due, nxt = store.due_timers()
    for fid in due:
        # dirty first: if this process dies now, the sweeper drains (and re-times) it
        token = store.mark_dirty(fid)
        store.drop_timer(fid)
        dispatcher.release(fid, token)
    if nxt is None:
        return 1.0
    return max(nxt - store.now(), 0.002)


def collect_slots(store: Store, config: FlowsConfig) -> int:
    """Free queue-cap slots whose holder is no longer queued or running (its worker was
    lost, its flow cancelled, the process died between admitting and publishing)."""
    freed = 0
    for queue in config.queue_limits:
        limiter = queue_limiter(queue)
        for task_id in store.slot_holders(limiter):
            ref = parse_task_id(task_id)
            rec = store.node(ref.flow_id, ref.node_id) if ref else None
            alive = (rec is not None and ref is not None and rec.get("attempt") == ref.attempt
                     and rec.get("state") in _ALIVE)
            if not alive:
                store.release_slot(limiter, task_id)
                freed += 1
    return freed
