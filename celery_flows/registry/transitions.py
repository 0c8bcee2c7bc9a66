"""The flow transitions: one method per Lua script of ``lua/`` (and ``lua/global/``),
each returning a typed reply (replies.py). Several are sent together with the dirty
marker and the claim that follow them, in one round trip."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .. import faults
from ..define.records import NodeRecord, compact
from .connection import Connection
from .ids import new_dirty_token, new_request_id
from .replies import (
    Admission,
    Change,
    Claim,
    Completion,
    Marked,
    Published,
    Recovery,
    Started,
    text,
)

__all__ = ["CreateRow", "NodeRow", "Transitions"]

#: (node id, record, call blob)
NodeRow = tuple[str, NodeRecord, bytes]
#: (flow id, meta fields, digest, [node row], [(args field, blob)])
CreateRow = tuple[str, dict[str, str], str, list[NodeRow], list[tuple[str, bytes]]]


def _create_argv_nodes(nodes: Sequence[tuple[str, NodeRecord, bytes]],
                       blobs: Sequence[tuple[str, bytes]] = ()) -> list[Any]:
    argv: list[Any] = [len(nodes)]
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    for nid, rec, blob in nodes:
        argv += [nid, dumps(compact(rec)), blob]
    argv.append(len(blobs))
    for field, blob in blobs:
        argv += [field, blob]
    return argv


def _create_argv(meta: dict[str, str], digest: str,
                 nodes: Sequence[tuple[str, NodeRecord, bytes]],
                 blobs: Sequence[tuple[str, bytes]] = ()) -> list[Any]:
    return [json.dumps(meta), digest, *_create_argv_nodes(nodes, blobs)]


class Transitions(Connection):
    """Every write of a flow's state goes through one of these methods."""

    @property
    def want_paths(self) -> str:
        """Ask claim.lua for longest paths when any shared limit may hold nodes."""
        return "1" if self.config.rate_limits or self.config.queue_limits else ""

    def _claim_args(self, lease: float, limit: int) -> list[Any]:
        return [lease, limit, self.want_paths]

    # -- create -------------------------------------------------------------------------

    def create(self, row: CreateRow, claim: tuple[float, int] | None = None
               ) -> Marked[int]:
        """Index the flow, mark it dirty, create it (create.lua: 1 created, 0 exists
        with the same digest, -3 another definition) and, given ``(lease, limit)``,
        claim its roots, in one round trip; on a single Redis the first three are one
        script call."""
        fid, meta, digest, nodes, blobs = row
        token = new_dirty_token(fid)
        argv = _create_argv(meta, digest, nodes, blobs)
        now = self.now() if self.config.redis_cluster else 0.0

        single = not self.config.redis_cluster

        def build(pipe: Any) -> None:
            if single:
                # one command fewer each: create.lua writes both (same Redis TIME)
                keys = [*self.keys.flow(fid), self.keys.index, self.keys.dispatch]
                keys.append(self.keys.request(keys[0], pipe.request_id()))
                pipe.evalsha(self.sha("create"), len(keys), *keys, *argv, fid, token)
            else:
                pipe.zadd(self.keys.index, {fid: now}, nx=True)
                pipe.zadd(self.keys.dispatch, {token: now})
                self._queue(pipe, "create", fid, argv)
            if claim is not None:
                self._queue(pipe, "claim", fid, self._claim_args(*claim))

        out = self._execute(build)[0 if single else 2:]
        return Marked(token, int(out[0]), Claim.of(out[1]) if claim is not None else None)

    def create_many(self, rows: list[CreateRow]) -> list[int]:
        """Create several flows (create.lua codes): in one MULTI/EXEC on a single
        Redis, one by one on a cluster. add_bulk creates them hidden, so a reader sees
        none of them either way until their batch is committed."""
        if not rows:
            return []
        script = self._scripts["create"]
        if self.config.redis_cluster:
            codes = []
            for fid, meta, digest, nodes, blobs in rows:
                codes.append(int(script(keys=self._flow_keys(fid, new_request_id()),
                                        args=_create_argv(meta, digest, nodes, blobs))))
                faults.point("bulk-created")
            return codes
        pipe = self.client.pipeline(transaction=True)
        for fid, meta, digest, nodes, blobs in rows:
            script(keys=self._flow_keys(fid, new_request_id()),
                   args=_create_argv(meta, digest, nodes, blobs), client=pipe)
        codes = [int(c) for c in pipe.execute()]
        for _ in codes:
            faults.point("bulk-created")
        return codes

    def create_parts(self, fid: str, batch_id: str,
                     parts: Sequence[Sequence[NodeRow]]) -> list[int]:
        """Store further pieces of a flow create.lua began hidden by ``batch_id``
        (create_part.lua: 1 stored | -5 no longer hidden by it), pipelined: each call is
        bounded, and other clients' commands run between them."""
        def build(pipe: Any) -> None:
            for nodes in parts:
                self._queue(pipe, "create_part", fid, [batch_id, *_create_argv_nodes(nodes)])

        return [int(c) for c in self._execute(build)]

    def unhide(self, fid: str, batch_id: str) -> int:
        """unhide.lua: 1 un-hidden | 0 not hidden | -5 another batch's | -1 gone."""
        return int(self._run("unhide", fid, [batch_id]))

    def unhide_many(self, batch_id: str, fids: Sequence[str],
                    claim: tuple[float, int] | None) -> list[Marked[int]]:
        """For each flow of a committed batch: mark it dirty, un-hide it (unhide.lua
        codes), index it and, given ``(lease, limit)``, claim its roots; pipelined, so
        that round trips grow with the batch's size in chunks, not with its flows."""
        out: list[Marked[int]] = []
        for i in range(0, len(fids), 500):
            out += self._unhide_chunk(batch_id, fids[i:i + 500], claim)
        return out

    def _unhide_chunk(self, batch_id: str, fids: Sequence[str],
                      claim: tuple[float, int] | None) -> list[Marked[int]]:
        tokens = [new_dirty_token(fid) for fid in fids]
        now = self.now()

        def build(pipe: Any) -> None:
            for fid, token in zip(fids, tokens, strict=True):
                pipe.zadd(self.keys.dispatch, {token: now})
                self._queue(pipe, "unhide", fid, [batch_id])
                pipe.zadd(self.keys.index, {fid: now}, nx=True)
                if claim is not None:
                    self._queue(pipe, "claim", fid, self._claim_args(*claim))

        res = self._execute(build)
        step = 4 if claim is not None else 3
        return [Marked(token, int(res[j * step + 1]),
                       Claim.of(res[j * step + 3]) if claim is not None else None)
                for j, token in enumerate(tokens)]

    def discard(self, fid: str, batch_id: str) -> int:
        """discard.lua: 1 the hidden flow of this batch deleted | 0 left alone."""
        return int(self._run("discard", fid, [batch_id]))

    # -- claim and publish --------------------------------------------------------------

    def claim(self, fid: str, lease: float, limit: int, node_ids: Sequence[str] = (),
              eager: bool = False) -> Claim:
        """``eager``: the eager driver's claim, the only one an eager flow accepts."""
        paths = "eager" if eager else self.want_paths
        return Claim.of(self._run("claim", fid, [lease, limit, paths, *node_ids]))

    def mark_and_claim(self, fid: str, lease: float, node_ids: Sequence[str]) -> Marked[None]:
        """Mark the flow dirty and claim the given outbox entries in one round trip."""
        token = new_dirty_token(fid)

        def build(pipe: Any) -> None:
            pipe.zadd(self.keys.dispatch, {token: self.now()})
            self._queue(pipe, "claim", fid, [lease, len(node_ids), self.want_paths, *node_ids])

        return Marked(token, None, Claim.of(self._execute(build)[1]))

    def published(self, fid: str, items: Sequence[Published], clear_token: str | None = None,
                  track: bool = True) -> None:
        """Acknowledge published nodes, track their messages until a worker starts them
        (see the rescue of stranded messages) and clear a dirty marker, in one round
        trip."""
        argv: list[Any] = []
        for item in items:
            released = "" if item.released_at is None else repr(item.released_at)
            argv += [item.node_id, item.attempt, item.queue, released, item.task_id]
        now = self.now()

        def build(pipe: Any) -> None:
            if argv:
                self._queue(pipe, "published", fid, argv)
                if track:
                    pipe.zadd(self.keys.queued, {item.task_id: now for item in items})
            if clear_token is not None:
                pipe.zrem(self.keys.dispatch, clear_token)

        if argv or clear_token is not None:
            self._execute(build)

    def hold(self, fid: str, nid: str, attempt: int, member: str, limiter_id: str,
             wait: float) -> int:
        """hold.lua: keep a node its limiter refused out of the outbox (1 held)."""
        return int(self._run("hold", fid, [nid, attempt, member, limiter_id, wait]))

    def requeue(self, fid: str, nid: str, attempt: int) -> int:
        """requeue.lua: put a published node whose message was lost back in the
        outbox, same attempt (1 requeued | 0 it moved on)."""
        return int(self._run("requeue", fid, [nid, attempt]))

    def admit(self, keys: list[str], args: list[Any]) -> Admission:
        """admit.lua over the limiters' keys (built by the limits of the engine)."""
        out = self._run_global("admit", keys, args)
        if int(out[0]) == 1:
            return Admission(True, float(out[1]), 0.0, "")
        return Admission(False, 0.0, float(out[1]), text(out[2]))

    # -- attempts -----------------------------------------------------------------------

    def start(self, fid: str, nid: str, attempt: int, start_key: str, task_id: str,
              worker: str, instance: str = "") -> Started:
        def build(pipe: Any) -> None:
            self._queue(pipe, "start", fid, [nid, attempt, start_key, task_id, worker, instance])
            pipe.zrem(self.keys.queued, task_id)

        out = self._execute(build)[0]
        code = int(out[0])
        if code != 1:
            return Started(code, {}, None)
        overlay = self.codec.load_context(out[2])
        return Started(code, self.codec.load_context(out[1]), overlay or None)

    def handoff(self, fid: str, nid: str, attempt: int, instance: str) -> int:
        """handoff.lua: a replaced attempt leaves its lease to the replacement."""
        return int(self._run("handoff", fid, [nid, attempt, instance]))

    def progress(self, fid: str, nid: str, attempt: int, pct: float | None, msg: str) -> int:
        return int(self._run("progress", fid, [nid, attempt, "" if pct is None else pct, msg]))

    def _complete_args(self, nid: str, attempt: int, outcome: str, result: bytes, error: str,
                       external: bool, delay: Any, falsy: bool) -> list[Any]:
        return [nid, attempt, outcome, result, error, "1" if external else "", delay,
                "0" if falsy else ""]

    def complete(self, fid: str, nid: str, attempt: int, outcome: str,
                 result: bytes = b"", error: str = "", retry_delay: float | None = None,
                 external: bool = False, falsy: bool = False) -> Completion:
        """Record an outcome. A retry held in Redis (``retry_delay``) also sets a timer
        for the releaser, in the same round trip."""
        delay: Any = "" if retry_delay is None else max(float(retry_delay), 0.0)
        now = self.now() if delay != "" else 0.0

        def build(pipe: Any) -> None:
            self._queue(pipe, "complete", fid, self._complete_args(
                nid, attempt, outcome, result, error, external, delay, falsy))
            if delay != "":
                pipe.zadd(self.keys.timers, {fid: now + float(delay)}, lt=True)

        return Completion.of(self._execute(build)[0])

    def complete_and_claim(self, fid: str, nid: str, attempt: int, outcome: str,
                           result: bytes, error: str, lease: float, limit: int,
                           external: bool = False, drop_lease: tuple[str, str] | None = None,
                           falsy: bool = False) -> Marked[Completion]:
        """Mark the flow dirty, record the outcome, claim what it made ready and drop
        the recording worker's lease, in one round trip (in this order on the server)."""
        token = new_dirty_token(fid)

        def build(pipe: Any) -> None:
            pipe.zadd(self.keys.dispatch, {token: self.now()})
            self._queue(pipe, "complete", fid, self._complete_args(
                nid, attempt, outcome, result, error, external, "", falsy))
            self._queue(pipe, "claim", fid, self._claim_args(lease, limit))
            if drop_lease is not None:
                pipe.zrem(self.keys.leases(drop_lease[0]), drop_lease[1])

        out = self._execute(build)
        return Marked(token, Completion.of(out[1]), Claim.of(out[2]))

    def recover_and_claim(self, fid: str, nid: str, attempt: int, max_recoveries: int,
                          error: str, lost_instance: str, lease: float, limit: int
                          ) -> Marked[Recovery]:
        token = new_dirty_token(fid)

        def build(pipe: Any) -> None:
            pipe.zadd(self.keys.dispatch, {token: self.now()})
            self._queue(pipe, "recover", fid,
                        [nid, attempt, max_recoveries, error, lost_instance])
            self._queue(pipe, "claim", fid, self._claim_args(lease, limit))

        _z, done, claim = self._execute(build)
        return Marked(token, Recovery.of(done), Claim.of(claim))

    # -- changes (SPEC section 6) -------------------------------------------------------

    def _change(self, name: str, fid: str, args: Sequence[Any], dry_run: bool,
                claim: tuple[float, int] | None) -> Marked[Change]:
        """Unless ``dry_run``, the flow is marked dirty first and (given ``(lease,
        limit)``) claimed after, in the same round trip; a dry run keeps nothing, not
        even its reply, and has no token (``""``)."""
        argv = [*args, "1" if dry_run else ""]
        if dry_run:
            return Marked("", Change.of(self._run(name, fid, argv, dry_run=True)), None)
        token = new_dirty_token(fid)

        def build(pipe: Any) -> None:
            pipe.zadd(self.keys.dispatch, {token: self.now()})
            self._queue(pipe, name, fid, argv)
            if claim is not None:
                self._queue(pipe, "claim", fid, self._claim_args(*claim))

        res = self._execute(build)
        return Marked(token, Change.of(res[1]), Claim.of(res[2]) if claim is not None else None)

    def cancel(self, fid: str, dry_run: bool = False) -> Marked[Change]:
        """cancel.lua; ``extra[0]``: JSON list of the task ids of started nodes."""
        return self._change("cancel", fid, [], dry_run, None)

    def pause(self, fid: str, dry_run: bool = False) -> Marked[Change]:
        return self._change("pause", fid, ["pause"], dry_run, None)

    def resume(self, fid: str, claim: tuple[float, int] | None, dry_run: bool = False
               ) -> Marked[Change]:
        return self._change("pause", fid, ["resume"], dry_run, claim)

    def retry(self, fid: str, claim: tuple[float, int] | None, dry_run: bool = False
              ) -> Marked[Change]:
        return self._change("retry", fid, [], dry_run, claim)

    def remove_dependency(self, fid: str, nid: str, dep_id: str,
                          claim: tuple[float, int] | None, dry_run: bool = False
                          ) -> Marked[Change]:
        return self._change("remove_dependency", fid, [nid, dep_id], dry_run, claim)

    def ignore_failure(self, fid: str, nid: str, claim: tuple[float, int] | None,
                       dry_run: bool = False) -> Marked[Change]:
        return self._change("ignore_failure", fid, [nid], dry_run, claim)

    def add_node(self, fid: str, nid: str, rec: NodeRecord, call: bytes, max_nodes: int,
                 claim: tuple[float, int] | None, dry_run: bool = False) -> Marked[Change]:
        return self._change("add_node", fid, [nid, json.dumps(rec), call, max_nodes],
                            dry_run, claim)

    # -- global scripts -----------------------------------------------------------------

    def heartbeat(self, instance: str, info: dict[str, Any]) -> float:
        """heartbeat.lua: the worker instance is alive (returns the Redis time used)."""
        keys = [self.keys.workers, self.keys.worker_info]
        return float(text(self._run_global("heartbeat", keys, [instance, json.dumps(info)])))

    def batch_open(self, batch_id: str, fids: list[str]) -> None:
        # the record first: the sweeper finds a batch by its index entry and then
        # needs the record to know its flows
        self._run_global("batch", [self.keys.batch(batch_id)], ["open", json.dumps(fids)])
        self.client.zadd(self.keys.batches, {batch_id: self.now()})

    def batch_decide(self, batch_id: str, op: str, grace: float = 0.0) -> str:
        """'commit', 'abort' or 'expire' a pending batch; returns its state after."""
        return text(self._run_global("batch", [self.keys.batch(batch_id)], [op, grace]))
