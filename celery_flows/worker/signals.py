"""Celery signals -> registry outcomes -> dispatch.

Receivers are module functions connected once (``dispatch_uid``) when the first
:class:`~celery_flows.Flows` is created; each finds the app's engine through the
sender's app (``engine_of``), so several apps may share a process and non-flow tasks
are ignored.

Where they fire (CELERY_NOTES): retry and body failures in the pool child that ran
the body (recorded only if this process's guard started it; a success is recorded by
the guard itself as the body returns, before the result backend's write, except one
that maps expand over: that one here, after it); hard time limits, lost workers,
revocations, unknown and rejected messages in the worker's main process (recorded by
the task id, which names the attempt; first report wins).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.exceptions import WorkerLostError

from ..engine import Engine, engine_of
from ..engine.outcomes import current_instance
from ..errors import FlowVersionError
from ..registry.ids import TaskRef, parse_task_id
from . import guard, receipts

__all__ = ["connect"]

logger = logging.getLogger(__name__)


def _engine(sender: Any) -> Engine | None:
    return engine_of(getattr(sender, "app", None))


def _error_text(exc: Any) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_eager(task: Any) -> bool:
    request = getattr(task, "request", None)
    return bool(getattr(request, "is_eager", False))


def _of_current_flow(engine: Engine, task_id: str) -> bool:
    """Whether a task id belongs to the flow that now has its flow id: a message left
    from an earlier flow with the same id (reused after retention) is never recorded
    into the new one."""
    if engine.outcomes.is_current(task_id):
        return True
    logger.info("celery-flows: ignoring an outcome of %s, a message of an earlier flow "
                "with the same id", task_id)
    return False


def _safely(what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except Exception:
        logger.exception("celery-flows: recording %s failed; recovery will reconcile it", what)


def on_task_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    """A success maps expand over: the guard left it to be recorded here, after Celery
    stored it in the result backend."""
    request = getattr(sender, "request", None)
    run = guard.active.pop(str(getattr(request, "id", "")), None)
    if run is None or run.outcomes.app is not getattr(sender, "app", None):
        return
    _safely("a success", run.outcomes.record, run.id, run.node_id, run.attempt, "succeeded",
            result=result, task_id=run.task_id)


def on_task_failure(sender: Any = None, task_id: str | None = None, exception: Any = None,
                    **_: Any) -> None:
    run = guard.active.pop(task_id, None) if task_id else None
    if run is not None:
        _safely("a failure", run.outcomes.record, run.id, run.node_id, run.attempt, "failed",
                error=_error_text(exception), task_id=run.task_id)
        return
    if isinstance(exception, FlowVersionError):
        return  # the guard refused a newer flow's record: not this worker's to write
    engine = _engine(sender)
    ref = parse_task_id(task_id)
    if (engine is None or ref is None or _is_eager(sender)
            or not _of_current_flow(engine, str(task_id))):
        return
    if isinstance(exception, WorkerLostError):
        _safely("a lost worker", _pool_child_lost, engine, ref, str(task_id),
                _error_text(exception))
        return
    # Reported by the main process: hard time limit, Reject(requeue=False)...
    _safely("a failure", engine.outcomes.record, ref.flow_id, ref.node_id, ref.attempt, "failed",
            error=_error_text(exception), task_id=task_id)


def _pool_child_lost(engine: Engine, ref: TaskRef, task_id: str, error: str) -> None:
    """A pool child died running a node: recovered, unless the result backend already
    has the outcome (the child died after storing it, inside the completion path)."""
    if engine.outcomes.record_stored(ref, task_id):
        return
    instance = current_instance()
    engine.outcomes.record_lost(ref, error, lost_instance=instance or "")
    if instance:
        engine.store.lease_drop(instance, task_id)


def on_task_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any
                  ) -> None:
    run = guard.active.pop(str(getattr(request, "id", "")), None)
    if run is None or run.retry_recorded:
        return  # held in Redis by the guard's retry(): already recorded
    _safely("a retry", run.outcomes.record, run.id, run.node_id, run.attempt, "retrying",
            error=_error_text(reason), task_id=run.task_id)


def on_task_revoked(sender: Any = None, request: Any = None, terminated: bool = False,
                    expired: bool = False, **_: Any) -> None:
    engine = _engine(sender)
    ref = parse_task_id(getattr(request, "id", None))
    if engine is None or ref is None or not _of_current_flow(engine, request.id):
        return
    why = "expired" if expired else ("terminated" if terminated else "revoked")
    _safely("a revocation", engine.outcomes.record, ref.flow_id, ref.node_id, ref.attempt, "failed",
            error=f"TaskRevokedError: the task message was {why}", task_id=request.id)


def on_task_unknown(sender: Any = None, name: str | None = None, id: str | None = None,
                    **_: Any) -> None:
    engine = _engine(sender)
    ref = parse_task_id(id)
    if engine is None or ref is None or not _of_current_flow(engine, str(id)):
        return
    _safely("an unknown task", engine.outcomes.record, ref.flow_id, ref.node_id,
            ref.attempt, "failed",
            error=f"NotRegistered: task {name!r} is not registered on the worker that "
                  "received it; import its module in the worker")


def on_task_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    """The lease starts when a worker receives a flow message."""
    task_id = getattr(request, "id", None)
    instance = current_instance()
    if instance is None or parse_task_id(task_id) is None:
        return
    engine = _engine(sender)
    if engine is None:
        return
    waiting = receipts.current()
    if waiting is not None and engine.store.inline:
        waiting.add(str(task_id))  # leased by its start, or within RECEIPT_DELAY
        return
    _safely("a lease", engine.store.lease_add, instance, task_id)


def on_task_rejected(sender: Any = None, message: Any = None, exc: Any = None, **_: Any
                     ) -> None:
    engine = _engine(sender)
    headers = getattr(message, "headers", None) or {}
    ref = parse_task_id(headers.get("id"))
    if engine is None or ref is None or not _of_current_flow(engine, headers["id"]):
        return
    _safely("a rejected message", engine.outcomes.record, ref.flow_id, ref.node_id, ref.attempt,
            "failed", error=f"Rejected: the worker rejected the message ({_error_text(exc)})")


_RECEIVERS = (
    (signals.task_success, on_task_success),
    (signals.task_failure, on_task_failure),
    (signals.task_retry, on_task_retry),
    (signals.task_revoked, on_task_revoked),
    (signals.task_unknown, on_task_unknown),
    (signals.task_rejected, on_task_rejected),
    (signals.task_received, on_task_received),
)


def connect() -> None:
    """Connect the receivers (once per process, whatever the number of apps)."""
    for signal, receiver in _RECEIVERS:
        signal.connect(receiver, weak=False, dispatch_uid=f"celery_flows.{receiver.__name__}")
