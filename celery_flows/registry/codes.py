"""The return codes of the Lua transitions: one table, each code with its exception.

A negative first element of a script's reply is an error the caller turns into an
exception with :func:`raise_for`; non-negative codes are outcomes whose meaning each
script's header gives (for ``start.lua`` they are named in :data:`START_REASONS`, which
the attempt guard logs).
"""

from __future__ import annotations

from typing import NamedTuple

from ..errors import FlowNotFoundError, FlowsError, FlowStateError, FlowVersionError

__all__ = ["CODES", "CONFLICT", "NOT_FOUND", "NO_NODE", "REFUSED", "START_REASONS",
           "VERSION", "raise_for"]

NOT_FOUND = -1
VERSION = -2
CONFLICT = -3
NO_NODE = -4
REFUSED = -5


class Code(NamedTuple):
    name: str
    error: type[FlowsError]
    message: str  # formatted with fid= and reason=


CODES: dict[int, Code] = {
    NOT_FOUND: Code("not found", FlowNotFoundError,
                    "flow {fid!r} does not exist (never created, or expired)"),
    VERSION: Code("unknown format", FlowVersionError,
                  "flow {fid!r} has a record format this version of celery-flows does not "
                  "understand; upgrade celery-flows on this process"),
    CONFLICT: Code("another definition", FlowStateError,
                   "flow {fid!r} already exists with a different definition; use a new id"),
    NO_NODE: Code("no such node", FlowNotFoundError, "flow {fid!r} has no such node"),
    REFUSED: Code("refused", FlowStateError, "flow {fid!r}: {reason}; nothing was changed"),
}

#: start.lua's codes, as the attempt guard explains a body it does not run
START_REASONS = {
    0: "duplicate delivery of an attempt already started",
    2: "superseded attempt",
    3: "node finished, flow cancelled, or a flow run eagerly by its producer",
    4: "flow paused; the node waits for resume",
    5: "message of an earlier flow that had the same id",
    NOT_FOUND: "unknown or expired flow",
    NO_NODE: "unknown node",
}


def raise_for(code: int, fid: str, reason: str = "") -> None:
    """Raise the exception of a negative code (nothing for the others)."""
    entry = CODES.get(code)
    if entry is not None:
        raise entry.error(entry.message.format(fid=fid, reason=reason or entry.name))
