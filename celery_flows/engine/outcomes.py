"""Recording what happened to a node attempt, and releasing what that made ready.

Every outcome (a worker's success, failure or retry; a lost worker; an external
signal; an eager run) ends here: the result is serialised (and refused when too
large), the transition runs with its dirty marker, claim and lease drop in one round
trip, and the outbox is published. This process's worker instance (``instance``) names
the leases it holds.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import states

from .. import faults
from ..config import FlowsConfig
from ..registry import Store
from ..registry.codec import Codec
from ..registry.codes import raise_for
from ..registry.ids import TaskRef, new_instance_id, parse_task_id, task_nonce
from ..registry.replies import Completion
from ..registry.transitions import BackendWrite
from .dispatch import BATCH, CLAIM_LEASE, Dispatcher
from .limits import Limits
from .maps import expansions

__all__ = ["OnOutcomes", "Outcomes", "current_instance", "set_instance"]

logger = logging.getLogger(__name__)

# The lease holder of this worker (set in the main process before the pool forks, so
# pool children report under the same instance). None outside workers.
_INSTANCE: str | None = None


def current_instance() -> str | None:
    return _INSTANCE


def set_instance(hostname: str) -> str:
    global _INSTANCE
    _INSTANCE = new_instance_id(hostname)
    return _INSTANCE


class Outcomes:
    """Records outcomes of one app's nodes (``record``, ``record_lost``)."""

    def __init__(self, app: Any, config: FlowsConfig, store: Store, codec: Codec,
                 dispatcher: Dispatcher, limits: Limits) -> None:
        self.app = app
        self.config = config
        self.store = store
        self.codec = codec
        self.dispatcher = dispatcher
        self.limits = limits
        dispatcher.collect = self.collect

    def _encode(self, outcome: str, result: Any, error: str) -> tuple[str, bytes, str]:
        if outcome != "succeeded":
            return outcome, b"", error
        try:
            blob = self.codec.dump_result(result)
        except Exception as exc:
            return "failed", b"", f"EncodeError: {exc}"
        limit = self.config.max_result_bytes
        if len(blob) > limit:
            return "failed", b"", (
                f"ResultTooLarge: the serialised result is {len(blob)} bytes, over "
                f"flows_max_result_bytes={limit}; return a reference (a path or key) "
                "instead of the data")
        return outcome, blob, error

    def record(self, fid: str, nid: str, attempt: int, outcome: str, *,
               result: Any = None, error: str = "", release: bool = True,
               external: bool = False, task_id: str | None = None,
               retry_delay: float | None = None, maps_later: bool = False,
               backend: BackendWrite | None = None) -> Completion:
        """Record an attempt's outcome and publish what it made ready (unless
        ``release`` is False: the eager driver drains the outbox itself).
        ``maps_later``: a success that maps expand over is not recorded here; the reply
        (code 7) says so, and the caller records it again later (worker/guard.py).
        ``backend``: the node's Celery result, written in the completion's step when it
        is recorded (code 1) or reported late (0) (worker/results.py)."""
        raw = result
        outcome, blob, error = self._encode(outcome, result, error)
        store = self.store
        instance = current_instance()
        drop = (instance, task_id) if instance and task_id else None
        if outcome == "retrying":
            done = store.complete(fid, nid, attempt, outcome, blob, error, retry_delay)
            if drop:
                store.lease_drop(*drop)
            return done
        falsy = False
        if outcome == "succeeded":
            try:
                falsy = not raw  # a sensor pokes again on a falsy result
            except Exception:
                falsy = False
        if not release or self.app.conf.task_always_eager:
            done = store.complete(fid, nid, attempt, outcome, blob, error, external=external,
                                  falsy=falsy)
            if done.code == 7:
                done = store.complete(fid, nid, attempt, outcome, blob, error,
                                      external=external, falsy=falsy,
                                      expansions=self._expansions(fid, blob, done.maps))
            raise_for(done.code, fid)
            return done
        marked = store.complete_and_claim(fid, nid, attempt, outcome, blob, error,
                                          CLAIM_LEASE, BATCH, external, drop, falsy,
                                          backend=backend if outcome == "succeeded" else None)
        if marked.reply.code == 7:
            if marked.token or marked.claim:
                # Redis Cluster: the claim and the lease's drop ran beside the script;
                # the lease is kept until the outcome is recorded (recovery needs it)
                if drop:
                    store.lease_add(*drop)
                self.dispatcher.release(fid, marked.token, marked.claim)
            if maps_later:
                return marked.reply
            marked = store.complete_and_claim(
                fid, nid, attempt, outcome, blob, error, CLAIM_LEASE, BATCH, external, drop,
                falsy, self._expansions(fid, blob, marked.reply.maps))
        done = marked.reply
        if done.code < 0:
            if marked.token:
                store.clear_dirty(marked.token)
            raise_for(done.code, fid)
        if done.code == 1 and task_id:
            self.limits.release_slot(done.queue, task_id)
        faults.point("after-record")
        # a worker's release: nobody waits for the acknowledgement of what it sent (a
        # producer's signal() returns with the dependents queued)
        self.dispatcher.release(fid, marked.token, marked.claim, defer=instance is not None)
        return done

    def _expansions(self, fid: str, blob: bytes, lengths: dict[str, int] | None) -> str:
        """The maps over a node expand over its result (engine/maps.py), as its
        dependents would read it (a tuple through JSON is a list)."""
        value = self.codec.load_result(blob)
        return expansions(self.store, self.codec, self.config, fid, value, lengths or {})

    def collect(self, fid: str, nid: str, attempt: int, value: list[Any],
                release: bool = True) -> None:
        """A map's items are all terminal: their results, in order, are its result."""
        self.record(fid, nid, attempt, "succeeded", result=value, release=release)

    def record_lost(self, ref: TaskRef, error: str, lost_instance: str = "") -> int:
        """The worker running ``ref``'s attempt died: recover the node (a new attempt,
        or WorkerLostError once its recoveries are used up)."""
        from .logcontext import flow_scope

        with flow_scope(ref.flow_id, ref.node_id):
            return self._record_lost(ref, error, lost_instance)

    def _record_lost(self, ref: TaskRef, error: str, lost_instance: str) -> int:
        store = self.store
        marked = store.recover_and_claim(
            ref.flow_id, ref.node_id, ref.attempt, self.config.max_recoveries, error,
            lost_instance, CLAIM_LEASE, BATCH,
        )
        if marked.reply.code < 0:
            store.clear_dirty(marked.token)
            raise_for(marked.reply.code, ref.flow_id)
        if marked.reply.code > 0:
            store.count_recovery()
        self.dispatcher.release(ref.flow_id, marked.token, marked.claim)
        return marked.reply.code

    def record_stored(self, ref: TaskRef, task_id: str) -> bool:
        """Record the outcome the result backend kept for ``task_id`` (its body ended,
        then its worker died before the outcome reached the registry); False when the
        backend has no final state for it."""
        stored = backend_outcome(self.app, task_id)
        if stored is None:
            return False
        outcome, value = stored
        logger.warning("celery-flows: %s finished without its outcome being recorded; "
                       "taking it from the result backend (%s)", task_id, outcome)
        if outcome == "succeeded":
            self.record(ref.flow_id, ref.node_id, ref.attempt, outcome, result=value,
                        task_id=task_id)
        else:
            self.record(ref.flow_id, ref.node_id, ref.attempt, outcome, error=value,
                        task_id=task_id)
        return True

    def is_current(self, task_id: str) -> bool:
        """Whether a flow task id was built with the nonce of the flow that now has its
        flow id (a flow id may be reused once the earlier flow expired)."""
        ref = parse_task_id(task_id)
        meta = self.store.meta(ref.flow_id) if ref is not None else None
        return meta is None or meta.get("nonce") == task_nonce(task_id)

    # -- what a running node reads -------------------------------------------------------

    def dependency_results(self, fid: str, nid: str) -> dict[str, Any]:
        rec = self.store.node(fid, nid) or {}
        deps = list(rec.get("after") or [])
        raw = self.store.results(fid, deps)
        return {d: self.codec.load_result(raw[d]) for d in deps if d in raw}

    def dependency_failures(self, fid: str, nid: str) -> dict[str, str]:
        nodes = self.store.nodes(fid)
        rec = nodes.get(nid) or {}
        out = {}
        for dep in rec.get("after") or []:
            d = nodes.get(dep)
            if d and d.get("state") == "failed":
                out[dep] = d.get("error") or "failed"
        return out


class OnOutcomes:
    """A part of the engine that records outcomes and reaches the app, configuration,
    store, codec and dispatcher through them (submit, changes)."""

    def __init__(self, outcomes: Outcomes) -> None:
        self.outcomes = outcomes
        self.app = outcomes.app
        self.config = outcomes.config
        self.store = outcomes.store
        self.codec = outcomes.codec
        self.dispatcher = outcomes.dispatcher


def backend_outcome(app: Any, task_id: str) -> tuple[str, Any] | None:
    """("succeeded", result) or ("failed", error text) if the result backend has the
    task's final state, else None."""
    try:
        if app.conf.result_backend in (None, "disabled") or not app.backend.persistent:
            return None
        meta = app.backend.get_task_meta(task_id)
    except Exception:
        return None
    status = meta.get("status")
    if status == states.SUCCESS:
        return "succeeded", meta.get("result")
    if status == states.FAILURE:
        exc = meta.get("result")
        if type(exc).__name__ == "WorkerLostError":
            return None  # Celery's own record of the loss, not the body's outcome
        return "failed", f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) \
            else f"FAILURE: {exc!r}"
    return None
