"""Following the event stream (SPEC section 11): ``flows events`` and
``inspect --watch`` read it here, and the dashboard's Server-Sent Events too.

With a flow id the flow's own stream is followed from its first kept event, and the
follow ends after the flow's terminal event (the flow's state is read before the
stream, so a terminal state means its last event was already read). Without one, the
registry's stream is followed from now on.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..define.states import FlowState
from ..errors import FlowNotFoundError
from ..registry.events import EVENT_FIELDS, valid_event_id

if TYPE_CHECKING:
    from ..registry import Store

__all__ = ["follow", "format_event", "format_json"]

_TERMINAL = frozenset(state.value for state in FlowState if state.terminal)


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
