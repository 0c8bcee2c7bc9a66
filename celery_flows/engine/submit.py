"""Submitting a flow: compile it, serialise its user data, store it atomically and
release its roots (or run it here under ``task_always_eager``).

A retried submit of an identical definition with the same id returns the existing
flow: the digest covers the definition fields and every user-data blob.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
from typing import Any

from .. import faults
from ..config import redact_webhook
from ..define.compile import CompiledFlow
from ..define.flow import Flow
from ..define.records import NodeRecord, context_field
from ..errors import FlowDefinitionError
from ..registry.codes import raise_for
from ..registry.creation import CreateRow
from ..registry.keys import FORMAT_VERSION
from .direct import Direct
from .dispatch import CLAIM
from .eager import run_eager
from .outcomes import OnOutcomes

__all__ = ["Submitter"]

# Definition fields that make two submits of the same flow id "identical".
# (User data is compared through its serialised blobs, which the digest also covers.)
_DEF_FIELDS = ("task", "kind", "after", "input", "queue", "priority", "rate", "policy", "epol",
               "fpol", "rule", "max_rec", "timeout", "poke", "ctx")


# json.dumps(..., sort_keys=True) as one encoder: dumps builds a new one per call
_DIGEST_JSON = json.JSONEncoder(sort_keys=True)


class Submitter(OnOutcomes):
    """``submit``: one flow from its definition to its released roots."""

    @property
    def eager(self) -> bool:
        return bool(self.app.conf.task_always_eager)

    def _dump_context(self, context: dict[str, Any], what: str) -> bytes:
        try:
            return self.codec.dump_context(context)
        except Exception as exc:
            raise FlowDefinitionError(
                f"{what} cannot be serialised with task_serializer "
                f"{self.codec.task_serializer!r}: {exc}"
            ) from None

    def prepare(self, flow: Flow) -> tuple[CompiledFlow, CreateRow]:
        """Compile and serialise; FlowDefinitionError before anything is written."""
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
        nodes: list[tuple[str, NodeRecord, bytes]] = []
        digest = hashlib.sha256()
        digest.update(json.dumps([compiled.name, compiled.options], sort_keys=True).encode())
        encode = _DIGEST_JSON.encode
        empty = self.codec.empty_call
        dump_call = self.codec.dump_call
        for field, blob in blobs:
            digest.update(f"{field}\n{len(blob)}\n".encode())
            digest.update(blob)
        for nid, rec in compiled.records.items():
            call = compiled.calls.get(nid)
            try:
                blob = dump_call(*call) if call is not None else b""
            except Exception as exc:
                raise FlowDefinitionError(
                    f"node {nid!r}: arguments or signature options cannot be serialised "
                    f"with task_serializer {self.codec.task_serializer!r}: {exc}"
                ) from None
            # the digest covers the call as serialised even where nothing is stored
            nodes.append((nid, rec, b"" if blob is empty else blob))
            digest.update(nid.encode())
            digest.update(encode({k: rec.get(k) for k in _DEF_FIELDS}).encode())
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
            "webhook_events": ",".join(compiled.options.get("webhook_events", ["flow"])),
            "paused": "0",
            # driven by this process alone (eager.py): workers' services never claim it
            "eager": "1" if self.eager else "",
            "channel": self.store.keys.channel(compiled.id),
        }
        concurrency = compiled.options.get("concurrency")
        if concurrency and not self.eager:  # eager mode ignores groups
            # stored waiting: its first claim asks for its place (engine/groups.py)
            meta.update(cgroup=concurrency[0], ckey=concurrency[1], cgen="1", cwait="1",
                        on_limit=compiled.options.get("on_limit") or "queue")
        return compiled, (compiled.id, meta, digest.hexdigest(), nodes, blobs)

    @functools.cached_property
    def direct(self) -> Direct:
        return Direct(self.app, self.dispatcher)

    def submit(self, flow: Flow) -> str:
        """Store the flow atomically and release its roots; returns its id."""
        row = self.prepare(flow)[1]
        raise_for(self.submit_row(row, fresh=flow.id is None), row[0])
        return row[0]

    def submit_row(self, row: CreateRow, fresh: bool = False) -> int:
        """Store a prepared flow in one create.lua call and release its roots; the
        create code (a large flow is stored in pieces instead: engine/batch.py
        ``submit_flow``). ``fresh``: the flow's id was drawn here, so no flow holds it
        yet: its roots' messages may go with the create (engine/direct.py)."""
        fid = row[0]
        store = self.store
        eager = self.eager
        messages = self.direct.messages(row) if fresh and not eager else None
        created = store.create(row, None if eager or messages else CLAIM, messages or ())
        if created.reply == 2:
            return 1  # created, its roots queued and acknowledged by create.lua
        if eager:
            if created.reply == 1:
                run_eager(self.outcomes, fid)
            store.clear_dirty(created.token)
        else:
            # also for an existing flow: whatever its outbox holds is due anyway
            faults.point("after-create")
            self.dispatcher.release(fid, created.token, created.claim)
        return created.reply
