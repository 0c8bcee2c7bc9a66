"""The attempt guard: wraps every task of a Flows app on its workers so that a node
attempt's body starts at most once.

Celery signals cannot stop a task body (receivers' exceptions are swallowed), so the
guard replaces each task's ``run`` before the worker builds its tracers. For a flow
message it asks the registry (``start.lua``) whether this (attempt, retry, replacement)
may start; a redelivery or a superseded attempt is acked without running by raising
``Ignore``. Non-flow messages run untouched.
"""

from __future__ import annotations

import functools
import logging
import socket
from datetime import datetime
from typing import Any

from celery.exceptions import Ignore, Reject, Retry

from .. import faults
from .._version import __version__
from ..engine import Engine, context
from ..engine.context import FlowRun
from ..engine.outcomes import current_instance
from ..errors import FlowVersionError
from ..registry.codes import START_REASONS, VERSION
from ..registry.ids import parse_task_id
from ..registry.keys import FORMAT_VERSION
from ..registry.transitions import BackendWrite
from . import results

__all__ = ["active", "install"]

logger = logging.getLogger(__name__)

REPLACED_MESSAGE = "Replaced by new task"

# task id -> FlowRun of attempts whose body this process started; read by the signal
# receivers to know that an outcome is theirs to record.
active: dict[str, FlowRun] = {}


def install(engine: Engine) -> None:
    """Wrap every registered task of the app (idempotent)."""
    for task in list(engine.app.tasks.values()):
        if getattr(task, "_flows_guarded", False) or task.name.startswith("celery."):
            continue
        original = task.run
        task.run = _guarded(engine, task, original)
        task.retry = _held_retry(engine, task, task.retry)
        task._flows_guarded = True


def _guarded(engine: Engine, task: Any, original: Any) -> Any:
    @functools.wraps(original)
    def run(*args: Any, **kwargs: Any) -> Any:
        request = task.request
        ref = None if request.is_eager or request.called_directly else parse_task_id(request.id)
        if ref is None:
            return original(*args, **kwargs)
        start_key = f"{request.retries or 0}:{request.get('replaced_task_nesting') or 0}"
        worker = request.hostname or socket.gethostname()
        instance = current_instance()
        try:
            started = engine.store.start(
                ref.flow_id, ref.node_id, ref.attempt, start_key, request.id, worker,
                instance or "",
            )
        except Exception as exc:
            # The registry is unreachable: give the message back rather than run a body
            # whose start is not recorded.
            logger.error("celery-flows: cannot record the start of %s: %r", request.id, exc)
            raise Reject(exc, requeue=True) from None
        code = started.code
        if code == VERSION:
            raise _version_error(engine, ref.flow_id, request.id, worker)
        if code != 1:
            logger.info("celery-flows: not running %s (%s)", request.id,
                        START_REASONS.get(code, code))
            if code in (4, 5) and instance:
                # 4: put back in the outbox, resume() publishes it again (same attempt);
                # 5: not a node of this flow at all
                engine.store.lease_drop(instance, request.id)
            raise Ignore()
        ctx = {**started.context, **(started.overlay or {})}
        run_ = FlowRun(engine.outcomes, ref.flow_id, ref.node_id, ref.attempt, request.id, ctx)
        active[request.id] = run_
        token = context.enter(run_)
        try:
            result = original(*args, **kwargs)
        except Ignore as exc:
            if str(exc) == REPLACED_MESSAGE:
                # the replacement carries the attempt on; whoever starts it leases it
                if instance:
                    engine.store.handoff(ref.flow_id, ref.node_id, ref.attempt, instance)
            else:
                _fail(run_, "Ignore: the task raised Ignore(); a flow node must succeed or "
                      f"fail ({exc})")
            active.pop(request.id, None)
            raise
        except Reject as exc:
            _fail(run_, f"Reject: the task rejected its message ({exc.reason!r})")
            active.pop(request.id, None)
            raise
        finally:
            context.leave(token)
        # Recorded here, before Celery's tracer stores the result in its backend and
        # sends task_success: the dependents are released one backend round trip
        # sooner (a chain publishes its next task at the same point). The backend
        # gets the result too, which a lost pool child's recovery reads: from the same
        # script when results.py can build it (the tracer then skips its own store),
        # else from Celery afterwards.
        if active.pop(request.id, None) is not None:
            backend = results.for_node(engine, task, request, result)
            recorded = _succeed(run_, result, backend)
            if recorded == 7:
                # maps expand over this result: it is recorded from task_success, once
                # the backend holds it, so that a worker killed between staging the
                # elements and the expansion leaves its outcome to the recovery
                # (engine/maps.py)
                active[request.id] = run_
            elif backend is not None and recorded in (0, 1):
                results.written(request)
        return result

    return run


