"""A new flow's roots queued by the very script that creates the flow.

When Celery's broker is the registry's own Redis (the same server and database, kombu's
Redis transport without a global key prefix), ``submit()`` builds each root's message
through Celery as usual (``apply_async``: routing, headers, the publish signals), but
keeps the Redis commands that would deliver it and hands them to create.lua. The script
runs them only for the roots it releases, and acknowledges those in the same step
(engine/publish.lua). So one round trip creates a flow and queues its roots, where it
took three (create, publish, acknowledge), and nothing is queued for a flow that was not
created.

kombu's Redis channel hands out those commands itself: its publish batches
(``Producer.batch``, kombu 5.7) give each message's commands to the batch instead of
running them. :class:`_Keep` stands in for such a batch on the producer while the roots
are built.

Only a flow whose id this process drew (nothing else can hold it yet) with nothing
between its roots and the broker qualifies: no concurrency group, no flow, node or queue
limit, at most a claim's worth of plain task roots. Any other flow, or a build that goes
wrong, takes the usual path: create, publish, acknowledge.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from kombu.transport.redis import Channel as RedisChannel

from ..define.records import compact
from ..registry.creation import CreateRow, RootMessage
from .dispatch import BATCH, Call, Dispatcher

__all__ = ["Direct"]

logger = logging.getLogger(__name__)


#: The broker commands a message's delivery may take (kombu's Redis channel: the queue
#: push, a queue's expiry, a fanout's publish); create.lua runs these only
COMMANDS = ("lpush", "pexpire", "publish")


class _Keep:
    """A kombu publish batch to the Redis channel (``_publish_batch``): it keeps the
    commands of each message instead of sending them."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def publish(self, channel: Any, message: Any, **kwargs: Any) -> Any:
        return channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))


class Direct:
    """Builds the root messages create.lua pushes (see the module docstring)."""

    def __init__(self, app: Any, dispatcher: Dispatcher) -> None:
        self.app = app
        self.dispatcher = dispatcher
        self.store = dispatcher.store
        #: False once a message took a command create.lua does not run: never again
        self.enabled = not self.store.config.redis_cluster

    def _same_redis(self, producer: Any) -> bool:
        channel = producer.channel
        if not isinstance(channel, RedisChannel) or not hasattr(channel, "create_publish_batch"):
            return False  # another transport, or a kombu without publish batches
        if getattr(channel, "global_keyprefix", "") or not hasattr(producer, "_batch_local"):
            return False
        if getattr(producer._batch_local, "current", None) is not None:
            return False  # the caller batches this producer's publishes itself
        return self.store.is_registry(channel.pool.connection_kwargs)

    def messages(self, row: CreateRow) -> list[RootMessage] | None:
        """The roots' messages of a flow about to be created, or None: the usual path."""
        return self.messages_many([row]).get(row[0])

    def messages_many(self, rows: Sequence[CreateRow]) -> dict[str, list[RootMessage]]:
        """:meth:`messages` of each flow that qualifies, over one producer."""
        calls = {}
        for row in rows:
            found = self._calls(row) if self.enabled else None
            if found:
                calls[row[0]] = found
        if not calls:
            return {}
        out: dict[str, list[RootMessage]] = {}
        with self.app.producer_or_acquire() as producer:
            if not self._same_redis(producer):
                return {}
            keep = _Keep()
            local = producer._batch_local
            local.current = keep
            try:
                for fid, flow_calls in calls.items():
                    built = self._build(producer, keep, flow_calls)
                    if built is None:
                        if not self.enabled:
                            break
                        continue
                    out[fid] = built
            finally:
                del local.current
        return out

    def _calls(self, row: CreateRow) -> list[Call] | None:
        """The calls of a flow's roots as its first claim would make them, or None when
        the flow does not qualify (the module docstring)."""
        fid, meta, _digest, nodes, _blobs = row
        if meta.get("cgroup") or meta.get("rate_limit") or meta.get("eager"):
            return None
        roots = [node for node in nodes if not node[1].get("after")]
        if not roots or len(roots) > BATCH:
            return None
        dispatcher = self.dispatcher
        calls = []
        for nid, rec, blob in roots:
            if rec.get("kind", "task") != "task":
                return None
            # the claim entry create.lua's release would give (claim.lua): attempt 1
            stored = json.dumps({**compact(rec), "attempt": 1})
            entry: list[Any] = [nid, stored, blob or None, "[]", []]
            try:
                call = dispatcher.prepare(fid, meta["nonce"], entry)
            except Exception:
                return None  # the usual path reports it (the node fails, unsendable)
            if dispatcher.limits.limiters(fid, "", call.rec, call.queue):
                return None
            calls.append(call)
        return calls

    def _build(self, producer: Any, keep: _Keep, calls: list[Call]
               ) -> list[RootMessage] | None:
        """Each call published through Celery into ``keep``: its Redis commands."""
        out: list[RootMessage] = []
        try:
            for call in calls:
                keep.commands = []
                self.dispatcher._send(call, producer)
                commands = keep.commands
                if not any(name == "lpush" for name, _ in commands) or \
                        any(name not in COMMANDS for name, _ in commands):
                    self.enabled = False
                    logger.warning("celery-flows: a root message took broker commands %s; "
                                   "roots are published after their flow's create from now "
                                   "on", [name for name, _ in commands])
                    return None
                out.append((call.node_id, call.attempt, call.queue, call.task_id,
                            [(name, *args[:2]) for name, args in commands]))
        except Exception:
            logger.debug("celery-flows: building root messages failed; publishing after "
                         "the create instead", exc_info=True)
            return None
        return out
