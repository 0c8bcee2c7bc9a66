"""add_bulk's batches: every flow of a batch becomes visible and runs, or none does,
on a single Redis and on Redis Cluster alike, even if the producer dies mid-batch.

A cluster has no transaction across flows (each flow is its own hash tag), so a batch
is a small commit protocol around one record under its own tag (``{batch:<id>}``):

1. *open*: the record is written ``pending`` with the batch's flow ids and indexed in
   ``batches``.
2. *create*: each flow is stored with ``hidden=<batch id>`` in its meta. A hidden flow
   is invisible (``get``, ``list`` and ``inspect`` do not see it) and inert:
   ``claim.lua`` releases nothing of it, so no task runs and no timer is set.
3. *commit*: one atomic write turns the record ``committed`` - unless it was aborted
   first (a clash, or the sweeper gave up on a producer that took longer than
   :data:`GRACE`). Committed and aborted exclude each other: ``batch.lua`` decides once.
4. *finish*: each flow is un-hidden, indexed and released; then the record goes.

Readers count a hidden flow as visible exactly when its batch is committed, so a batch
appears whole at step 3. A ``--flows`` worker's sweeper (:func:`sweep_batches`) finishes
committed batches whose producer died, and aborts pending ones older than
:data:`GRACE` and deletes their hidden flows.
"""

from __future__ import annotations

import gc
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .. import faults
from ..define.flow import Flow
from ..errors import FlowDefinitionError, FlowStateError
from ..registry.codes import CONFLICT, raise_for
from ..registry.creation import CreateRow, NodeRow
from ..registry.ids import new_batch_id
from .dispatch import CLAIM
from .eager import run_eager
from .submit import Submitter

__all__ = ["finish", "submit_batch", "submit_flow", "submit_large", "sweep_batches"]

logger = logging.getLogger(__name__)

GRACE = 30.0  # seconds a producer may take from opening a batch to committing it
FINISH_AFTER = 5.0  # a committed batch still listed this long: its producer died

# A flow of more nodes than PIECE_NODES is stored in pieces of at most that many nodes
# and PIECE_BYTES of records and arguments, each one create call, so that other clients
# are never blocked for long: measured on redis-server 6.2 (2 shared cores), a 500-node
# piece took 2.6 ms (median) of a chain, 5.5 ms of independent roots (each released),
# with outliers near 18 ms on the busy machine; 250 took 1.8-2.0 ms (median) and up to
# 5.4 ms of independent roots on an idle one, 125 keeps them near 1 ms. A root is
# released as its piece is stored, which costs about 65 us more (benchmarks/
# chunk_slowlog.py): a piece holds at most PIECE_ROOTS of them.
PIECE_NODES = 125
PIECE_ROOTS = 25
PIECE_BYTES = 256 * 1024
PIECES_PER_TRIP = 8  # pieces pipelined in one round trip