def _held_retry(engine: Engine, task: Any, original: Any) -> Any:
    """``self.retry()`` of a flow node: instead of Celery re-sending the message with a
    countdown (held in worker memory, redelivered after the visibility timeout), the
    node waits in Redis as ``retrying`` and is released again through its limits."""

    @functools.wraps(original)
    def retry(args: Any = None, kwargs: Any = None, exc: Any = None, throw: bool = True,
              eta: Any = None, countdown: Any = None, max_retries: Any = None,
              **options: Any) -> Any:
        request = task.request
        run_ = active.get(request.id) if request.id else None
        if run_ is None or request.is_eager or request.called_directly:
            return original(args=args, kwargs=kwargs, exc=exc, throw=throw, eta=eta,
                            countdown=countdown, max_retries=max_retries, **options)
        retries = request.retries or 0
        limit = task.max_retries if max_retries is None else max_retries
        if limit is not None and retries >= limit:
            # same as Celery: the original exception, or MaxRetriesExceededError
            if exc is not None:
                raise exc
            raise task.MaxRetriesExceededError(
                f"Can't retry {task.name}[{request.id}] args:{request.args} "
                f"kwargs:{request.kwargs}"
            )
        if countdown is None and eta is not None:
            now = datetime.now(eta.tzinfo) if getattr(eta, "tzinfo", None) else datetime.now()
            countdown = (eta - now).total_seconds()
        if countdown is None:
            countdown = task.default_retry_delay
        delay = max(float(countdown or 0), 0.0)
        error = f"{type(exc).__name__}: {exc}" if exc is not None else f"Retry in {delay}s"
        engine.outcomes.record(run_.id, run_.node_id, run_.attempt, "retrying", error=error,
                               task_id=request.id, retry_delay=delay)
        run_.retry_recorded = True
        if not throw:
            return None
        raise Retry(exc=exc, when=delay)

    return retry


def _version_error(engine: Engine, fid: str, task_id: str, worker: str) -> FlowVersionError:
    """The flow was written by a newer celery-flows. This worker must not rewrite a
    record it does not understand, so nothing is recorded in the flow: the Celery task
    fails with this error (result backend, task_failure, the worker's log), the
    message is acked rather than retried forever, and the lease is dropped so no
    recovery touches the record. A worker that reads the format can run the node once
    the message is published again."""
    version = (engine.store.meta(fid) or {}).get("v", "?")
    instance = current_instance()
    if instance:
        engine.store.lease_drop(instance, task_id)
    error = FlowVersionError(
        f"flow {fid!r} was written in record format {version}; worker {worker} runs "
        f"celery-flows {__version__}, which reads format {FORMAT_VERSION.split('.')[0]}.x "
        f"only: upgrade celery-flows on this worker to a release that reads format "
        f"{version.split('.')[0]}. The task {task_id} did not run and the flow's record "
        "was left untouched."
    )
    logger.error("celery-flows: %s", error)
    return error


def _succeed(run_: FlowRun, result: Any, backend: BackendWrite | None) -> int | None:
    """The completion's code (7: maps expand over the result, nothing recorded yet), or
    None when recording failed."""
    try:
        faults.point("body-returned")
        done = run_.outcomes.record(run_.id, run_.node_id, run_.attempt, "succeeded",
                                    result=result, task_id=run_.task_id, maps_later=True,
                                    backend=backend)
    except Exception:
        logger.exception("celery-flows: recording the success of %s failed; recovery "
                         "will reconcile it", run_.task_id)
        return None
    return done.code


def _fail(run_: FlowRun, error: str) -> None:
    try:
        run_.outcomes.record(run_.id, run_.node_id, run_.attempt, "failed", error=error)
    except Exception:
        logger.exception("celery-flows: could not record the failure of %s", run_.task_id)

