"""Log context (SPEC section 11): every log record of the process carries ``flow_id``
and ``node_id``, so that ``%(flow_id)s`` works in any format.

A log record factory, installed once per process (``Flows(app)`` does it) over
whatever factory was there, sets both attributes from :func:`flow_scope`: entered by
``current_flow`` while a node's body runs (context.py), and by a flow service while it
works on one flow (recovery, webhook delivery); else ``None``. No handler or filter is
added to any logger, the root logger included: the application's logging stays its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["enter_scope", "flow_scope", "install", "leave_scope"]

_scope: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar(
    "celery_flows_log_scope", default=(None, None))
_lock = threading.Lock()
_installed = False


Token = contextvars.Token[tuple[str | None, str | None]]


def enter_scope(flow_id: str | None, node_id: str | None = None) -> Token:
    return _scope.set((flow_id, node_id))


def leave_scope(token: Token) -> None:
    _scope.reset(token)


@contextlib.contextmanager
def flow_scope(flow_id: str | None, node_id: str | None = None) -> Iterator[None]:
    """Records emitted inside carry these ids (a flow service at work on one flow)."""
    token = enter_scope(flow_id, node_id)
    try:
        yield
    finally:
        leave_scope(token)


def _wrap(previous: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.flow_id, record.node_id = _scope.get()
        return record

    factory.celery_flows = True  # type: ignore[attr-defined]
    return factory


def install() -> None:
    """Install the record factory (once per process; idempotent)."""
    global _installed
    with _lock:
        current = logging.getLogRecordFactory()
        if _installed and getattr(current, "celery_flows", False):
            return
        logging.setLogRecordFactory(_wrap(current))
        _installed = True
