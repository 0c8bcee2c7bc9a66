"""Storing flows: one flow's create (create.lua), a large flow in pieces
(create_part.lua, written hidden), add_bulk's many flows and their batch (un-hide,
discard, the batch record of lua/global/batch.lua)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .. import faults
from ..define.records import NodeRecord, compact
from .connection import Connection
from .ids import new_dirty_token, new_request_id
from .replies import Claim, Marked, text

__all__ = ["CREATE_TRIP", "CreateRow", "Creation", "NodeRow", "RootMessage"]

#: Flows add_bulk creates in one round trip (pipelined, not a transaction)
CREATE_TRIP = 500

#: (node id, record, call blob)
NodeRow = tuple[str, NodeRecord, bytes]
#: (flow id, meta fields, digest, [node row], [(args field, blob)])
CreateRow = tuple[str, dict[str, str], str, list[NodeRow], list[tuple[str, bytes]]]
#: A root's message for the broker on the registry's Redis, built beforehand
#: (engine/direct.py): node id, attempt, queue name, task id, and the broker's Redis
#: commands that deliver it, each (command, key, value)
RootMessage = tuple[str, int, str, str, list[tuple[str, str, Any]]]


def _direct_argv(messages: Sequence[RootMessage]) -> tuple[list[str], list[Any]]:
    """create.lua's root messages: the broker keys (GKEYS from 4 on) and the arguments."""
    keys: dict[str, int] = {}
    argv: list[Any] = [len(messages)]
    for nid, attempt, queue, task_id, commands in messages:
        argv += [nid, attempt, queue, task_id, len(commands)]
        for name, key, value in commands:
            # a fanout's PUBLISH names a channel, not a key
            argv += [name, key if name == "publish" else keys.setdefault(key, 4 + len(keys)),
                     value]
    return list(keys), argv


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


class Creation(Connection):
    """Every write that brings a flow into the registry."""

    # -- create -------------------------------------------------------------------------

    def create(self, row: CreateRow, claim: tuple[float, int] | None = None,
               messages: Sequence[RootMessage] = ()) -> Marked[int]:
        """Index the flow, mark it dirty, create it (create.lua: 1 created, 2 created
        and every root released was pushed with its message from ``messages`` and
        acknowledged, 0 exists with the same digest, -3 another definition) and, given
        ``(lease, limit)``, claim its roots, in one round trip; on a single Redis the
        first three are one script call (``messages`` only there)."""
        fid, meta, digest, nodes, blobs = row
        token = new_dirty_token(fid)
        argv = _create_argv(meta, digest, nodes, blobs)
        single = self.inline
        now = 0.0 if single else self.now()
        gkeys = [self.keys.index, self.keys.dispatch]
        if messages:
            assert single, "root messages go with create.lua on a single Redis only"
            broker_keys, direct = _direct_argv(messages)
            argv += direct
            gkeys += [self.keys.queued, *broker_keys]

        def build(pipe: Any) -> None:
            if single:
                # two commands fewer: create.lua writes both (same Redis TIME)
                self._queue(pipe, "create", fid, [*argv, fid, token], gkeys)
            else:
                pipe.zadd(self.keys.index, {fid: now}, nx=True)
                pipe.zadd(self.keys.dispatch, {token: now})
                self._queue(pipe, "create", fid, argv)
            if claim is not None:
                self._queue(pipe, "claim", fid, self._claim_args(*claim))

        out = self._execute(build)[0 if single else 2:]
        return Marked(token, int(out[0]), Claim.of(out[1]) if claim is not None else None)

    def create_many(self, rows: list[CreateRow]) -> list[int]:
        """Create several flows (create.lua codes): pipelined, CREATE_TRIP flows a round
        trip, on a single Redis; one by one on a cluster. add_bulk creates them hidden,
        so a reader sees none of them until their batch is committed, and no
        transaction is needed: other clients' commands run between the creates. (One
        MULTI/EXEC of 2,000 five-node flows held every other client: a PING from
        another process waited up to 240 ms, against 5 ms pipelined.)"""
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
        codes = []
        for i in range(0, len(rows), CREATE_TRIP):
            pipe = self.client.pipeline(transaction=False)
            for fid, meta, digest, nodes, blobs in rows[i:i + CREATE_TRIP]:
                script(keys=self._flow_keys(fid, new_request_id()),
                       args=_create_argv(meta, digest, nodes, blobs), client=pipe)
            for code in pipe.execute():
                codes.append(int(code))
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
                    claim: tuple[float, int] | None,
                    messages: Mapping[str, Sequence[RootMessage]] | None = None
                    ) -> list[Marked[int]]:
        """For each flow of a committed batch: mark it dirty, un-hide it (unhide.lua
        codes), index it and, given ``(lease, limit)``, claim its roots; pipelined, so
        that round trips grow with the batch's size in chunks, not with its flows. A
        flow given root ``messages`` (a single Redis only) is one unhide.lua call that
        also pushes them: code 2 when every root went (nothing left to release, no
        marker), else 1 with the marker added and no claim made."""
        out: list[Marked[int]] = []
        for i in range(0, len(fids), 500):
            out += self._unhide_chunk(batch_id, fids[i:i + 500], claim, messages or {})
        return out

    def _unhide_chunk(self, batch_id: str, fids: Sequence[str],
                      claim: tuple[float, int] | None,
                      messages: Mapping[str, Sequence[RootMessage]]) -> list[Marked[int]]:
        tokens = [new_dirty_token(fid) for fid in fids]
        # the markers' score; unhide.lua scores its own from Redis TIME
        now = self.now() if any(not messages.get(fid) for fid in fids) else 0.0
        at: list[tuple[int, bool]] = []  # each flow's unhide reply, and its claim's after

        def build(pipe: Any) -> None:
            at.clear()
            n = 0
            for fid, token in zip(fids, tokens, strict=True):
                direct = messages.get(fid)
                if direct:
                    broker_keys, argv = _direct_argv(direct)
                    self._queue(pipe, "unhide", fid, [batch_id, *argv, fid, token],
                                [self.keys.index, self.keys.dispatch, self.keys.queued,
                                 *broker_keys])
                    at.append((n, False))
                    n += 1
                    continue
                pipe.zadd(self.keys.dispatch, {token: now})
                self._queue(pipe, "unhide", fid, [batch_id])
                pipe.zadd(self.keys.index, {fid: now}, nx=True)
                at.append((n + 1, claim is not None))
                n += 3
                if claim is not None:
                    self._queue(pipe, "claim", fid, self._claim_args(*claim))
                    n += 1

        res = self._execute(build)
        return [Marked(token, int(res[j]), Claim.of(res[j + 2]) if claimed else None)
                for (j, claimed), token in zip(at, tokens, strict=True)]

    def discard(self, fid: str, batch_id: str) -> int:
        """discard.lua: 1 the hidden flow of this batch deleted | 0 left alone."""
        return int(self._run("discard", fid, [batch_id]))

    def batch_open(self, batch_id: str, fids: list[str]) -> None:
        # the record first: the sweeper finds a batch by its index entry and then
        # needs the record to know its flows
        self._run_global("batch", [self.keys.batch(batch_id)], ["open", json.dumps(fids)])
        self.client.zadd(self.keys.batches, {batch_id: self.now()})

    def batch_decide(self, batch_id: str, op: str, grace: float = 0.0) -> str:
        """'commit', 'abort' or 'expire' a pending batch; returns its state after."""
        return text(self._run_global("batch", [self.keys.batch(batch_id)], [op, grace]))
