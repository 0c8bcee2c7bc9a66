"""Acknowledgements of published nodes, sent in batches.

After a node's message is sent, published.lua moves it from the outbox to ``queued``
and clears the dirty marker of the release. Nothing waits for that acknowledgement:
the node's claim lease (``CLAIM_LEASE``) keeps any other process from publishing it
again meanwhile, and its start (start.lua) does everything the acknowledgement would.
So a process keeps the acknowledgements of what it published for up to
:data:`ACK_DELAY` and sends them together: one script per flow for all its nodes
published meanwhile, in one round trip for all flows. A process that dies first loses
only them: the claims lapse and the sweeper publishes what did not start (the guard acks
a second copy without running it).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Sequence

from ..registry import Store
from ..registry.replies import Published

__all__ = ["ACK_DELAY", "Acks"]

logger = logging.getLogger(__name__)

ACK_DELAY = 0.05  # seconds an acknowledgement may wait to be sent with others


class Acks:
    """The pending acknowledgements of one store in this process."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: dict[str, tuple[list[Published], list[str]]] = {}
        self._pid = 0
        atexit.register(self.flush)
        # a forked child inherits the parent's pending items (the parent's to send), and
        # maybe a lock the parent's thread held, but no thread
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending = {}
        self._pid = 0

    def add(self, fid: str, items: Sequence[Published], token: str | None) -> None:
        """Acknowledge ``items`` of flow ``fid`` and clear ``token`` within ACK_DELAY."""
        if not items and not token:
            return
        self._ensure_thread()
        with self._lock:
            sent, tokens = self._pending.setdefault(fid, ([], []))
            sent.extend(items)
            if token:
                tokens.append(token)
        self._wake.set()

    def flush(self) -> None:
        """Send every pending acknowledgement now."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            self.store.published_many(
                [(fid, sent, tokens) for fid, (sent, tokens) in pending.items()])
        except Exception:
            logger.exception("celery-flows: acknowledging published nodes failed; their "
                             "claims lapse and the sweeper publishes what did not start")

    def _ensure_thread(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid == pid:
                return
            self._pid = pid
            threading.Thread(target=self._run, name="celery-flows-acks", daemon=True).start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            # let what is published meanwhile join this batch
            threading.Event().wait(ACK_DELAY)
            self.flush()
