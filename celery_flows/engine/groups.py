"""Concurrency groups (SPEC section 12): at most N flows of a key admitted at once.

A flow of a group is stored waiting (meta ``cwait=1``, its roots kept pending, keys.py);
nothing of it is claimed while it waits (claim code 3). Its places live under the
``{conc}`` hash tag, apart from the flow's own keys, so every step spans two slots and
goes *acquire, then commit*, with the reconciler repairing a crash between:

1. The first claim of a waiting flow (at submit, or the sweeper's, since the dirty
   marker stays until then) brings the dispatcher to :meth:`Groups.on_waiting`:
   conc_enqueue.lua gives it a place or a place in line (or cancels it, or a victim,
   per ``on_limit``).
2. An admitted flow is started by conc_start.lua (its roots released) and drained.
3. :meth:`Groups.reconcile`, every round of a ``--flows`` worker: frees the places of
   flows that finished, expired or were reopened (a new life), admits the line's head
   into each free place (conc_admit.lua), starts admitted flows still waiting (a
   process died between 2's two steps), and cancels the flows noted for eviction.

So a place is freed at least once after its flow ends, and the next flow admitted,
while a ``--flows`` worker runs; nothing depends on the process that ended the flow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .. import faults
from ..config import FlowsConfig
from ..define.states import FlowState
from ..errors import FlowNotFoundError, FlowStateError
from ..registry import Store

__all__ = ["Groups", "UNLIMITED"]

logger = logging.getLogger(__name__)

#: the limit of a group no longer in flows_concurrency_limits: its flows all go
UNLIMITED = 10**9
#: line entries whose flow the reconciler checks, every LINE_EVERY rounds (a cancelled
#: waiting flow leaves the line then; past these, when it reaches the head)
LINE_CHECK = 200
LINE_EVERY = 5

_TERMINAL = {FlowState.SUCCEEDED.value, FlowState.FAILED.value, FlowState.CANCELLED.value}


class Groups:
    """Places of concurrency groups: asked for, given, freed (see the module doc)."""

    def __init__(self, store: Store, config: FlowsConfig,
                 release: Callable[[str, str], None],
                 cancel: Callable[[str], Any]) -> None:
        self.store = store
        self.config = config
        self._release = release  # drain a flow's outbox, then clear the dirty marker
        self._cancel = cancel
        self._rounds = 0

    def limit(self, group: str) -> int:
        return self.config.concurrency_limits.get(group, UNLIMITED)

    def on_waiting(self, fid: str) -> bool:
        """A claim found the flow waiting: ask for its place, start it if it got one.
        True when the caller should claim again (the flow runs now)."""
        meta = self.store.conc_metas([fid])[0]
        if meta is None or meta.get("cwait") != "1" or "cgroup" not in meta:
            # gone, or started meanwhile (claim again); a waiting flow without a group
            # cannot ask for a place: left for the reconciler to report, not looped on
            return meta is not None and meta.get("cwait") != "1"
        group, key, gen = meta["cgroup"], meta.get("ckey", ""), meta.get("cgen", "1")
        place = self.store.conc_enqueue(group, key, fid, gen, self.limit(group),
                                        meta.get("on_limit", "queue"))
        if place.outcome == "cancel":
            self._evict(fid)
            return False
        if place.outcome == "waiting":
            return False
        if place.victim:
            self._evict(place.victim)
        faults.point("conc-admitted-before-start")
        code, _state = self.store.conc_start(fid, gen)
        if code == 2:
            self._admit(group, key, [(fid, gen)])
        # 0: another process started it (and drains it) or it is another life now
        return code == 1

    def reconcile(self) -> int:
        """One round of the ``--flows`` service; returns how many flows it started."""
        for fid in self.store.conc_evicted():
            self._evict(fid)
        started = 0
        self._rounds += 1
        line_check = LINE_CHECK if self._rounds % LINE_EVERY == 1 else 0
        for group, key in self.store.conc_group_keys():
            entries = self.store.conc_entries(group, key, line_check)
            admitted = {fid for fid, _at in entries.running}
            fids = [fid for fid, _at in entries.running] + entries.line
            frees: list[tuple[str, str]] = []
            starts: list[tuple[str, str]] = []
            for fid, meta in zip(fids, self.store.conc_metas(fids), strict=True):
                life = entries.lives.get(fid, "")
                if meta is None or meta.get("state") in _TERMINAL \
                        or meta.get("cgen", "1") != life:
                    # gone (expired), finished, or reopened as a new life (which asks
                    # for its own place): the place goes
                    frees.append((fid, life))
                elif fid in admitted and meta.get("cwait") == "1":
                    starts.append((fid, life))
            for fid, gen in starts:
                started += max(self._start(group, key, fid, gen), 0)
            if frees or (entries.queued and len(admitted) < self.limit(group)):
                started += self._admit(group, key, frees)
        return started

    def _admit(self, group: str, key: str, frees: list[tuple[str, str]]) -> int:
        """Free ``frees`` and start whom that admits, until a round admits nobody."""
        started = 0
        while True:
            admitted = self.store.conc_admit(group, key, self.limit(group), frees)
            if not admitted:
                return started
            frees = []
            for fid, gen in admitted:
                n = self._start(group, key, fid, gen, admit=False)
                if n < 0:
                    frees.append((fid, gen))
                else:
                    started += n

    def _start(self, group: str, key: str, fid: str, gen: str, admit: bool = True) -> int:
        """Start an admitted flow: 1 started, 0 nothing to do, -1 finished (or gone) while
        it waited, its place freed (``admit``: here; else by the caller)."""
        faults.point("conc-admitted-before-start")
        token = self.store.mark_dirty(fid)
        code, _state = self.store.conc_start(fid, gen)
        if code == 2 or code == -1:
            self.store.clear_dirty(token)
            if admit:
                self._admit(group, key, [(fid, gen)])
            return -1
        self._release(fid, token)
        return 1 if code == 1 else 0

    def _evict(self, fid: str) -> None:
        """Cancel a flow on_limit chose (once it is cancelled, the note goes)."""
        faults.point("conc-evict-before-cancel")
        try:
            self._cancel(fid)
        except (FlowStateError, FlowNotFoundError):
            pass  # finished already, or gone
        except Exception:
            logger.exception("celery-flows: cancelling flow %s for its concurrency group "
                             "failed; a --flows worker retries", fid)
            return
        self.store.conc_evict_done(fid)
