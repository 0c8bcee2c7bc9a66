"""The registry's Redis Cluster client: rides out a failover and waits for replicas.

redis-py's ``RedisCluster`` retries a command after a connection error only by
re-reading the slot map, without pausing: while a killed master's replica is not yet
promoted (``cluster-node-timeout`` plus an election, seconds) the map still names the
dead master, every retry fails at once and the caller gets ``ConnectionError`` within
milliseconds. Here a command is retried with backoff for up to :data:`FAILOVER_WINDOW`
seconds, so a failover is a pause, not an error. Every transition is idempotent, so a
replayed write is harmless.

Replication is asynchronous: a master acknowledges a write before its replica has it,
and a master killed in between loses it on promotion. When the cluster has replicas,
every write is followed by ``WAIT 1 <REPLICA_WAIT_MS>`` on the same node, so a write
the caller goes on from is held by a replica (unless the replica is down or lags past
the timeout: then nothing waits longer, and what such a loss means is written in
docs/guarantees.rst). A write whose master dies before WAIT answers is sent again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError

logger = logging.getLogger(__name__)

FAILOVER_WINDOW = 30.0  # seconds a command keeps being retried while the cluster heals
REPLICA_WAIT_MS = 500

_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, ClusterDownError,
              SlotNotCoveredError, TryAgainError)
# the commands the registry writes with (reads never wait)
_WRITES = frozenset({"EVALSHA", "EVAL", "ZADD", "ZREM", "HSET", "HDEL", "HINCRBY", "SET",
                     "DEL", "EXPIRE", "SREM", "SADD"})
# writes that never wait: the note sent before every flow script (keys.py {events}:due)
# would otherwise double each transition's round trips, and a note a failover loses is
# found again from the flow's own ev_due, which its script wrote and waited for
_UNWAITED = (":{events}:due",)


class FailoverCluster(RedisCluster):
    """``RedisCluster`` whose commands survive a failover and whose writes reach a
    replica before they count as done (when there are replicas)."""

    # class defaults: the base __init__ already sends commands
    wait_for_replicas = False
    _warned = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wait_for_replicas = bool(self.get_replicas())  # type: ignore[no-untyped-call]  # redis-py
        self._warned = False

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        name = str(args[0]).upper() if args else ""
        pinned = "target_nodes" in kwargs
        delay, deadline = 0.05, time.monotonic() + FAILOVER_WINDOW
        while True:
            try:
                out = super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]  # redis-py
                if self.wait_for_replicas and name in _WRITES and not pinned:
                    self._replicate(args)
                return out
            except _TRANSIENT:
                # a pinned command (WAIT, SCRIPT LOAD to every primary) names nodes the
                # failover may have replaced: its caller decides
                if pinned or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                self.nodes_manager.initialize()

    def _replicate(self, args: tuple[Any, ...]) -> None:
        key = _first_key(args)
        if key is None or str(key).endswith(_UNWAITED):
            return
        node = self.get_node_from_key(key)  # type: ignore[no-untyped-call]  # redis-py
        acked = super().execute_command(  # type: ignore[no-untyped-call]  # redis-py
            "WAIT", 1, REPLICA_WAIT_MS, target_nodes=node)
        if int(acked) < 1 and not self._warned:
            self._warned = True
            logger.warning("celery-flows: no replica of %s acknowledged a write within %s ms; "
                           "a failover now may lose it (see docs/guarantees.rst)",
                           node.name, REPLICA_WAIT_MS)


def _first_key(args: tuple[Any, ...]) -> Any:
    name = str(args[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return args[3] if len(args) > 3 and int(args[2]) > 0 else None
    return args[1] if len(args) > 1 else None