def submit_flow(ext: Submitter, flow: Flow) -> str:
    """``submit``: one create call for a small flow, pieces for a large one (an eager
    flow is always stored in one call: it runs in this process anyway)."""
    with _gc_paused():
        row = ext.prepare(flow)[1]
        fid = row[0]
        if ext.eager or (len(row[3]) <= PIECE_NODES and _roots(row[3]) <= PIECE_ROOTS):
            code = ext.submit_row(row, fresh=flow.id is None)
            if code != 1 and not ext.eager and ext.store.meta(fid) is None:
                # the id is held by a hidden flow of a producer that died before
                # committing it: replaced as a batch of one
                return submit_large(ext, row)
            raise_for(code, fid)  # CONFLICT: another definition under this id
            return fid
        return submit_large(ext, row)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Compiling a 100,000-node flow allocates millions of small containers, each
    allocation counting toward a cyclic collection that walks everything alive (the
    user's Flow included): some 40% of the submit's time, to free nothing (and 20% of
    the compiling in an add_bulk of 10,000 five-node flows). The collector resumes
    afterwards; reference counting frees as usual meanwhile."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _roots(nodes: list[NodeRow]) -> int:
    return sum(1 for node in nodes if not node[1].get("after"))


def _pieces(nodes: list[NodeRow]) -> list[list[NodeRow]]:
    # dependents before their dependencies (a dependency's path to a sink is longer
    # than any dependent's), so that a piece's roots find their dependents in place
    ordered = sorted(nodes, key=lambda node: node[1].get("lp", 1))
    pieces: list[list[NodeRow]] = [[]]
    size = roots = 0
    for node in ordered:
        cost = len(node[2]) + 64 * len(node[1].get("after", ())) + 128
        root = not node[1].get("after")
        if pieces[-1] and (len(pieces[-1]) >= PIECE_NODES or size + cost > PIECE_BYTES
                           or (root and roots >= PIECE_ROOTS)):
            pieces.append([])
            size = roots = 0
        pieces[-1].append(node)
        size += cost
        roots += root
    return pieces


def submit_large(ext: Submitter, row: CreateRow) -> str:
    """Store a large flow in bounded pieces as a batch of one (see the module
    docstring): hidden while its pieces are written (their roots evaluated as they go,
    released by nobody), visible and releasable at the batch's one commit. A producer
    that dies before the commit leaves a hidden flow that the sweeper deletes after
    :data:`GRACE`, and that a retried submit of the same id replaces at once."""
    fid, meta, digest, nodes, blobs = row
    store = ext.store
    existing = store.meta(fid)
    if existing is not None:
        return _existing(ext, fid, existing.get("digest") == digest)
    pieces = _pieces(nodes)
    bid = new_batch_id()
    store.batch_open(bid, [fid])
    state = "aborted"
    try:
        first: CreateRow = (fid, {**meta, "hidden": bid, "total": str(len(nodes))}, digest,
                            pieces[0], blobs)
        code = store.create_many([first])[0]
        if code != 1:
            code = _take_over(ext, first, code)
        if code != 1:
            _abort(ext, bid, [fid])
            return _existing(ext, fid, code == 0)
        rest = pieces[1:]
        stored = True
        for i in range(0, len(rest), PIECES_PER_TRIP):
            faults.point("create-piece")
            if any(c != 1 for c in store.create_parts(fid, bid, rest[i:i + PIECES_PER_TRIP])):
                stored = False  # the batch was given up (GRACE) or taken over
                break
        if stored:
            state = store.batch_decide(bid, "commit")
    except BaseException:
        _abort(ext, bid, [fid])
        raise
    if state != "committed":
        _abort(ext, bid, [fid])
        now = store.meta(fid)
        if now is not None:  # another submit of this id took over and finished first
            return _existing(ext, fid, now.get("digest") == digest)
        raise FlowStateError(
            f"flow {fid!r}: storing it took longer than {GRACE:g} s and was given up; "
            "nothing of it was created (submit it again)"
        )
    faults.point("create-committed")
    finish(ext, bid, [fid], [row])
    return fid


def _take_over(ext: Submitter, row: CreateRow, code: int) -> int:
    """create.lua found the id taken (0 same definition, -3 another): a hidden flow of
    an uncommitted batch (a producer that died mid-way) is given up and replaced;
    otherwise the code stands."""
    store = ext.store
    other = store.hidden_by(row[0])
    if other is None or other == row[1]["hidden"]:
        return code
    if store.batch_decide(other, "abort") == "committed":
        return code
    store.discard(row[0], other)
    if store.batch_record(other)[1] == [row[0]]:
        store.batch_forget(other)  # a batch of this flow alone: nothing left to sweep
    return store.create_many([row])[0]


def _existing(ext: Submitter, fid: str, same: bool) -> str:
    """A submit found its id taken: the existing flow if identical (its outbox is
    released, as after any create), else the conflict error."""
    if not same:
        raise_for(CONFLICT, fid)
    ext.dispatcher.release(fid, ext.store.mark_dirty(fid))
    return fid

def submit_batch(ext: Submitter, flows: list[Flow]) -> list[str]:
    """Store and release every flow, or none (see the module docstring); their ids."""
    with _gc_paused():
        return _submit_batch(ext, flows)


def _submit_batch(ext: Submitter, flows: list[Flow]) -> list[str]:
    prepared = [ext.prepare(f)[1] for f in flows]
    ids = [row[0] for row in prepared]
    dupes = sorted(fid for fid, n in Counter(ids).items() if n > 1)
    if dupes:
        raise FlowDefinitionError(f"add_bulk: flow id {dupes[0]!r} appears twice")
    store = ext.store
    for (fid, _meta, digest, _nodes, _blobs), (have, hidden) in zip(
            prepared, store.digests(ids), strict=True):
        if have is None or have == digest:
            continue
        # another definition: it counts unless it is a hidden flow of a batch not
        # committed (that one may be given up; _settle_existing decides)
        meta = store.meta(fid) if hidden else {"digest": have}
        if meta is not None and meta.get("digest") != digest:
            raise FlowStateError(
                f"add_bulk: flow {fid!r} already exists with a different "
                "definition; nothing of this batch was created"
            )
    if not prepared:
        return []
    bid = new_batch_id()
    store.batch_open(bid, ids)
    faults.point("bulk-open")
    try:
        rows: list[CreateRow] = [(r[0], {**r[1], "hidden": bid}, r[2], r[3], r[4])
                                 for r in prepared]
        codes = store.create_many(rows)
        clash = None
        created: list[CreateRow] = []
        for row, code in zip(rows, codes, strict=True):
            if code == 0:
                code = _settle_existing(ext, row)
            if code == 1:
                created.append(row)
            elif code != 0:
                clash = row[0]
        if clash is None:
            faults.point("bulk-commit")
            state = store.batch_decide(bid, "commit")
        else:
            state = store.batch_decide(bid, "abort")
    except BaseException:
        # e.g. a lost connection: whatever was created stays hidden; abort if we can
        _abort(ext, bid, ids)
        raise
    if state != "committed":
        _abort(ext, bid, ids)
        if clash is not None:
            raise FlowStateError(
                f"add_bulk: flow {clash!r} of this batch was created concurrently with "
                "another definition; nothing of this batch was created"
            )
        raise FlowStateError(
            f"add_bulk: the batch took longer than {GRACE:g} s to store and was given up; "
            "nothing of this batch was created (submit fewer flows per batch)"
        )
    faults.point("bulk-committed")
    finish(ext, bid, ids, created)
    return ids


def _settle_existing(ext: Submitter, row: CreateRow) -> int:
    """A flow id of the batch exists with the same definition: 0 when it stays (it is
    visible, or its batch is committed), else the code of creating it afresh after
    deleting the hidden flow of an aborted batch."""
    store = ext.store
    fid = row[0]
    other = store.hidden_by(fid)
    if other is None or other == row[1]["hidden"]:
        return 0
    # a pending batch here is undone: one of two batches creating the same id wins
    if store.batch_decide(other, "abort") == "committed":
        return 0
    store.discard(fid, other)
    return store.create_many([row])[0]


def _abort(ext: Submitter, bid: str, fids: list[str]) -> None:
    store = ext.store
    if store.batch_decide(bid, "abort") == "committed":
        return  # decided already: the sweeper finishes it
    for fid in fids:
        store.discard(fid, bid)
    store.batch_forget(bid)


def finish(ext: Submitter, bid: str, fids: list[str],
           created: Sequence[CreateRow] = ()) -> None:
    """Un-hide, index and release the flows of a committed batch (idempotent).
    ``created``: the rows of the flows this batch created (its producer's call): their
    roots' messages may go with their un-hiding (engine/direct.py)."""
    store = ext.store
    eager = ext.eager
    messages = ext.direct.messages_many(created) if created and not eager else {}
    marked = store.unhide_many(bid, fids, None if eager else CLAIM, messages)
    for fid, mark in zip(fids, marked, strict=True):
        if mark.reply < 0:  # gone or taken over: nothing of ours to release
            store.clear_dirty(mark.token)
            continue
        faults.point("bulk-unhidden")
        if mark.reply == 2:
            continue  # its roots went with the un-hiding, acknowledged
        if eager:
            run_eager(ext.outcomes, fid)
            store.clear_dirty(mark.token)
        else:
            # acknowledged together below: one round trip for the whole batch
            ext.dispatcher.release(fid, mark.token, mark.claim, defer=True)
    ext.dispatcher.acks.flush()  # returns with every root queued
    store.batch_forget(bid)


def sweep_batches(ext: Submitter) -> int:
    """Manager service: finish committed batches whose producer died; abort pending
    batches older than :data:`GRACE` and delete their hidden flows."""
    store = ext.store
    acted = 0
    for bid in store.batch_ids():
        state, fids = store.batch_record(bid)
        if state == "pending":
            state = store.batch_decide(bid, "expire", GRACE)
            if state == "pending":
                continue
        if state == "committed":
            if store.batch_age(bid) < FINISH_AFTER:
                continue  # its producer is probably finishing it
            logger.warning("celery-flows: finishing add_bulk batch %s for its producer", bid)
            finish(ext, bid, fids)
        else:  # aborted, or the record is gone
            for fid in fids:
                store.discard(fid, bid)
            store.batch_forget(bid)
        acted += 1
    return acted
