"""The registry's event stream on Redis Cluster (SPEC section 11: ``flows events``
without a flow id prints every flow's events, at least once and in order per flow).

On a single Redis each transition's script appends its events to the flow's stream and
to the registry's (lua/engine/cache.lua). On a cluster the registry's stream lives in
another slot than any flow, so a script writes the flow's stream only: that stream is
the atomic source of truth, and the ``--flows`` workers copy it here:

- every client notes the flow in ``<prefix>:{events}:due`` *before* it runs a flow
  script (registry/connection.py ``_note_events``), so no crash leaves events behind
  without a note;
- a copier takes the flow's lock (one copier per flow, so its events keep their order),
  appends the events after the flow's cursor (meta ``ev_copied``) to the registry's
  stream, then moves the cursor (events_copied.lua, in the flow's slot). Dying between
  the two copies those events again next time: at least once, never a loss. Each copy
  carries its id in the flow's stream (``src``), by which readers drop the repeats;
- once a flow is copied to its stream's end, its note goes, unless a client noted it
  again meanwhile (events_settle.lua). A script that runs later than its note was read
  (a transition held up by a failover) sets meta ``ev_due`` in the same step as its
  events, and a slow walk of the flows' index notes such flows again.
"""

from __future__ import annotations

import logging

from ..engine.logcontext import flow_scope
from ..registry import Store

__all__ = ["COPY_LOCK", "copy_noted", "repair"]

logger = logging.getLogger(__name__)

#: Seconds a copier holds a flow (it renews the hold after each batch of entries); a
#: copier that dies holding it delays that flow's copy by as much
COPY_LOCK = 10
BATCH = 100


def copy_noted(store: Store, limit: int = 100) -> int:
    """Copy the events of the noted flows (oldest note first); returns how many flows
    were copied to their end."""
    done = 0
    for fid, score in store.noted_flows(limit):
        if not store.lock_event_copy(fid, COPY_LOCK):
            continue  # another copier has it
        try:
            with flow_scope(fid):
                while not store.copy_events(fid, BATCH):
                    store.lock_event_copy_renew(fid, COPY_LOCK)
                store.settle_event_note(fid, score)
                done += 1
        finally:
            store.unlock_event_copy(fid)
    return done


def repair(store: Store, cursor: int) -> int:
    """One step of the walk that notes flows whose events wait without a note (see the
    module's docstring); returns the next cursor."""
    return store.repair_event_notes(cursor)
