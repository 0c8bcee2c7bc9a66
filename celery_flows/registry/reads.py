"""The registry's read side: flow meta, node records, results, the index, and the
"done" notification a waiting producer listens to."""

from __future__ import annotations

import functools
import json
import threading
from typing import Any, cast

from ..define.records import (
    ITEM_RE,
    NodeRecord,
    item_ids,
    item_record,
    shown_state,
    with_defaults,
)
from ..define.states import TERMINAL_NODE_STATES, NodeState
from .codes import NOT_FOUND, VERSION, raise_for
from .connection import Connection
from .keys import FORMAT_MAJOR
from .listen import DoneListener, kept_listener
from .replies import text

__all__ = ["INDEX_GRACE", "DoneListener", "Reads"]  # DoneListener: listen.py

INDEX_GRACE = 30.0  # an index entry this young may belong to a flow being created
#: Results read by one command (HMGET, HSCAN): 500 small results take Redis well under
#: a millisecond, where one HMGET of a 20,000-wide fan-in's results took several.
RESULTS_PAGE = 500

_TERMINAL = frozenset(state.value for state in TERMINAL_NODE_STATES)


def _as_cancelled(rec: NodeRecord, reason: str) -> None:
    """A node a chunked cancel (or fail_fast's) has not written yet is cancelled all the
    same (the flow was, at once: lua/cancel.lua): readers see what the last step will
    write."""
    if rec["state"] not in _TERMINAL:
        fields = cast(dict[str, Any], rec)
        fields["prev_state"] = rec["state"]
        fields["state"] = NodeState.CANCELLED.value
        fields["cancel_reason"] = reason


def _as_reopened(rec: NodeRecord) -> None:
    """A node a chunked retry has not reopened yet is pending all the same (the retry
    took effect at once: lua/retry.lua 'commit'): readers see what its step will write."""
    if rec["state"] in _TERMINAL:
        fields = cast(dict[str, Any], rec)
        fields["state"] = NodeState.PENDING.value
        for name in ("skip_reason", "cancel_reason", "error"):
            fields[name] = None


