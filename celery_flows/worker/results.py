"""A node's Celery result, written in the step that records its completion.

Celery's tracer stores a task's result after its body returns: a ``GET`` of the result
key (it never overwrites a ``SUCCESS``), then ``SETEX`` and ``PUBLISH`` in a
``MULTI``/``EXEC``: two more round trips from the pool process for every node, which
took a third of a pool process's busy time in the cost-per-node benchmark (py-spy). When the
result backend is Celery's Redis backend on the registry's Redis, ``complete.lua``
writes the same value under the same key instead, in the same step as the completion
(and so never without it), and the tracer is told to skip its own store
(``request.ignore_result``, which Celery's ``mark_as_done`` reads).

The value is built here by the backend itself (its ``encode_result``,
``_get_result_meta`` and ``encode``), so it is what the backend would have stored:
``AsyncResult(task_id).get()``, waiting clients (the ``PUBLISH``) and the recovery's
read of the backend see no difference. Anything else - another backend, a subclass of
the Redis backend, another Redis, a serializer other than JSON or compressed results
(the script reads a stored value to keep a ``SUCCESS``), a task that ignores its
result, a request with callbacks, a chain or a chord (Celery stores those after
sending them) - keeps Celery's own store.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from celery import states
from celery.app.task import get_actual_ignore_result
from celery.backends.redis import RedisBackend

from ..engine import Engine
from ..registry.transitions import BackendWrite

__all__ = ["for_node", "written"]

logger = logging.getLogger(__name__)

_ELIGIBLE: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()


def _backend_qualifies(engine: Engine) -> bool:
    known = _ELIGIBLE.get(engine)
    if known is None:
        backend = engine.app.backend
        known = (type(backend) is RedisBackend and engine.store.inline
                 and backend.serializer == "json" and not backend.compression
                 and _same_redis(backend, engine))
        _ELIGIBLE[engine] = known
    return known


def _same_redis(backend: Any, engine: Engine) -> bool:
    try:
        kwargs = backend.client.connection_pool.connection_kwargs
    except AttributeError:
        return False
    return engine.store.is_registry(kwargs)


def for_node(engine: Engine, task: Any, request: Any, result: Any) -> BackendWrite | None:
    """What the result backend would store for this successful node, or None when
    Celery stores it itself (the module docstring)."""
    if not _backend_qualifies(engine):
        return None
    if (get_actual_ignore_result(task, request) or request.is_eager
            or request.callbacks or request.chain or request.chord):
        return None
    backend = engine.app.backend
    try:
        meta = backend._get_result_meta(
            result=backend.encode_result(result, states.SUCCESS), state=states.SUCCESS,
            traceback=None, request=request)
        meta["task_id"] = str(request.id)
        value = backend.encode(meta)
    except Exception:
        # Celery's store meets the same error and reports it as usual
        logger.debug("celery-flows: the result of %s is stored by Celery", request.id,
                     exc_info=True)
        return None
    expires = backend.expires
    key = backend.get_key_for_task(request.id)
    return (key.decode() if isinstance(key, bytes) else key, value,
            int(expires) if expires else None)


def written(request: Any) -> None:
    """complete.lua wrote the result: Celery's tracer skips its own store."""
    request.ignore_result = True
