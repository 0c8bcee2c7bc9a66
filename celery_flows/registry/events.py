"""The read side of the event streams (SPEC section 11; written by the engine's flush(),
lua/engine/cache.lua): a flow's stream, or the registry's stream of every flow.

An entry's one field ``e`` is the event as JSON without its id; the stream id is the
event's ``id``. On a single Redis an event has the same id in both streams. On Redis
Cluster the registry's stream is of another slot than any flow, so no flow script can
write it: the flow's stream is the atomic source of truth, and the ``--flows`` workers
copy each flow's new events into the registry's stream in order (worker/eventcopy.py,
with the methods below). A copied entry has its own id there, and a second field
``src``, its id in the flow's stream: a copier that died mid-copy leaves entries that
the next copies again (at least once), and a reader that remembers the last ``src`` of
each flow drops those (observe/events.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .. import faults
from .connection import Connection
from .replies import text

__all__ = ["EVENT_FIELDS", "Events", "event_id_order", "valid_event_id"]

#: Flows of the index whose ``ev_due`` one repair round reads (Events.repair_event_notes)
REPAIR_CHUNK = 200

#: The fields of an event, in the order they are printed (SPEC section 11)
EVENT_FIELDS = ("id", "time", "flow", "name", "node", "state", "attempt", "error", "progress")
_ID = re.compile(r"^\d+(-\d+)?$")


def valid_event_id(value: str) -> bool:
    """Whether ``value`` is a stream id (``<ms>-<seq>`` or ``<ms>``)."""
    return bool(_ID.match(value))


def event_id_order(value: str) -> tuple[int, int]:
    """A stream id as a sortable pair (``<ms>`` alone is ``<ms>-0``)."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _event(entry_id: Any, fields: dict[Any, Any]) -> dict[str, Any]:
    body = json.loads(fields.get(b"e") or fields.get("e") or "{}")
    event = {name: body.get(name) for name in EVENT_FIELDS}
    event["id"] = text(entry_id)
    src = fields.get(b"src") or fields.get("src")
    if src:
        # a copy (Redis Cluster): its id in the flow's stream, not printed
        event["src"] = text(src)
    return event


class Events(Connection):
    """Reading the event streams; a part of :class:`~celery_flows.registry.Store`."""

    def events_key(self, fid: str | None) -> str:
        """The stream of flow ``fid``, or of every flow."""
        if fid is not None:
            return self.keys.flow_events(fid)
        return self.keys.events

    def read_events(self, fid: str | None, after: str, count: int = 500,
                    block: float | None = None) -> list[dict[str, Any]]:
        """Events after id ``after`` (``"0"``: from the oldest kept), oldest first, at
        most ``count``; ``block`` seconds to wait for one when there is none yet."""
        key = self.events_key(fid)
        ms = None if block is None else max(1, int(block * 1000))
        reply: Any = self.client.xread({key: after}, count=count, block=ms)
        out: list[dict[str, Any]] = []
        for _stream, entries in reply or []:
            out += [_event(entry_id, fields) for entry_id, fields in entries]
        return out

    def last_event_id(self, fid: str | None) -> str:
        """The newest event's id (``"0"`` when there is none): reading after it gives
        what comes next."""
        entries: Any = self.client.xrevrange(self.events_key(fid), count=1)
        return text(entries[0][0]) if entries else "0"

    def events_trimmed_after(self, fid: str | None, since: str) -> str | None:
        """The oldest kept id when events after ``since`` may have been trimmed away,
        else None. Redis 7 counts every entry a stream was ever given
        (``entries-added``): more than it holds means some went, all older than the
        oldest kept (nothing deletes single events). Its ``max-deleted-entry-id`` does
        not tell: trimming leaves it at 0-0 (redis-server 7.0.15). Before Redis 7, a
        stream shorter than ``flows_events_maxlen`` was never trimmed (approximate
        trimming keeps at least that many)."""
        key = self.events_key(fid)
        first: Any = self.client.xrange(key, count=1)
        if not first:
            return None
        oldest = text(first[0][0])
        if event_id_order(since) >= event_id_order(oldest):
            return None
        info: Any = self.client.xinfo_stream(key)
        length = int(info.get("length", 0))
        added = info.get("entries-added")
        if added is not None:
            return oldest if int(added) > length else None
        return oldest if length >= self.config.events_maxlen else None

    # -- the copy into the registry's stream (Redis Cluster; worker/eventcopy.py) --------

    def noted_flows(self, limit: int = 100) -> list[tuple[str, float]]:
        """Flows noted for a copy of their events, oldest note first, with its score."""
        raw: Any = self.client.zrange(self.keys.events_due, 0, limit - 1, withscores=True)
        return [(text(m), float(score)) for m, score in raw]

    def lock_event_copy(self, fid: str, seconds: int) -> bool:
        """One copier per flow at a time, so that its events reach the registry's
        stream in order."""
        return bool(self.client.set(self.keys.events_lock(fid), "1", nx=True, ex=seconds))

    def lock_event_copy_renew(self, fid: str, seconds: int) -> None:
        self.client.set(self.keys.events_lock(fid), "1", xx=True, ex=seconds)

    def unlock_event_copy(self, fid: str) -> None:
        self.client.delete(self.keys.events_lock(fid))

    def copy_events(self, fid: str, count: int = 100) -> bool:
        """Copy up to ``count`` of the flow's events after its cursor (meta
        ``ev_copied``) into the registry's stream, then move the cursor; True when
        nothing is left. A crash before the cursor moves copies them again."""
        after = text(self.client.hget(self.keys.meta(fid), "ev_copied") or b"0")
        reply: Any = self.client.xread({self.keys.flow_events(fid): after}, count=count)
        entries = [entry for _stream, found in reply or [] for entry in found]
        for entry_id, fields in entries:
            body = fields.get(b"e") or fields.get("e") or b"{}"
            self.client.xadd(self.keys.events, {"e": body, "src": entry_id},
                             maxlen=self.config.events_maxlen, approximate=True)
            faults.point("events-copied-one")
        last = text(entries[-1][0]) if entries else after
        # no note: this writes no event, and a note would keep the flow queued forever
        return bool(int(self._run("events_copied", fid, [last], note=False)))

    def settle_event_note(self, fid: str, score: float) -> bool:
        """Forget the flow's note if no client noted it again since ``score``."""
        return bool(int(self._run_global("events_settle", [self.keys.events_due],
                                         [fid, repr(score)])))

    def repair_event_notes(self, cursor: int = 0, chunk: int = REPAIR_CHUNK) -> int:
        """Note again the flows of the index, ``chunk`` at a time, whose events wait
        uncopied without a note (meta ``ev_due``): a note is forgotten when the copy is
        done, and a client slower than the copier (a transition held up by a failover)
        may write its events after that. Returns the cursor of the next call (0: start
        over)."""
        ids = [text(m) for m in self.client.zrange(self.keys.index, cursor,
                                                   cursor + chunk - 1)]
        if not ids:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for fid in ids:
            pipe.hget(self.keys.meta(fid), "ev_due")
        due = [fid for fid, flag in zip(ids, pipe.execute(), strict=True) if flag]
        if due:
            self.client.zadd(self.keys.events_due, dict.fromkeys(due, self.now()), nx=True)
        return 0 if len(ids) < chunk else cursor + chunk