def _b(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class Reads(Connection):
    def meta(self, fid: str) -> dict[str, str] | None:
        return self._meta_of(self.client.hgetall(self.keys.meta(fid)))

    def _meta_of(self, raw: dict[Any, Any]) -> dict[str, str] | None:
        if not raw:
            return None
        meta = {text(k): text(v) for k, v in raw.items()}
        # a flow of an add_bulk batch exists for readers once its batch is committed
        if "hidden" in meta and self.batch_record(meta["hidden"])[0] != "committed":
            return None
        return meta

    def digests(self, fids: list[str]) -> list[tuple[str | None, str | None]]:
        """Each flow's (definition digest, hiding batch), None where absent, in one
        round trip per thousand flows."""
        out: list[tuple[str | None, str | None]] = []
        for i in range(0, len(fids), 1000):
            pipe = self.client.pipeline(transaction=False)
            for fid in fids[i:i + 1000]:
                pipe.hmget(self.keys.meta(fid), ["digest", "hidden"])
            out += [(text(d) if d else None, text(h) if h else None)
                    for d, h in pipe.execute()]
        return out

    def require_meta(self, fid: str) -> dict[str, str]:
        """The flow's meta; FlowNotFoundError, or the version error of a flow stored by
        an incompatible version."""
        return self._required(fid, self.meta(fid))

    def _required(self, fid: str, meta: dict[str, str] | None) -> dict[str, str]:
        """:meth:`require_meta` of a meta read already."""
        if meta is None:
            raise_for(NOT_FOUND, fid)
            raise AssertionError  # unreachable
        if not meta.get("v", "").startswith(f"{FORMAT_MAJOR}."):
            raise_for(VERSION, fid)
        return meta

    def state_of(self, fid: str) -> str:
        """The flow's state, as :meth:`require_meta` would give it, reading only the
        fields it needs."""
        state, version, hidden = self.client.hmget(self.keys.meta(fid),
                                                   ["state", "v", "hidden"])
        fields = {"state": state, "v": version, **({"hidden": hidden} if hidden else {})}
        meta = self._meta_of({k: v for k, v in fields.items() if v is not None})
        return self._required(fid, meta)["state"]

    def _reopening(self, fid: str, nid: str | None = None) -> set[str]:
        """Read before the records: the nodes a chunked retry has not reopened yet (they
        read as pending; a node reopened meanwhile is read as it is)."""
        if self.client.hget(self.keys.meta(fid), "reopen_set") is None:
            return set()
        key = self.keys.reopen(fid)
        if nid is not None:
            return {nid} if self.client.sismember(key, nid) else set()
        return {text(m) for m in self.client.smembers(key)}

    #: the meta fields :meth:`_cancelling` reads
    _CANCEL_FIELDS = ("state", "cancel_cursor", "cancel_reason")

    def _cancelling(self, fid: str, fields: list[Any] | None = None) -> str | None:
        """Read after the records: a flow cancelled by then (or stopped by fail_fast)
        shows them all cancelled, whether a chunked cancel is still writing them or not;
        the reason they show, else None. ``fields``: the meta's _CANCEL_FIELDS as read
        after the records already."""
        if fields is None:
            fields = self.client.hmget(self.keys.meta(fid), self._CANCEL_FIELDS)
        state, cursor, reason = fields
        if cursor is not None:
            return text(reason) if reason else "cancelled"
        if state is not None and text(state) == "cancelled":
            return "cancelled"
        return None

    def _overlay(self, fid: str, recs: dict[str, NodeRecord], staged: set[str],
                 cancel: list[Any] | None = None) -> None:
        for rec in recs.values():
            if rec.get("kind") == "map":
                rec["state"] = shown_state(rec)
        for nid in staged:
            if nid in recs:
                _as_reopened(recs[nid])
        reason = self._cancelling(fid, cancel) if recs else None
        if reason is not None:
            for rec in recs.values():
                _as_cancelled(rec, reason)

    def nodes(self, fid: str) -> dict[str, NodeRecord]:
        staged = self._reopening(fid)
        out = self._records(self.client.hgetall(self.keys.nodes(fid)))
        self._overlay(fid, out, staged)
        return out

    def outcomes(self, fid: str) -> tuple[dict[str, NodeRecord], dict[str, bytes]]:
        """The flow's node records as :meth:`nodes` reads them and its stored results
        (FlowNotFoundError, as :meth:`require_meta`), in one round trip for a flow
        whose results fit a page: the reads :meth:`nodes` makes before and after the
        records go in the same pipeline, in the same order."""
        keys = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(keys.meta(fid))
        pipe.smembers(keys.reopen(fid))  # used only while a chunked retry reopens
        pipe.hgetall(keys.nodes(fid))
        pipe.hmget(keys.meta(fid), self._CANCEL_FIELDS)
        pipe.hscan(keys.results(fid), 0, count=RESULTS_PAGE)
        raw_meta, reopening, raw_nodes, cancel, (cursor, page) = pipe.execute()
        meta = self._required(fid, self._meta_of(raw_meta))
        staged = {text(m) for m in reopening} if "reopen_set" in meta else set()
        recs = self._records(raw_nodes)
        self._overlay(fid, recs, staged, cancel)
        results = {text(k): _b(v) for k, v in cast(dict[Any, Any], page).items()}
        if int(cursor):
            results = self.results(fid)  # a wide flow: page by page
        return recs, results

    def _records(self, raw: dict[Any, Any]) -> dict[str, NodeRecord]:
        """Stored records decoded, in flow order, a map's items after it."""
        stored = {text(k): with_defaults(json.loads(v)) for k, v in raw.items()}
        decoded = sorted(((rec, nid) for nid, rec in stored.items() if "of" not in rec),
                         key=lambda item: (item[0].get("seq", 0), item[1]))
        out: dict[str, NodeRecord] = {}
        for rec, nid in decoded:
            out[nid] = rec
            # a map's items follow it, those not written yet made from it
            for i, iid in enumerate(item_ids(nid, rec)):
                out[iid] = stored.get(iid) or item_record(rec, nid, i)
        return out

    def node(self, fid: str, nid: str) -> NodeRecord | None:
        staged = self._reopening(fid, nid)
        raw = self.client.hget(self.keys.nodes(fid), nid)
        rec = with_defaults(json.loads(raw)) if raw else self._unwritten_item(fid, nid)
        if rec is None:
            return None
        recs = {nid: rec}
        self._overlay(fid, recs, staged)
        return recs[nid]

    def _unwritten_item(self, fid: str, nid: str) -> NodeRecord | None:
        """An item of an expanded map not written yet, as it reads (records.py)."""
        m = ITEM_RE.match(nid)
        raw = self.client.hget(self.keys.nodes(fid), m.group(1)) if m else None
        if m is None or not raw:
            return None
        owner = with_defaults(json.loads(raw))
        i = int(m.group(2))
        if owner.get("kind") != "map" or owner.get("k") is None or i >= int(owner["k"]):
            return None
        return item_record(owner, m.group(1), i)

    def scan_nodes(self, fid: str, cursor: int = 0, count: int = 100
                   ) -> tuple[int, dict[str, NodeRecord]]:
        """One HSCAN page of the node records, as stored (no reader's overlay): for the
        staging of a chunked retry (engine/chunks.py)."""
        cursor, raw = self.client.hscan(self.keys.nodes(fid), cursor, count=count)
        pairs = cast(dict[Any, Any], raw)
        return int(cursor), {text(k): with_defaults(json.loads(v)) for k, v in pairs.items()}

    def results(self, fid: str, ids: list[str] | None = None) -> dict[str, bytes]:
        """The stored results of these nodes (of every node that has one without
        ``ids``), still serialised. Read a page of RESULTS_PAGE at a time, in one round
        trip, so that no single command blocks Redis for as long as a flow is wide."""
        key = self.keys.results(fid)
        if ids is None:
            out: dict[str, bytes] = {}
            for k, v in self.client.hscan_iter(key, count=RESULTS_PAGE):
                out[text(k)] = _b(v)
            return out
        if not ids:
            return {}
        pages = [ids[i:i + RESULTS_PAGE] for i in range(0, len(ids), RESULTS_PAGE)]
        if len(pages) == 1:
            values: list[Any] = list(self.client.hmget(key, ids))
        else:
            with self.client.pipeline(transaction=False) as pipe:
                for page in pages:
                    pipe.hmget(key, page)
                values = [v for page_values in pipe.execute() for v in page_values]
        return {i: _b(v) for i, v in zip(ids, values, strict=True) if v is not None}

    def node_call_blobs(self, fid: str, ids: list[str]) -> dict[str, bytes | None]:
        """The stored calls (args, kwargs, options) of these nodes, still serialised."""
        if not ids:
            return {}
        blobs: list[Any] = list(self.client.hmget(self.keys.args(fid), ids))
        return dict(zip(ids, blobs, strict=True))

    def first_timed(self, fid: str) -> str | None:
        """The node whose timed entry is due first (a poke, a retry, a deadline)."""
        first = self.client.zrange(self.keys.flow(fid)[5], 0, 0)
        return text(first[0]) if first else None

    def listen_done(self, fid: str) -> DoneListener:
        channel = self.keys.channel(fid)
        if self.config.redis_cluster:
            return DoneListener(self.client, channel)
        return kept_listener(self._kept_pubsub, self.client, channel)

    @functools.cached_property
    def _kept_pubsub(self) -> threading.local:
        """Each thread's pub/sub connection kept between waits (listen.py)."""
        return threading.local()

    # -- add_bulk batch records ---------------------------------------------------------

    def batch_record(self, batch_id: str) -> tuple[str, list[str]]:
        raw = self.client.hmget(self.keys.batch(batch_id), ["state", "flows"])
        return (text(raw[0]) if raw[0] else "", json.loads(raw[1]) if raw[1] else [])

    def batch_age(self, batch_id: str) -> float:
        created = self.client.hget(self.keys.batch(batch_id), "created")
        return self.time() - float(created) if created else float("inf")

    def batch_ids(self, limit: int = 100) -> list[str]:
        return [text(m) for m in self.client.zrange(self.keys.batches, 0, limit - 1)]

    def batch_forget(self, batch_id: str) -> None:
        self.client.zrem(self.keys.batches, batch_id)
        self.client.delete(self.keys.batch(batch_id))

    def hidden_by(self, fid: str) -> str | None:
        """The batch a stored flow is hidden by, if any (whatever that batch's state)."""
        raw = self.client.hget(self.keys.meta(fid), "hidden")
        return text(raw) if raw else None

    # -- the index ----------------------------------------------------------------------

    def index_add(self, fid: str, created: float) -> None:
        self.client.zadd(self.keys.index, {fid: created}, nx=True)

    def flow_ids(self, limit: int = 1000, start: int = 0) -> list[str]:
        """Flow ids of the index, newest first: ``limit`` of them from rank ``start``
        (always a bounded read: the index may hold millions)."""
        if limit < 1:
            return []
        return [text(m) for m in self.client.zrevrange(self.keys.index, start,
                                                       start + limit - 1)]

    def flow_states(self, ids: list[str]) -> list[str | None]:
        """Each flow's state (None once expired), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for fid in ids:
            pipe.hget(self.keys.meta(fid), "state")
        return [None if s is None else text(s) for s in (pipe.execute() if ids else [])]

    def flow_summaries(self, start: int, count: int
                       ) -> tuple[list[tuple[str, dict[str, str] | None]], bool]:
        """One page of the index, newest first, with each flow's name, state and
        counters (None once expired), and whether the index goes on past it."""
        ids = self.flow_ids(count, start)
        fields = ("name", "state", "done", "total", "created_at", "finished_at")
        pipe = self.client.pipeline(transaction=False)
        for fid in ids:
            pipe.hmget(self.keys.meta(fid), fields)
        out: list[tuple[str, dict[str, str] | None]] = []
        for fid, values in zip(ids, pipe.execute() if ids else [], strict=True):
            if values is None or values[1] is None:
                out.append((fid, None))
            else:
                out.append((fid, {k: text(v) for k, v in zip(fields, values, strict=True)
                                  if v is not None}))
        return out, len(ids) == count

    def prune_index(self, cursor: int = 0, chunk: int = 200) -> tuple[int, int]:
        """Drop index entries of expired flows, ``chunk`` entries at a time, oldest
        first; returns (entries removed, cursor for the next call; 0 = start over).
        Entries younger than INDEX_GRACE are left: their flow may still be being
        created (the index is written just before the flow)."""
        index = self.keys.index
        raw: list[Any] = list(self.client.zrange(index, cursor, cursor + chunk - 1,
                                                 withscores=True))
        if not raw:
            return 0, 0
        old_enough = self.now() - INDEX_GRACE
        ids = [text(m) for m, score in raw if float(score) < old_enough]
        pipe = self.client.pipeline(transaction=False)
        for fid in ids:
            pipe.exists(self.keys.meta(fid))
        gone = [fid for fid, n in zip(ids, pipe.execute() if ids else [], strict=True)
                if not n]
        if gone:
            self.client.zrem(index, *gone)
        if len(raw) < chunk or len(ids) < len(raw):
            return len(gone), 0  # the end, or the young entries: start over
        return len(gone), cursor + chunk - len(gone)
