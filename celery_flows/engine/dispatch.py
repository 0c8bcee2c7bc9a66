"""Ready node -> Celery message: drains a flow's outbox under a claim and publishes each
node through a canvas signature with a deterministic task id (registry/ids.py), after
its limiters admitted it."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NamedTuple

import redis
from kombu.exceptions import BatchPublishError, OperationalError

from .. import faults
from ..define.records import NodeRecord, Ref, as_list, map_pairs, with_defaults
from ..registry import Store
from ..registry.codec import Codec
from ..registry.ids import member_for, order_key, task_id_for, task_nonce
from ..registry.replies import Claim, Published
from .acks import Acks
from .limits import Limits
from .maps import expansion
from .routing import route_queue
from .unwatched import forget, sending

__all__ = ["BATCH", "CLAIM", "CLAIM_LEASE", "Call", "Dispatcher", "resolve_input"]

logger = logging.getLogger(__name__)

CLAIM_LEASE = 15.0  # seconds before another process may publish an unacknowledged claim
#: Entries per claim, and so per acknowledgement: bounded work per script. Measured with
#: benchmarks/chunk_slowlog.py (redis-server 6.2, no other load), a node costs a claim
#: about 60 us and its published.lua about 110 us (its record read and written back, an
#: event): 100 entries took 13 ms; 25 stay near 3 ms.
BATCH = 25
CLAIM = (CLAIM_LEASE, BATCH)  # a claim after a transition: (lease, most entries)


# Errors that say nothing about the node itself: leave it claimed for the sweeper.
TRANSIENT: tuple[type[BaseException], ...] = (
    OperationalError, ConnectionError, TimeoutError, redis.RedisError,
)


def _entry_id(entry: list[Any]) -> str:
    return entry[0].decode() if isinstance(entry[0], bytes) else str(entry[0])


def _entry_attempt(entry: list[Any]) -> int:
    return int(json.loads(entry[1]).get("attempt", 0))


#: The edge kinds as the scan of a wide node stores them, a letter per edge in ``after``
#: order (registry/lua/engine/scan.lua, evaluate.lua KIND_LETTER)
KIND_LETTERS = {"o": "ok", "f": "failed", "s": "skipped", "c": "cancelled", "r": "removed"}


def resolve_input(ref: Ref, values: dict[str, Any], kinds: dict[str, str]) -> Any:
    """Build the value a node receives from its dependencies: a failed or skipped
    dependency gives None, a removed one is dropped from lists."""
    if isinstance(ref, str):
        return None if kinds.get(ref) == "removed" else values.get(ref)
    if isinstance(ref, dict) and "map" in ref:  # cjson turns an empty list into {}
        return {
            k: resolve_input(r, values, kinds)
            for k, r in map_pairs(ref)
            if not (isinstance(r, str) and kinds.get(r) == "removed")
        }
    out = []
    for r in as_list(ref):
        if isinstance(r, str) and kinds.get(r) == "removed":
            continue
        out.append(resolve_input(r, values, kinds))
    return out


class Call(NamedTuple):
    """A claimed outbox entry decoded into the call to make."""

    node_id: str
    attempt: int
    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str
    priority: int | None
    task_id: str
    options: dict[str, Any]
    rec: NodeRecord
    path: int
    retries: int


class Release(NamedTuple):
    """What the limiters said: ``held`` (the node waits in its flow; ``by`` refused it
    for ``wait`` seconds, admit.lua), else the Redis time they admitted it at (None
    when no limiter applies)."""

    held: bool
    at: float | None = None
    by: str = ""
    wait: float = 0.0


class Single(NamedTuple):
    """What the releaser's try to send one held node came to: ``published``,
    ``held`` (still refused by limiter ``by``; ``wait`` seconds until it may admit
    it, 0 when it is not the node's turn there, -1 until a slot frees) or ``stale``
    (the node moved on: its wait-queue member is obsolete)."""

    outcome: str
    wait: float = 0.0
    by: str = ""


class Dispatcher:
    """Publishes what a flow's outbox holds; the releaser's single sends too."""

    def __init__(self, app: Any, store: Store, codec: Codec, limits: Limits) -> None:
        self.app = app
        self.store = store
        self.codec = codec
        self.limits = limits
        self.acks = Acks(store)
        #: records a map's collected result (Outcomes.collect, set by Outcomes)
        self.collect: Callable[..., None] | None = None
        self.config = limits.config
        #: a flow found waiting for its concurrency group (claim code 3) asks for its
        #: place here (engine/groups.py); True: it was started, claim again
        self.on_waiting: Callable[[str], bool] | None = None
        #: (flow id, nonce) -> fair-share unit: a flow's concurrency key is set when it
        #: is created and never changes; the nonce tells a later flow of the same id
        self._units: dict[tuple[str, str], str] = {}

    def share_unit(self, fid: str, nonce: str) -> str:
        """The flow's fair-share unit (ids.share_unit), read once."""
        unit = self._units.get((fid, nonce))
        if unit is None:
            if len(self._units) >= 4096:
                self._units.clear()
            unit = self._units[(fid, nonce)] = self.store.share_unit(fid)
        return unit

    def drain(self, fid: str, token: str | None = None, claim: Claim | None = None,
              defer: bool = False) -> None:
        """Publish everything claimable in the flow's outbox, starting with ``claim`` if
        the caller already made one. The dirty marker ``token`` is cleared once nothing
        is left that another process still holds a claim on; otherwise it stays for the
        sweeper. ``defer``: the acknowledgements may wait (acks.py); a submit or a
        change acknowledges at once, so that its caller sees the nodes queued."""
        store = self.store
        while True:
            if claim is None:
                claim = store.claim(fid, CLAIM_LEASE, BATCH)
            if claim.next_due is not None:
                store.set_timer(fid, claim.next_due)
            if claim.webhook_pending:
                store.queue_webhook(fid)
            if claim.more:
                faults.point("chore-step")
            if claim.code == 3 and self.on_waiting is not None and self.on_waiting(fid):
                claim = None
                continue
            if claim.code != 0:
                if claim.more:
                    # stopped by fail_fast: its cancel goes on a bounded step per claim
                    claim = None
                    continue
                # gone, paused or cancelled: resume/retry mark the flow dirty themselves
                if token:
                    store.published(fid, [], clear_token=token)
                return
            sent: list[Published] = []
            refused: list[tuple[str, int, str]] = []
            short = len(claim.entries) < BATCH
            if claim.entries:
                with self.app.producer_or_acquire() as producer:
                    self._send_claimed(fid, claim, producer, sent, refused)
            if sent:
                faults.point("sent-before-ack")
            for nid, attempt, error in refused:
                logger.error("celery-flows: node %s of flow %s cannot be sent: %s",
                             nid, fid, error)
                store.complete(fid, nid, attempt, "failed", b"", error)
            if short and not refused and not claim.more:
                self._acknowledge(fid, sent, token if claim.left == 0 else None, defer)
                return
            self._acknowledge(fid, sent, None, defer)
            claim = None

    def _send_claimed(self, fid: str, claim: Claim, producer: Any, sent: list[Published],
                      refused: list[tuple[str, int, str]]) -> None:
        """Send a claim's entries, their Redis commands in one pipeline (kombu's publish
        batch; another transport publishes each at once): what went into ``sent``,
        what cannot be sent at all into ``refused``. On an error the batch's messages
        are dropped unacknowledged: their claims lapse and the sweeper publishes them
        (a transport without batches sent each at once: those are acknowledged). A
        failed flush sends each message again on its own, under Celery's publish
        retry (a copy delivered twice is acknowledged without running, start.lua)."""
        calls: list[tuple[Call, float | None]] = []
        # a single message goes as it is: a batch would only add its own pipeline
        batched = len(claim.entries) > 1 and producer.supports_batch_publish
        try:
            with producer.batch(max_size=10 * BATCH) if batched else nullcontext():
                for entry in claim.entries:
                    try:
                        call = self.prepare(fid, claim.nonce, entry)
                        if call.rec.get("kind") == "map":
                            self.settle_map(fid, call)
                            continue
                        release = self._admit(fid, claim.flow_rate, call)
                        if release.held:
                            continue
                        faults.point("claimed-before-publish")
                        self._send(call, producer, release.at)
                        calls.append((call, release.at))
                    except TRANSIENT:
                        raise
                    except Exception as exc:
                        # the call itself is wrong (arguments, serialisation...): fail
                        # the node rather than retry it forever
                        refused.append((_entry_id(entry), _entry_attempt(entry),
                                        f"{type(exc).__name__}: {exc}"))
        except BatchPublishError:
            # delivery uncertain: each once more on its own (a copy runs only once)
            logger.warning("celery-flows: a batched publish of flow %s failed; sending "
                           "its %d messages one by one", fid, len(calls))
            for call, at in calls:
                self._send(call, producer, at)
        except BaseException:
            if not batched:
                # published one by one as they went: those are acknowledged
                self.store.published(fid, [self._published(c, at) for c, at in calls])
            raise
        sent += [self._published(call, at) for call, at in calls]

    def _acknowledge(self, fid: str, sent: list[Published], token: str | None,
                     defer: bool) -> None:
        """Acknowledge what was sent: a node its limiters admitted at once (its queue slot
        and release time count), the rest, when ``defer``, within ACK_DELAY together
        with others (acks.py)."""
        if not defer:
            self.store.published(fid, sent, clear_token=token)
            return
        limited = [p for p in sent if p.released_at is not None]
        if limited:
            self.store.published(fid, limited)
        self.acks.add(fid, [p for p in sent if p.released_at is None], token)

    def prepare(self, fid: str, nonce: str, entry: list[Any]) -> Call:
        """Decode a claimed outbox entry into the call to make."""
        nid = _entry_id(entry)
        rec = with_defaults(json.loads(entry[1]))  # stored compact (records.py)
        args, kwargs, options = self.codec.load_node_call(entry[2])
        kinds_list = json.loads(entry[3]) or []
        after = as_list(rec.get("after"))
        raw_results = entry[4] if len(entry) > 4 else []
        if isinstance(kinds_list, str):
            # a wide node: the claim sent its scan's letters, not its inputs, which are
            # read here a page at a time (Reads.results)
            kinds_list = [KIND_LETTERS[c] for c in kinds_list]
            oks = [d for d, k in zip(after, kinds_list, strict=False) if k == "ok"]
            stored = self.store.results(fid, oks)
            raw_results = [stored.get(d) for d in after]
        kinds = dict(zip(after, kinds_list, strict=False))
        values = {
            dep: self.codec.load_result(raw)
            for dep, raw in zip(after, raw_results, strict=False)
            if raw is not None
        }
        if rec.get("xin"):
            # a map's item: its element (claim.lua sends it as its one input)
            raw = raw_results[0] if raw_results else None
            args = [self.codec.load_result(raw) if raw is not None else None, *args]
        elif rec.get("input") is not None:
            args = [resolve_input(rec["input"], values, kinds), *args]
        task_name = str(rec["task"])
        attempt = int(rec["attempt"])
        return Call(
            node_id=nid,
            attempt=attempt,
            task_name=task_name,
            args=args,
            kwargs=kwargs,
            queue=route_queue(self.app, rec, task_name, args, kwargs),
            priority=rec.get("priority"),
            task_id=task_id_for(fid, nid, attempt, nonce),
            # records of format 1.0 kept the options in the record
            options=options or dict(rec.get("opts") or {}),
            rec=rec,
            path=int(entry[5]) if len(entry) > 5 and entry[5] is not None else 0,
            # also for a retry put back in the outbox (requeued, paused): start.lua
            # refuses a message below the node's retry count
            retries=int(rec.get("retries") or 0),
        )

    def settle_map(self, fid: str, call: Call, release: bool = True) -> None:
        """A map in the outbox is no task: it expands over its input (claimed before
        expanding: lua/expand.lua), or its items are all terminal and their results, in
        order, become its own (``release`` False: the eager driver drains itself)."""
        value = call.args[0] if call.args else None
        if call.rec.get("k") is None:
            x = expansion(self.store, self.codec, self.config, fid, call.node_id, value,
                          int(call.rec.get("mlen") or 1024))
            self.store.expand(fid, call.node_id, call.attempt,
                              x if isinstance(x, str) else json.dumps(x))
            return
        assert self.collect is not None, "Outcomes sets the dispatcher's collect"
        self.collect(fid, call.node_id, call.attempt, list(value or []), release=release)

    def _admit(self, fid: str, flow_rate: str, call: Call, member: str | None = None,
               patience: float = 0.0) -> Release:
        """Pass the node through its limiters; a refused node is held in its flow. With
        ``patience``, a rate limiter due within that many seconds is waited for here
        rather than by holding the node (the releaser's precise timing)."""
        limiters = self.limits.limiters(fid, flow_rate, call.rec, call.queue)
        if not limiters:
            return Release(False)
        if member is None:
            priority = call.priority
            if priority is None:
                priority = self.app.conf.task_default_priority
            ready_at = (call.rec.get("retry_at") or call.rec.get("ready_at")
                        or self.store.now())
            member = member_for(order_key(call.path, priority, float(ready_at)), fid,
                                call.node_id, call.attempt)
        while True:
            answer = self.limits.admit(limiters, member, call.task_id,
                                       self.share_unit(fid, task_nonce(call.task_id)),
                                       fid)
            if answer.admitted or not 0 < answer.wait <= patience:
                break
            time.sleep(answer.wait)
        if not answer.admitted:
            self.store.hold(fid, call.node_id, call.attempt, member, answer.refused_by,
                            answer.wait)
            return Release(True, by=answer.refused_by, wait=answer.wait)
        return Release(False, answer.at or None)

    def release_one(self, fid: str, nid: str, attempt: int, member: str) -> Single:
        """Releaser: try to send one held node."""
        store = self.store
        marked = store.mark_and_claim(fid, CLAIM_LEASE, [nid])
        token, claim = marked.token, marked.claim
        assert claim is not None
        entry = claim.entries[0] if claim.code == 0 and claim.entries else None
        if entry is None or _entry_attempt(entry) != attempt:
            store.published(fid, [], clear_token=token)
            return Single("stale")
        call = self.prepare(fid, claim.nonce, entry)
        release = self._admit(fid, claim.flow_rate, call, member, patience=0.05)
        if release.held:
            store.published(fid, [], clear_token=token)
            return Single("held", release.wait, release.by)
        faults.point("claimed-before-publish")
        with self.app.producer_or_acquire() as producer:
            sent = self._send(call, producer, release.at)
        store.published(fid, [sent], clear_token=token)
        return Single("published")

    def _send(self, call: Call, producer: Any, released: float | None = None) -> Published:
        options: dict[str, Any] = {
            **call.options,
            "task_id": call.task_id,
            "queue": call.queue,
            "producer": producer,
        }
        if call.priority is not None:
            options["priority"] = call.priority
        if call.retries:
            options["retries"] = call.retries  # a retry held in Redis, not by Celery
        sig = self.app.signature(call.task_name, args=call.args, kwargs=call.kwargs)
        with sending(self.app) as unwatched:
            result = sig.apply_async(**options)
        if unwatched:
            forget(result)
        return self._published(call, released)

    @staticmethod
    def _published(call: Call, released: float | None) -> Published:
        return Published(call.node_id, call.attempt, call.queue, call.task_id, released,
                         call.retries)

    def release(self, fid: str, token: str | None = None, claim: Claim | None = None,
                defer: bool = False) -> None:
        """:meth:`drain`, logging instead of raising: a failed publish is retried by the
        sweeper of a ``--flows`` worker once the dirty marker is old enough."""
        try:
            self.drain(fid, token, claim, defer)
        except Exception:
            logger.exception("celery-flows: publishing ready nodes of flow %s failed; the "
                             "sweeper of a --flows worker will retry", fid)
