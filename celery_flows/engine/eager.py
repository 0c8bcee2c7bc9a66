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

from celery import states

from .. import faults
from ..define.states import NodeState
from ..registry import Store
from ..registry.replies import Published
from . import context
from .context import FlowRun
from .dispatch import BATCH, CLAIM_LEASE
from .outcomes import Outcomes

__all__ = ["run_eager"]


def _poking(store: Store, fid: str) -> bool:
    """Whether the first timed entry of the flow is a poke or retry (not an external
    node's deadline, which no one in this process will signal)."""
    nid = store.first_timed(fid)
    rec = store.node(fid, nid) if nid is not None else None
    return rec is not None and rec.get("state") == NodeState.RETRYING.value


def run_eager(outcomes: Outcomes, fid: str) -> None:
    """Run the flow's ready nodes in this process until nothing is left to run here."""
    store = outcomes.store
    dispatcher = outcomes.dispatcher
    app = outcomes.app
    while True:
        faults.point("eager-claim")
        claim = store.claim(fid, CLAIM_LEASE, BATCH, eager=True)
        code, nonce, entries = claim.code, claim.nonce, claim.entries
        if code == 0 and not entries and claim.next_due is not None and _poking(store, fid):
            # a sensor waits for its next poke (or a held retry): in this process too
            time.sleep(max(claim.next_due - store.now(), 0.0))
            continue
        if code != 0 or not entries:
            if claim.more:  # bounded steps of a large transition are left
                continue
            return
        for entry in entries:
            call = dispatcher.prepare(fid, nonce, entry)
            if call.rec.get("kind") == "map":
                dispatcher.settle_map(fid, call, release=False)
                continue
            store.published(fid, [Published(call.node_id, call.attempt, call.queue, call.task_id,
                                            None)],
                            track=False)
            started = store.start(
                fid, call.node_id, call.attempt, f"{call.retries}:0", call.task_id, "eager"
            )
            if started.code != 1:
                continue
            task = app.tasks.get(call.task_name)
            if task is None:
                outcomes.record(fid, call.node_id, call.attempt, "failed",
                             error=f"NotRegistered: task {call.task_name!r} is not registered",
                             release=False)
                continue
            run = FlowRun(outcomes, fid, call.node_id, call.attempt, call.task_id,
                          {**started.context, **(started.overlay or {})})
            token = context.enter(run)
            try:
                # the signature's headers reach the task as a worker's message would
                result = task.apply(args=call.args, kwargs=call.kwargs, task_id=call.task_id,
                                    throw=False, headers=call.options.get("headers"))
            finally:
                context.leave(token)
            if result.state == states.SUCCESS:
                outcomes.record(fid, call.node_id, call.attempt, "succeeded", result=result.result,
                             release=False)
            else:
                exc = result.result
                error = (f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException)
                         else f"{result.state}: {exc!r}")
                outcomes.record(fid, call.node_id, call.attempt, "failed", error=error,
                             release=False)
