"""The flow transitions: one method per Lua script of ``lua/`` (and ``lua/global/``),
each returning a typed reply (replies.py). Several are sent together with the dirty
marker and the claim that follow them, in one round trip."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..define.records import NodeRecord
from . import scripts
from .connection import Connection
from .ids import new_dirty_token
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

__all__ = ["BackendWrite", "Transitions"]

#: A node's Celery result as the Redis result backend stores it (worker/results.py):
#: its key, the encoded value, and the expiry in seconds (None: kept)
BackendWrite = tuple[str, Any, "int | None"]

#: The most nodes one published.lua call acknowledges (about 50 us of Redis time each)
ACK_STEP = 2 * scripts.CHUNK


class Transitions(Connection):
    """Every write of a flow's state goes through one of these methods."""

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
        trip. ``track`` False: the eager driver's nodes, never in a broker."""
        self.published_many([(fid, items, [clear_token] if clear_token else [])], track)

    def published_many(self, acks: Sequence[tuple[str, Sequence[Published], Sequence[str]]],
                       track: bool = True) -> None:
        """:meth:`published` for several flows, each with its dirty markers, in one round
        trip: one script per flow on a single Redis."""
        now = self.now()
        inline = self.inline and track

        def build(pipe: Any) -> None:
            for fid, items, tokens in acks:
                # a script acknowledges at most ACK_STEP nodes (its cost grows with them:
                # a worker's acknowledgements of a wide release wait together, acks.py);
                # the markers go with the last step, once every node is acknowledged
                steps = [items[i:i + ACK_STEP] for i in range(0, len(items), ACK_STEP)]
                for n, step in enumerate(steps):
                    last = n == len(steps) - 1
                    argv: list[Any] = []
                    for item in step:
                        released = "" if item.released_at is None else repr(item.released_at)
                        argv += [item.node_id, item.attempt, item.queue, released,
                                 item.task_id, item.retries]
                    if inline:
                        marks = list(tokens) if last else []
                        # idempotent: a re-sent acknowledgement changes nothing more
                        self._queue(pipe, "published", fid, [len(marks), *marks, *argv],
                                    [self.keys.queued, self.keys.dispatch], keep_reply=False)
                        continue
                    self._queue(pipe, "published", fid, [0, *argv], keep_reply=False)
                    if track:
                        pipe.zadd(self.keys.queued, {item.task_id: now for item in step})
                if tokens and (not inline or not steps):
                    pipe.zrem(self.keys.dispatch, *tokens)

        if any(items or tokens for _fid, items, tokens in acks):
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
        """start.lua; the message leaves the queued index and, on a single Redis, joins
        the instance's leases if it may run (on a cluster it was leased on receipt)."""
        args = [nid, attempt, start_key, task_id, worker, instance]
        gkeys = [self.keys.queued, *([self.keys.leases(instance)] if instance else [])]

        def build(pipe: Any) -> None:
            if self.inline:
                self._queue(pipe, "start", fid, args, gkeys)
                return
            self._queue(pipe, "start", fid, args)
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
                 external: bool = False, falsy: bool = False, expansions: str = ""
                 ) -> Completion:
        """Record an outcome. A retry held in Redis (``retry_delay``) also sets a timer
        for the releaser, in the same round trip. ``expansions``: how the maps over
        this node expand (complete.lua ARGV[14])."""
        delay: Any = "" if retry_delay is None else max(float(retry_delay), 0.0)
        now = self.now() if delay != "" else 0.0
        args = self._complete_args(nid, attempt, outcome, result, error, external, delay, falsy)
        if expansions:
            args += ["", "", "", "", "", expansions]

        def build(pipe: Any) -> None:
            self._queue(pipe, "complete", fid, args)
            if delay != "":
                pipe.zadd(self.keys.timers, {fid: now + float(delay)}, lt=True)

        return Completion.of(self._execute(build)[0])

    def complete_and_claim(self, fid: str, nid: str, attempt: int, outcome: str,
                           result: bytes, error: str, lease: float, limit: int,
                           external: bool = False, drop_lease: tuple[str, str] | None = None,
                           falsy: bool = False, expansions: str = "",
                           backend: BackendWrite | None = None) -> Marked[Completion]:
        """Record the outcome, claim what it made ready behind a dirty marker and drop
        the recording worker's lease: one script on a single Redis (the marker is
        written only when there is something to publish; ``token`` is "" otherwise),
        one round trip of four commands on a cluster. ``backend``: the node's Celery
        result, written by the same script (a single Redis only; worker/results.py)."""
        token = new_dirty_token(fid)
        args = self._complete_args(nid, attempt, outcome, result, error, external, "", falsy)
        claim_args = self._claim_args(lease, limit)
        if self.inline:
            gkeys = [self.keys.dispatch]
            if drop_lease is not None:
                gkeys.append(self.keys.leases(drop_lease[0]))
            stored: list[Any] = []
            if backend is not None:
                gkeys.append(backend[0])
                stored = [backend[1], "" if backend[2] is None else backend[2]]
            out = self._execute(lambda pipe: self._queue(
                pipe, "complete", fid,
                [*args, *claim_args, token, drop_lease[1] if drop_lease else "", expansions,
                 *stored],
                gkeys))[0]
            return Marked(token if text(out[4]) == "1" else "", Completion.of(out),
                          Claim.of(out[5]) if out[5] else None)

        if expansions:
            args += ["", "", "", "", "", expansions]

        def build(pipe: Any) -> None:
            pipe.zadd(self.keys.dispatch, {token: self.now()})
            self._queue(pipe, "complete", fid, args)
            self._queue(pipe, "claim", fid, claim_args)
            if drop_lease is not None:
                pipe.zrem(self.keys.leases(drop_lease[0]), drop_lease[1])

        out = self._execute(build)
        return Marked(token, Completion.of(out[1]), Claim.of(out[2]))

    def stage_items(self, fid: str, token: str, blobs: Sequence[bytes]) -> None:
        """Write a map's elements where its items read them (args hash fields
        ``@<token>:<i>``), in bounded commands, before the expansion that names the
        token: until then nothing refers to them."""
        key = self.keys.args(fid)
        piece = 500

        def build(pipe: Any) -> None:
            for start in range(0, len(blobs), piece):
                pipe.hset(key, mapping={f"@{token}:{start + i}": b
                                        for i, b in enumerate(blobs[start:start + piece])})

        if blobs:
            self._execute(build)

    def expand(self, fid: str, nid: str, attempt: int, expansion: str) -> int:
        """expand.lua: a map the dispatcher claimed unexpanded expands (1), or had moved
        on (0)."""
        return int(self._run("expand", fid, [nid, attempt, expansion])[0])

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
        """cancel.lua; ``extra[0]``: JSON list of the task ids of started nodes,
        ``extra[1]``: "1" when :meth:`cancel_step` is to write the nodes. The flow enters
        the cancelling index first, so that the sweeper finishes a chunked cancel whose
        caller died (:meth:`cancel_done` takes it out)."""
        if not dry_run:
            self.client.zadd(self.keys.cancelling, {fid: self.now()}, nx=True)
        return self._change("cancel", fid, [scripts.CHUNK], dry_run, None)

    def cancel_step(self, fid: str, cursor: str = "0", dry_run: bool = False) -> Change:
        """cancel_step.lua, one bounded step; ``extra``: started task ids JSON, the next
        cursor ("" when done). ``cursor`` is a dry run's own."""
        argv = [scripts.CHUNK, cursor, "1" if dry_run else ""]
        return Change.of(self._run("cancel_step", fid, argv, dry_run=dry_run))

    def cancel_done(self, fid: str) -> None:
        self.client.zrem(self.keys.cancelling, fid)

    def stale_cancels(self, older_than: float, limit: int = 50) -> list[str]:
        raw = self.client.zrangebyscore(self.keys.cancelling, "-inf",
                                        self.now() - older_than, start=0, num=limit)
        return [text(m) for m in raw]

    def pause(self, fid: str, dry_run: bool = False) -> Marked[Change]:
        return self._change("pause", fid, ["pause"], dry_run, None)

    def resume(self, fid: str, claim: tuple[float, int] | None, dry_run: bool = False
               ) -> Marked[Change]:
        return self._change("pause", fid, ["resume"], dry_run, claim)

    def retry(self, fid: str, claim: tuple[float, int] | None, dry_run: bool = False
              ) -> Marked[Change]:
        """retry.lua as one script (a flow of at most CHUNK nodes)."""
        return self._change("retry", fid, ["", ""], dry_run, claim)

    def reopen_stage(self, fid: str, ids: Sequence[str], ttl: int = 3600) -> None:
        """Stage a chunked retry's nodes in the flow's reopen set (hidden until
        :meth:`retry_commit`; it expires if the stager dies), a bounded command each."""
        key = self.keys.reopen(fid)

        def build(pipe: Any) -> None:
            pipe.delete(key)
            for i in range(0, len(ids), 20 * scripts.CHUNK):
                pipe.sadd(key, *ids[i:i + 20 * scripts.CHUNK])
            pipe.expire(key, ttl)

        self._execute(build)

    def retry_commit(self, fid: str, fgen: str, claim: tuple[float, int] | None
                     ) -> Marked[Change]:
        """retry.lua 'commit': the staged nodes read as pending at once; the claims reopen
        them in bounded steps (code 2: the staging went stale, stage again)."""
        return self._change("retry", fid, ["commit", fgen], False, claim)

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
