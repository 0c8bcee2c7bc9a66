"""The read side of the event streams (SPEC section 11; written by the engine's flush(),
lua/engine/cache.lua): a flow's stream, or the registry's stream of every flow.

An entry's one field ``e`` is the event as JSON without its id; the stream id is the
event's ``id``. On a single Redis an event has the same id in both streams. On Redis
Cluster the registry's stream is not written (it is of another slot than any flow), so
reading every flow's events is refused there with a clear error.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import FlowsError
from .connection import Connection
from .replies import text

__all__ = ["EVENT_FIELDS", "Events", "event_id_order", "valid_event_id"]

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
    return event


class Events(Connection):
    """Reading the event streams; a part of :class:`~celery_flows.registry.Store`."""

    def events_key(self, fid: str | None) -> str:
        """The stream of flow ``fid``, or of every flow (a single Redis only)."""
        if fid is not None:
            return self.keys.flow_events(fid)
        if not self.inline:
            raise FlowsError("on Redis Cluster events are kept per flow only (the "
                             "registry's stream would need a slot of its own in every "
                             "transition); follow one flow: flows events FLOW_ID")
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
        else None. Redis 7 says what it deleted; before it, a stream shorter than
        ``flows_events_maxlen`` was never trimmed (approximate trimming keeps at least
        that many)."""
        key = self.events_key(fid)
        first: Any = self.client.xrange(key, count=1)
        if not first:
            return None
        oldest = text(first[0][0])
        if event_id_order(since) >= event_id_order(oldest):
            return None
        info: Any = self.client.xinfo_stream(key)
        deleted = info.get("max-deleted-entry-id")
        if deleted is not None:
            return oldest if event_id_order(since) < event_id_order(text(deleted)) else None
        return oldest if int(info.get("length", 0)) >= self.config.events_maxlen else None
