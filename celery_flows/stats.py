"""What ``flows stats`` reports, read from the registry."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import Flows

MAX_FLOWS = 10000


def collect(ext: Flows) -> dict[str, Any]:
    store = ext.store
    client = store.client
    keys = store.keys
    now = store.time()
    ids = store.flow_ids(limit=MAX_FLOWS)
    pipe = client.pipeline(transaction=False)
    for fid in ids:
        pipe.hget(keys.meta(fid), "state")
    states = Counter(
        (s.decode() if isinstance(s, bytes) else str(s)) for s in pipe.execute() if s
    )
    queues = {
        queue: (int(client.zcard(keys.limiter_state(f"queue:{queue}"))), cap)
        for queue, cap in ext.config.queue_limits.items()
    }
    limiters: dict[str, tuple[float, int]] = {}
    prefix = keys.limiter_state("")
    for raw in client.scan_iter(match=prefix + "*", count=500):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        limiter = key[len(prefix):]
        if limiter.startswith("queue:"):
            continue
        tat = client.get(key)
        ahead = max(float(tat) - now, 0.0) if tat else 0.0
        limiters[limiter] = (ahead, int(client.zcard(keys.wait_queue(limiter))))
    workers = {inst: (max(now - beat, 0.0), info) for inst, (beat, info) in store.workers().items()}
    return {"flows": dict(states), "queues": queues, "limiters": limiters, "workers": workers}
