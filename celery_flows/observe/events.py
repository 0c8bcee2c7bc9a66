"""Following the event stream (SPEC section 11): ``flows events`` and
``inspect --watch`` read it here, and the dashboard's Server-Sent Events too.

With a flow id the flow's own stream is followed from its first kept event, and the
follow ends after the flow's terminal event (the flow's state is read before the
stream, so a terminal state means its last event was already read). Without one, the
registry's stream is followed from now on; on Redis Cluster its entries are copies
(worker/eventcopy.py), and one a copier copied again after a crash is dropped here by
its id in the flow's stream (``src``), so each event prints once, in order per flow.
"""

from __future__ import annotations

import datetime
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..define.states import FlowState
from ..errors import FlowNotFoundError
from ..registry.events import EVENT_FIELDS, event_id_order, valid_event_id

if TYPE_CHECKING:
    from ..registry import Store

__all__ = ["follow", "format_event", "format_json"]

_TERMINAL = frozenset(state.value for state in FlowState if state.terminal)
#: Flows whose last copied id a follower remembers (the least recently seen go first)
_SEEN_FLOWS = 100_000


class _Repeats:
    """Drops a copied event (Redis Cluster) whose ``src`` is not past the last one
    seen of its flow: a re-copy after a copier's crash."""

    def __init__(self) -> None:
        self.last: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def seen(self, event: dict[str, Any]) -> bool:
        src = event.pop("src", None)
        if src is None:
            return False
        flow, order = str(event.get("flow")), event_id_order(src)
        if flow in self.last and order <= self.last[flow]:
            return True
        self.last[flow] = order
        self.last.move_to_end(flow)
        if len(self.last) > _SEEN_FLOWS:
            self.last.popitem(last=False)
        return False


def _flow_state(store: Store, fid: str) -> str:
    meta = store.meta(fid)
    if meta is None:
        raise FlowNotFoundError(f"no flow {fid!r} (unknown, or expired after its retention)")
    return meta.get("state", "")


def follow(store: Store, fid: str | None = None, since: str | None = None,
           warn: Callable[[str], None] = lambda _msg: None, block: float = 1.0,
           stop: Callable[[], bool] = lambda: False, idle: bool = False
           ) -> Iterator[dict[str, Any] | None]:
    """Yield events as they come (see the module's docstring). ``since``: only those
    after that id (one that was trimmed away warns and starts at the oldest kept).
    ``idle``: also yield None after each ``block`` seconds without an event (a server
    writes a keep-alive then, and so learns that its client went away). Ends after a
    flow's terminal event, or when ``stop()`` turns true. Raises FlowNotFoundError for
    an unknown flow, ValueError for a malformed ``since``."""
    if since is not None and not valid_event_id(since):
        raise ValueError(f"{since!r} is not an event id (like 1764750000000-0)")
    if fid is not None:
        _flow_state(store, fid)
    if since is not None:
        oldest = store.events_trimmed_after(fid, since)
        if oldest is not None:
            warn(f"events after {since} were trimmed (flows_events_maxlen); starting at "
                 f"the oldest kept, {oldest}")
            since = "0"
        after = since
    else:
        after = "0" if fid is not None else store.last_event_id(None)
    repeats = _Repeats()
    while not stop():
        state = _flow_state(store, fid) if fid is not None else ""
        events = store.read_events(fid, after)
        if not events:
            if state in _TERMINAL:
                return
            events = store.read_events(fid, after, block=block)
            if not events and idle:
                yield None
        for event in events:
            after = event["id"]
            if not repeats.seen(event):
                yield event


def format_json(event: dict[str, Any]) -> str:
    return json.dumps({name: event.get(name) for name in EVENT_FIELDS})


def format_event(event: dict[str, Any]) -> str:
    """One line for a person: time, flow, node (``-`` for the flow), state, details."""
    when = datetime.datetime.fromtimestamp(float(event.get("time") or 0), datetime.timezone.utc)
    parts = [when.strftime("%H:%M:%S.%f")[:-3], str(event.get("flow")),
             str(event.get("node") or "-"), str(event.get("state"))]
    if event.get("node") is not None and event.get("attempt") is not None:
        parts.append(f"attempt {event['attempt']}")
    if event.get("error"):
        parts.append(f"error: {event['error']}")
    progress = event.get("progress")
    if isinstance(progress, dict):
        pct = progress.get("pct")
        parts.append(f"progress: {'' if pct is None else f'{pct}% '}{progress.get('msg') or ''}"
                     .rstrip())
    return "  ".join(parts)
