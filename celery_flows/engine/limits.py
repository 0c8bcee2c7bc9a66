"""Cluster-wide rate limits and per-queue concurrency caps on node releases.

Every release passes the limits: each limiter that applies to the node must admit it
(``lua/global/admit.lua``, one atomic check of all of them):

- ``flow:<id>``    the flow's ``rate_limit`` (unless it names a group)
- ``group:<name>`` a group from ``flows_rate_limits``, shared by whatever names it
- ``task:<name>``  an inline node or task ``flow_rate_limit``, shared by that task name
- ``queue:<name>`` a cap from ``flows_queue_limits``: flow tasks queued or running

Rates are GCRA with no burst (releases at least one interval apart, timed by Redis
``TIME``). A node that may not go yet stays ``scheduled`` in its flow, held out of the
outbox (``hold.lua``), and waits in the refusing limiter's queues. Each limiter
serves them round-robin (fair share, SPEC section 12): by concurrency key, then by flow
(a flow without a key is its own), then within the flow by longest path to a sink,
priority and readiness (``lua/fair/share.lua``). The releaser of every ``--flows``
worker admits the heads of those queues as soon as their limiters allow
(:mod:`celery_flows.engine.release`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import RATE_RE, FlowsConfig, parse_rate
from ..define.records import NodeRecord
from ..registry import Store
from ..registry.ids import flow_limiter, group_limiter, queue_limiter, task_limiter
from ..registry.replies import Admission

__all__ = ["Limiter", "Limits"]


@dataclass(frozen=True)
class Limiter:
    id: str
    interval: float | None = None  # rate limiters
    cap: int | None = None  # the queue cap


class Limits:
    """Which limiters apply to a node, and their admission."""

    def __init__(self, store: Store, config: FlowsConfig) -> None:
        self.store = store
        self.config = config

    def _rate(self, spec: str, own_id: str) -> Limiter:
        if RATE_RE.match(spec):
            return Limiter(own_id, interval=parse_rate(spec))
        group = self.config.rate_limits.get(spec)
        if group is None:
            # a group removed from the configuration after the flow was stored
            raise LookupError(f"rate limit group {spec!r} is not in flows_rate_limits")
        return Limiter(group_limiter(spec), interval=parse_rate(group))

    def limiters(self, fid: str, flow_rate: str, rec: NodeRecord, queue: str) -> list[Limiter]:
        out: list[Limiter] = []
        if flow_rate:
            out.append(self._rate(flow_rate, flow_limiter(fid)))
        if rec.get("rate"):
            limiter = self._rate(str(rec["rate"]), task_limiter(str(rec.get("task"))))
            if limiter.id not in {o.id for o in out}:
                out.append(limiter)
        cap = self.config.queue_limits.get(queue)
        if cap is not None:
            out.append(Limiter(queue_limiter(queue), cap=cap))
        return out

    def admit(self, limiters: list[Limiter], member: str, task_id: str, unit: str,
              fid: str) -> Admission:
        """One atomic check of every limiter (admit.lua): their capacity, and whether it
        is the turn of the node's share ``unit`` and flow in each one's fair queues."""
        rates = [lim for lim in limiters if lim.interval is not None]
        caps = [lim for lim in limiters if lim.cap is not None]
        keys = self.store.keys
        names = [keys.waits]
        argv: list[Any] = [member, task_id, len(rates), caps[0].cap if caps else 0, unit,
                           fid]
        for lim in rates + caps:
            names += [keys.limiter_state(lim.id), keys.wait_queue(lim.id),
                      *keys.fair(lim.id)]
            argv.append(lim.id)
            if lim.interval is not None:
                argv.append(lim.interval)
        return self.store.admit(names, argv)

    def release_slot(self, queue: str, task_id: str) -> None:
        """A node of a capped queue finished: its slot is free."""
        if queue and queue in self.config.queue_limits:
            self.store.release_slot(queue_limiter(queue), task_id)
