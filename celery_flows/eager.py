"""Driving a flow in the calling process under ``task_always_eager``.

Nothing is published: the outbox is drained in a loop (never recursively, so long
chains cannot overflow the stack), each node runs through ``task.apply()`` and its
outcome goes through the same transitions a worker uses. Rate limits and queue caps
do not apply.

The flow is created marked ``eager``: claim.lua gives its outbox only to this driver
and start.lua starts its nodes only here, so ``--flows`` workers sharing the registry
(their sweeper, releaser, timers, recovery) never take a node of it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from celery import states

from . import context, faults
from .context import FlowRun
from .dispatch import BATCH, CLAIM_LEASE

if TYPE_CHECKING:
    from .core import Flows


def _poking(flows: Flows, fid: str) -> bool:
    """Whether the first timed entry of the flow is a poke or retry (not an external
    node's deadline, which no one in this process will signal)."""
    store = flows.store
    first = store.client.zrange(store.keys.flow(fid)[5], 0, 0)
    if not first:
        return False
    nid = first[0].decode() if isinstance(first[0], bytes) else str(first[0])
    rec = store.node(fid, nid)
    return rec is not None and rec.get("state") == "retrying"


def run_eager(flows: Flows, fid: str) -> None:
    store = flows.store
    while True:
        faults.point("eager-claim")
        claim = store.claim(fid, CLAIM_LEASE, BATCH, eager=True)
        code, nonce, entries = claim.code, claim.nonce, claim.entries
        if code == 0 and not entries and claim.next_due is not None and _poking(flows, fid):
            # a sensor waits for its next poke (or a held retry): in this process too
            time.sleep(max(claim.next_due - store.now(), 0.0))
            continue
        if code != 0 or not entries:
            return
        for entry in entries:
            call = flows.dispatcher.prepare(fid, nonce, entry)
            store.published(fid, [(call.node_id, call.attempt, call.queue, call.task_id, None)],
                            track=False)
            started, ctx, overlay = store.start(
                fid, call.node_id, call.attempt, f"{call.retries}:0", call.task_id, "eager"
            )
            if started != 1:
                continue
            task = flows.app.tasks.get(call.task_name)
            if task is None:
                flows.record(fid, call.node_id, call.attempt, "failed",
                             error=f"NotRegistered: task {call.task_name!r} is not registered",
                             release=False)
                continue
            run = FlowRun(flows, fid, call.node_id, call.attempt, call.task_id,
                          {**ctx, **(overlay or {})})
            token = context.enter(run)
            try:
                # the signature's headers reach the task as a worker's message would
                result = task.apply(args=call.args, kwargs=call.kwargs, task_id=call.task_id,
                                    throw=False, headers=call.options.get("headers"))
            finally:
                context.leave(token)
            if result.state == states.SUCCESS:
                flows.record(fid, call.node_id, call.attempt, "succeeded", result=result.result,
                             release=False)
            else:
                exc = result.result
                error = (f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException)
                         else f"{result.state}: {exc!r}")
                flows.record(fid, call.node_id, call.attempt, "failed", error=error,
                             release=False)
