"""Waiting for a flow's "done" notification: :class:`DoneListener`, and the pub/sub
connection a thread keeps from one wait to the next on a single Redis."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from .replies import text

__all__ = ["DoneListener", "kept_listener"]


class DoneListener:
    """A subscription to a flow's "done" channel. On Redis Cluster a failover leaves
    the channel's node unreachable until the client's slot map is refreshed: then
    :meth:`wait` reports that it could not listen, and the caller polls meanwhile.

    On a single Redis a thread keeps its pub/sub connection from one wait to the next
    (``keep`` takes it back, unsubscribed): a new one costs a connect and its setup
    round trips on every ``wait()``, where Celery's result consumer keeps its own."""

    def __init__(self, client: Any, channel: str, pubsub: Any = None,
                 keep: Callable[[Any], None] | None = None) -> None:
        self._client = client
        self._pubsub = pubsub or client.pubsub(ignore_subscribe_messages=True)
        self._channel = channel
        self._keep = keep
        self._subscribed = False
        #: the state the last notification of this channel carried (engine/flow.lua)
        self.notified: str | None = None

    def subscribe(self) -> bool:
        """Subscribe (before the state is read, so no notification is missed), if the
        channel is reachable; whether it is subscribed."""
        for _ in range(2):
            if self._subscribed:
                break
            try:
                self._pubsub.subscribe(self._channel)
                self._subscribed = True
            except redis.RedisError:
                # a kept connection the server closed meanwhile: once more on a new one
                self._pubsub.close()
                self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        return self._subscribed

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for this channel's message; False at once when
        not subscribed (the caller sleeps instead). Another channel's message (one a
        kept connection was subscribed to before) and the server's confirmations are
        passed over."""
        if not self._subscribed:
            return False
        deadline = time.monotonic() + timeout
        channel = self._channel.encode()
        try:
            while True:
                left = deadline - time.monotonic()
                message = self._pubsub.get_message(timeout=max(left, 0.001))
                if message is not None and message.get("channel") in (channel,
                                                                      self._channel):
                    self.notified = text(message.get("data") or b"")
                    return True
                if left <= 0:
                    return True
        except redis.RedisError:
            self._subscribed = False
            self._pubsub.reset()
            return False

    def close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if self._keep is not None and self._subscribed:
            try:
                pubsub.unsubscribe(self._channel)
            except redis.RedisError:
                pass
            else:
                self._keep(pubsub)
                return
        pubsub.close()


def kept_listener(kept: threading.local, client: Any, channel: str) -> DoneListener:
    """A listener on the pub/sub connection this thread kept in ``kept`` from its last
    wait, given back when it closes."""
    pubsub = getattr(kept, "pubsub", None)
    if pubsub is not None and kept.pid != os.getpid():
        pubsub = None  # a forked child's: its connection is the parent's
    kept.pubsub = None  # taken: a wait nested in this one gets a connection of its own

    def keep(pubsub: Any) -> None:
        kept.pubsub, kept.pid = pubsub, os.getpid()

    return DoneListener(client, channel, pubsub, keep)
