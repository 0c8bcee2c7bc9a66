"""Node messages sent without Celery's result subscription.

``apply_async`` outside a worker subscribes the sending process to the task's result
channel (the Redis result backend's ``on_task_call``), so that an ``AsyncResult.get()``
cannot miss the result; the ``AsyncResult`` it returns unsubscribes again when it is
garbage collected. Nobody waits on a node's ``AsyncResult``: a flow is awaited through
its own channel (``FlowHandle.wait``), and a caller who asks for a node's
``AsyncResult`` anyway subscribes in ``get()`` as Celery always does. Both commands
went to Redis for every node a producer published, and their replies waited on the
process's result connection for the next ``get()`` to read: an add_bulk of 2,000
five-node flows took 1.58 s with them and 1.39 s without them, and plain Celery calls
made in the same process after 5,000 flow roots ran 12 % slower (redis-server 6.2).

:func:`sending` skips the subscription for the publishes made inside it, in this thread
only (the backend object may be shared by threads: ``result_backend_thread_safe``), and
only for the Redis result backend, whose ``on_task_call`` does nothing else. Other
backends (the RPC backend declares its reply queue there) are left as they are.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.backends.redis import RedisBackend

__all__ = ["forget", "sending"]

_local = threading.local()
#: the attribute marking a backend whose on_task_call is wrapped (once per object)
_WRAPPED = "_celery_flows_unwatched"


def _wrap(backend: RedisBackend) -> None:
    original = backend.on_task_call

    def on_task_call(producer: Any, task_id: str) -> Any:
        if getattr(_local, "depth", 0):
            return None
        return original(producer, task_id)

    backend.on_task_call = on_task_call
    setattr(backend, _WRAPPED, True)


@contextmanager
def sending(app: Any) -> Iterator[bool]:
    """Publishes inside skip the result subscription; yields whether they do."""
    backend = app.backend
    if not isinstance(backend, RedisBackend):
        yield False
        return
    if not getattr(backend, _WRAPPED, False):
        _wrap(backend)
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield True
    finally:
        _local.depth -= 1


def forget(result: Any) -> None:
    """A node's ``AsyncResult`` from a publish made in :func:`sending`: its garbage
    collection must not unsubscribe (nothing was subscribed)."""
    result.backend = None
