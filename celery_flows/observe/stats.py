"""What ``flows stats`` reports, read from the registry."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..config import FlowsConfig
from ..registry import Store
from ..registry.ids import queue_limiter

__all__ = ["collect"]

MAX_FLOWS = 10000


def collect(store: Store, config: FlowsConfig) -> dict[str, Any]:
    """Flows by state (the newest MAX_FLOWS), queue slots, limiters, concurrency groups
    (running and queued flows per key), live workers."""
    now = store.time()
    states = Counter(s for s in store.flow_states(store.flow_ids(limit=MAX_FLOWS)) if s)
    queues = {queue: (store.slots_used(queue_limiter(queue)), cap)
              for queue, cap in config.queue_limits.items()}
    limiters: dict[str, tuple[float, int]] = {}
    for limiter in store.rate_limiters():
        tat = store.limiter_tat(limiter)
        ahead = max(tat - now, 0.0) if tat else 0.0
        limiters[limiter] = (ahead, store.waiting(limiter))
    # concurrency groups: every configured group, with its keys that have flows
    groups: dict[str, dict[str, Any]] = {
        group: {"limit": limit, "keys": {}}
        for group, limit in config.concurrency_limits.items()}
    for group, key in store.conc_group_keys():
        running, queued = store.conc_counts(group, key)
        entry = groups.setdefault(group, {"limit": None, "keys": {}})
        entry["keys"][key] = {"running": running, "queued": queued}
    workers = {inst: (max(now - beat, 0.0), info) for inst, (beat, info) in store.workers().items()}
    return {"flows": dict(states), "queues": queues, "limiters": limiters,
            "concurrency": groups, "workers": workers}
