"""Cluster-wide rate limits and per-queue concurrency caps on node releases.

Every release passes the router: the node's queue is chosen (node option, task option,
Celery's routing), then each applicable limiter must admit it (``lua/global/admit.lua``,
one atomic check of all of them):

- ``flow:<id>``   the flow's ``rate_limit`` (unless it names a group)
- ``group:<name>`` a group from ``flows_rate_limits``, shared by whatever names it
- ``task:<name>`` an inline node or task ``flow_rate_limit``, shared by that task name
- ``queue:<name>`` a cap from ``flows_queue_limits``: flow tasks queued or running

Rates are GCRA with no burst (releases at least one interval apart, timed by Redis
``TIME``). A node that may not go yet stays ``scheduled`` in its flow, held out of the
outbox (``hold.lua``), and waits in the refusing limiter's queue, ordered by longest
path to a sink, then priority, then readiness. The releaser of every ``--flows``
worker admits the heads of those queues as soon as their limiters allow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import RATE_RE, parse_rate
from .keys import Keys

if TYPE_CHECKING:
    from .core import Flows

logger = logging.getLogger(__name__)

MAX_PATH = 9999


@dataclass(frozen=True)
class Limiter:
    id: str
    interval: float | None = None  # rate limiters
    cap: int | None = None  # the queue cap


def order_key(path: int, priority: int | None, ready_at: float) -> str:
    """Wait queues sort members lexically: longest path first, then priority (Redis:
    0 first), then the time the node became ready."""
    prio = 0 if priority is None else max(0, min(int(priority), 9))
    return f"{MAX_PATH - min(int(path), MAX_PATH):04d}{prio}{int(ready_at * 1000):015d}"


class Router:
    def __init__(self, flows: Flows) -> None:
        self.flows = flows
        self.keys: Keys = flows.store.keys

    def _rate(self, spec: str, own_id: str) -> Limiter:
        if RATE_RE.match(spec):
            return Limiter(own_id, interval=parse_rate(spec))
        group = self.flows.config.rate_limits.get(spec)
        if group is None:
            # a group removed from the configuration after the flow was stored
            raise LookupError(f"rate limit group {spec!r} is not in flows_rate_limits")
        return Limiter(f"group:{spec}", interval=parse_rate(group))

    def limiters(self, fid: str, flow_rate: str, rec: dict[str, Any], queue: str
                 ) -> list[Limiter]:
        out: list[Limiter] = []
        if flow_rate:
            out.append(self._rate(flow_rate, f"flow:{fid}"))
        if rec.get("rate"):
            limiter = self._rate(str(rec["rate"]), f"task:{rec['task']}")
            if limiter.id not in {o.id for o in out}:
                out.append(limiter)
        cap = self.flows.config.queue_limits.get(queue)
        if cap is not None:
            out.append(Limiter(f"queue:{queue}", cap=cap))
        return out

    def admit(self, limiters: list[Limiter], member: str, task_id: str
              ) -> tuple[bool, float, str]:
        """(admitted, seconds to wait, refusing limiter id); when admitted, the second
        item is the Redis time of the release."""
        rates = [lim for lim in limiters if lim.interval is not None]
        caps = [lim for lim in limiters if lim.cap is not None]
        ordered = rates + caps
        keys = [self.keys.waits]
        argv: list[Any] = [member, task_id, len(rates), caps[0].cap if caps else 0]
        for lim in ordered:
            keys.append(self.keys.limiter_state(lim.id))
            keys.append(self.keys.wait_queue(lim.id))
            argv.append(lim.id)
            if lim.interval is not None:
                argv.append(lim.interval)
        out = self.flows.store.run_global("admit", keys, argv)
        if int(out[0]) == 1:
            return True, float(out[1]), ""
        return False, float(out[1]), out[2].decode() if isinstance(out[2], bytes) else out[2]

    def release_slot(self, queue: str, task_id: str) -> None:
        if queue and queue in self.flows.config.queue_limits:
            self.flows.store.client.zrem(self.keys.limiter_state(f"queue:{queue}"), task_id)


def member_for(order: str, fid: str, nid: str, attempt: int) -> str:
    return f"{order}|{fid}|{nid}|{attempt}"


def parse_member(member: str) -> tuple[str, str, int] | None:
    parts = member.split("|")
    if len(parts) != 4 or not parts[3].isdigit():
        return None
    return parts[1], parts[2], int(parts[3])


def release_held(ext: Flows, budget: float = 0.5) -> float:
    """Releaser (``--flows`` workers): admit the heads of the wait queues. Returns how
    long the caller may sleep before something could be admitted."""
    store = ext.store
    keys = store.keys
    deadline = time.monotonic() + budget
    sleep = 0.05
    for raw_id in store.client.smembers(keys.waits):
        limiter_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        while time.monotonic() < deadline:
            if not limiter_id.startswith("queue:"):
                # a rate limiter: wait for its next slot without a full admission try
                tat = store.client.get(keys.limiter_state(limiter_id))
                # a hint only (admit.lua decides with Redis TIME): wake a little early
                ahead = float(tat) - store.now() - 0.002 if tat else 0.0
                if ahead > 0.0005:
                    sleep = min(sleep, ahead)
                    break
            head = store.client.zrange(keys.wait_queue(limiter_id), 0, 0)
            if not head:
                store.drop_empty_wait(limiter_id)
                break
            member = head[0].decode() if isinstance(head[0], bytes) else str(head[0])
            parsed = parse_member(member)
            if parsed is None:
                store.client.zrem(keys.wait_queue(limiter_id), member)
                continue
            fid, nid, attempt = parsed
            outcome, wait = ext.dispatcher.release_one(fid, nid, attempt, member, limiter_id)
            if outcome == "stale":
                store.client.zrem(keys.wait_queue(limiter_id), member)
                continue
            if outcome == "published":
                continue
            # still refused: this queue waits; look at the others
            if wait > 0:
                sleep = min(sleep, wait)
            break
    return max(sleep, 0.002)


def fire_timers(ext: Flows) -> float:
    """Releaser: drain the outboxes of flows whose timers are due (retries held in
    Redis). Returns the seconds until the next timer (at most 1)."""
    store = ext.store
    due, nxt = store.due_timers()
    for fid in due:
        # dirty first: if this process dies now, the sweeper drains (and re-times) it
        token = store.mark_dirty(fid)
        store.client.zrem(store.keys.timers, fid)
        ext.dispatcher.release(fid, token)
    if nxt is None:
        return 1.0
    return max(nxt - store.now(), 0.002)


def collect_slots(ext: Flows) -> int:
    """Free queue-cap slots whose holder is no longer queued or running (its worker was
    lost, its flow cancelled, the process died between admitting and publishing)."""
    from .dispatch import parse_task_id

    store = ext.store
    freed = 0
    for queue in ext.config.queue_limits:
        key = store.keys.limiter_state(f"queue:{queue}")
        for raw in store.client.zrange(key, 0, -1):
            task_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            ref = parse_task_id(task_id)
            rec = store.node(ref.flow_id, ref.node_id) if ref else None
            alive = (rec is not None and ref is not None and rec.get("attempt") == ref.attempt
                     and rec.get("state") in ("scheduled", "queued", "running", "retrying"))
            if not alive:
                store.client.zrem(key, task_id)
                freed += 1
    return freed
