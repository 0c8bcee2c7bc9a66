"""The :class:`Flows` extension object: configuration, submission, outcome recording."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any

from . import faults
from .changes import ChangesMixin
from .codec import Codec
from .compile import CompiledFlow
from .config import FlowsConfig, redact_webhook
from .dispatch import BATCH, CLAIM_LEASE, Dispatcher
from .errors import FlowDefinitionError, FlowStateError
from .flow import Flow
from .handle import FlowHandle
from .keys import context_field
from .models import FORMAT_VERSION, check_node_opts, check_rate
from .ratelimit import Router
from .store import Store, check_code

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

__all__ = ["Flows"]

# Definition fields that make two submits of the same flow id "identical".
# (User data is compared through its serialised blobs, which the digest also covers.)
_DEF_FIELDS = ("task", "kind", "after", "input", "queue", "priority", "rate", "policy", "epol",
               "fpol", "rule", "max_rec", "timeout", "poke", "ctx")

# what submit stores: compiled flow, meta fields, digest, (node id, record, call blob),
# (args-hash field, blob) of the contexts
Prepared = tuple[CompiledFlow, dict[str, str], str, list[tuple[str, dict[str, Any], bytes]],
                 list[tuple[str, bytes]]]


def _route_calls(task: Any, queue: str | None, priority: int | None) -> None:
    """Default queue/priority for ordinary calls of a decorated task (explicit call
    options still win)."""
    original = task.apply_async

    def apply_async(args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        if queue is not None:
            options.setdefault("queue", queue)
        if priority is not None:
            options.setdefault("priority", priority)
        return original(args, kwargs, **options)

    task.apply_async = apply_async


class Flows(ChangesMixin):
    """Attach celery-flows to a Celery app: ``flows = Flows(app)`` (also ``app.flows``)."""

    def __init__(self, app: Celery) -> None:
        existing = getattr(app, "flows", None)
        if isinstance(existing, Flows):
            raise RuntimeError(f"app {app.main!r} already has celery-flows attached")
        self.app = app
        app.flows = self
        from . import signals, worker

        worker.install(self)
        signals.connect()

    def __repr__(self) -> str:
        return f"<Flows of app {self.app.main!r}>"

    def close(self) -> None:
        """Close the registry's Redis connections (they reopen on next use)."""
        store = self.__dict__.get("store")
        if store is not None and "client" in store.__dict__:
            store.client.close()
            del store.__dict__["client"]
            store.__dict__.pop("_scripts", None)

    # -- lazily built parts ----------------------------------------------------------

    @cached_property
    def config(self) -> FlowsConfig:
        return FlowsConfig.from_app(self.app)

    @cached_property
    def store(self) -> Store:
        return Store(self.config, self.codec)

    @cached_property
    def codec(self) -> Codec:
        return Codec(self.app)

    @cached_property
    def dispatcher(self) -> Dispatcher:
        return Dispatcher(self)

    @cached_property
    def router(self) -> Router:
        return Router(self)

    # -- tasks -------------------------------------------------------------------------

    def task(self, *args: Any, queue: str | None = None, priority: int | None = None,
             flow_rate_limit: str | None = None, flow_failure_policy: str | None = None,
             flow_trigger_rule: str | None = None, flow_max_recoveries: int | None = None,
             **options: Any) -> Any:
        """``app.task`` plus flow defaults for the nodes of this task.

        ``queue=`` and ``priority=`` are the node defaults and also apply to calls of the
        task outside flows (without Celery's deprecated task attributes);
        ``flow_rate_limit`` is a cluster-wide limit for flow releases (Celery's own
        ``rate_limit=`` stays per worker).
        """
        defaults = check_node_opts(
            "<task defaults>",
            queue=queue,
            priority=priority,
            failure_policy=flow_failure_policy,
            trigger_rule=flow_trigger_rule,
            max_recoveries=flow_max_recoveries,
        )
        if flow_rate_limit is not None:
            check_rate(flow_rate_limit, None, "flow_rate_limit")
            defaults["rate"] = flow_rate_limit

        def attach(task: Any) -> Any:
            task.flows_defaults = defaults
            if queue is not None or priority is not None:
                _route_calls(task, queue, priority)
            return task

        if len(args) == 1 and callable(args[0]):
            return attach(self.app.task(**options)(args[0]))

        def decorator(fun: Callable[..., Any]) -> Any:
            return attach(self.app.task(*args, **options)(fun))

        return decorator

    def route_queue(self, rec: dict[str, Any], task_name: str, args: Any, kwargs: Any) -> str:
        """Node option, else task option, else Celery's own routing."""
        if rec.get("queue"):
            return str(rec["queue"])
        task = self.app.tasks.get(task_name)
        defaults = getattr(task, "flows_defaults", None) or {}
        if defaults.get("queue"):
            return str(defaults["queue"])
        route = self.app.amqp.router.route({}, task_name, args, kwargs)
        queue = route.get("queue")
        return str(getattr(queue, "name", queue) or self.app.conf.task_default_queue)

    # -- submitting ----------------------------------------------------------------------

    def _dump_context(self, context: dict[str, Any], what: str) -> bytes:
        try:
            return self.codec.dump_context(context)
        except Exception as exc:
            raise FlowDefinitionError(
                f"{what} cannot be serialised with task_serializer "
                f"{self.codec.task_serializer!r}: {exc}"
            ) from None

    def _prepare(self, flow: Flow) -> Prepared:
        if not isinstance(flow, Flow):
            raise FlowDefinitionError(f"submit() takes a Flow, got {flow!r}")
        compiled = flow.compile(self.app, self.config)
        hook = compiled.options["webhook"]
        if hook and not self.config.webhook_allowed(hook):
            raise FlowDefinitionError(f"flow {compiled.name!r}: webhook {redact_webhook(hook)} "
                                      "is not in flows_webhook_allowed_hosts")
        if not compiled.records:
            raise FlowDefinitionError(f"flow {flow.name!r} has no nodes")
        # user data as opaque blobs (Lua only copies them): exact under the serializer
        blobs = [(context_field(), self._dump_context(compiled.context, "flow context"))]
        for field, overlay in compiled.contexts.items():
            sub = field.partition("#")[2]
            blobs.append((field, self._dump_context(overlay, f"sub-flow {sub!r} context")))
        nodes: list[tuple[str, dict[str, Any], bytes]] = []
        digest = hashlib.sha256()
        digest.update(json.dumps([compiled.name, compiled.options], sort_keys=True).encode())
        for field, blob in blobs:
            digest.update(f"{field}\n{len(blob)}\n".encode())
            digest.update(blob)
        for nid, rec in compiled.records.items():
            call = compiled.calls.get(nid)
            try:
                blob = self.codec.dump_call(*call) if call is not None else b""
            except Exception as exc:
                raise FlowDefinitionError(
                    f"node {nid!r}: arguments or signature options cannot be serialised "
                    f"with task_serializer {self.codec.task_serializer!r}: {exc}"
                ) from None
            nodes.append((nid, rec, blob))
            digest.update(nid.encode())
            digest.update(json.dumps({k: rec.get(k) for k in _DEF_FIELDS},
                                     sort_keys=True).encode())
            digest.update(f"\n{len(blob)}\n".encode())
            digest.update(blob)
        meta = {
            "v": FORMAT_VERSION,
            "id": compiled.id,
            "name": compiled.name,
            "nonce": secrets.token_hex(4),
            "retention": str(self.config.retention),
            "rate_limit": compiled.options["rate_limit"] or "",
            "webhook": compiled.options["webhook"] or self.config.webhook_url or "",
            "fail_fast": "1" if compiled.options["fail_fast"] else "0",
            "paused": "0",
            # driven by this process alone (eager.py): workers' services never claim it
            "eager": "1" if self.app.conf.task_always_eager else "",
            "channel": self.store.keys.channel(compiled.id),
        }
        return compiled, meta, digest.hexdigest(), nodes, blobs

    def submit(self, flow: Flow) -> FlowHandle:
        """Store the flow atomically and release its roots. A retried submit of an
        identical definition with the same id returns the existing flow."""
        compiled, meta, digest, nodes, blobs = self._prepare(flow)
        fid = compiled.id
        store = self.store
        eager = bool(self.app.conf.task_always_eager)
        token, code, claim = store.create_marked(
            fid, meta, digest, nodes, None if eager else (CLAIM_LEASE, BATCH), blobs
        )
        if eager:
            if code == 1:
                from .eager import run_eager

                run_eager(self, fid)
            store.clear_dirty(token)
        else:
            # also for an existing flow: whatever its outbox holds is due anyway
            faults.point("after-create")
            self.dispatcher.release(fid, token, claim)
        if code == -3:
            raise FlowStateError(
                f"flow {fid!r} already exists with a different definition; use a new id"
            )
        return FlowHandle(self, fid)

    def add_bulk(self, flows: list[Flow]) -> list[FlowHandle]:
        """Submit several flows as one batch: all become visible and run, or none does
        (also on Redis Cluster, and if this process dies mid-batch; see batch.py)."""
        from .batch import submit_batch

        return submit_batch(self, flows)

    def get(self, flow_id: str) -> FlowHandle:
        """Handle of an existing flow; FlowNotFoundError if unknown."""
        self.store.require_meta(flow_id)
        return FlowHandle(self, flow_id)

    # -- outcomes (called from signal receivers and the eager driver) ----------------

    def record(self, fid: str, nid: str, attempt: int, outcome: str, *,
               result: Any = None, error: str = "", release: bool = True,
               external: bool = False, task_id: str | None = None,
               retry_delay: float | None = None) -> tuple[int, str]:
        """Record an attempt's outcome and publish what it made ready (unless the
        caller drains the outbox itself, as the eager driver does)."""
        blob = b""
        if outcome == "succeeded":
            try:
                blob = self.codec.dump_result(result)
            except Exception as exc:
                outcome, error = "failed", f"EncodeError: {exc}"
            else:
                limit = self.config.max_result_bytes
                if len(blob) > limit:
                    error = (f"ResultTooLarge: the serialised result is {len(blob)} bytes, "
                             f"over flows_max_result_bytes={limit}; return a reference "
                             "(a path or key) instead of the data")
                    outcome, blob = "failed", b""
        store = self.store
        from . import recovery

        drop = (recovery.INSTANCE, task_id) if recovery.INSTANCE and task_id else None
        if outcome == "retrying":
            code, _released, state, _queue = store.complete(
                fid, nid, attempt, outcome, blob, error, retry_delay
            )
            if drop:
                store.lease_drop(*drop)
            return code, state
        falsy = False
        if outcome == "succeeded":
            try:
                falsy = not result  # a sensor pokes again on a falsy result
            except Exception:
                falsy = False
        eager = bool(self.app.conf.task_always_eager)
        if not release or eager:
            code, _released, state, _queue = store.complete(
                fid, nid, attempt, outcome, blob, error, external=external, falsy=falsy
            )
            check_code(code, fid)
            if release and eager:  # e.g. flows.signal() under task_always_eager
                from .eager import run_eager

                run_eager(self, fid)
                state = FlowHandle(self, fid).state().value
            return code, state
        token, (code, _released, state, queue), claim = store.complete_and_claim(
            fid, nid, attempt, outcome, blob, error, CLAIM_LEASE, BATCH, external, drop, falsy
        )
        if code < 0:
            store.clear_dirty(token)
            check_code(code, fid)
        if code == 1 and task_id:
            self.router.release_slot(queue, task_id)
        faults.point("after-record")
        self.dispatcher.release(fid, token, claim)
        return code, state

    def record_lost(self, ref: Any, error: str, lost_instance: str = "") -> int:
        """The worker running ``ref``'s attempt died: recover the node (a new attempt,
        or WorkerLostError once its recoveries are used up)."""
        store = self.store
        token, (code, _released, _state), claim = store.recover_and_claim(
            ref.flow_id, ref.node_id, ref.attempt, self.config.max_recoveries, error,
            lost_instance, CLAIM_LEASE, BATCH,
        )
        if code < 0:
            store.clear_dirty(token)
            check_code(code, ref.flow_id)
        self.dispatcher.release(ref.flow_id, token, claim)
        return code

    def _dependency_results(self, fid: str, nid: str) -> dict[str, Any]:
        rec = self.store.node(fid, nid) or {}
        deps = list(rec.get("after") or [])
        raw = self.store.results(fid, deps)
        return {d: self.codec.load_result(raw[d]) for d in deps if d in raw}

    def _dependency_failures(self, fid: str, nid: str) -> dict[str, str]:
        nodes = self.store.nodes(fid)
        rec = nodes.get(nid) or {}
        out = {}
        for dep in rec.get("after") or []:
            d = nodes.get(dep)
            if d and d.get("state") == "failed":
                out[dep] = d.get("error") or "failed"
        return out
