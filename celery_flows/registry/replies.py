"""The typed replies of the registry: what each Lua transition returns, decoded once
here so that no caller indexes into a script's raw reply."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

__all__ = ["Admission", "Change", "Claim", "Completion", "FairHead", "Marked", "Published",
           "Recovery", "Started", "text"]

R = TypeVar("R")


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Claim(NamedTuple):
    """claim.lua: outbox entries claimed for publishing (see its header)."""

    code: int  # 0 ok | 1 nothing to claim from (paused, cancelled, hidden, eager) | < 0
    left: int  # entries still claimable after these
    nonce: str
    flow_rate: str
    next_due: float | None  # when the first timed entry is due (a timer to set)
    webhook_pending: bool
    more: bool  # bounded steps of a large transition are left: claim again
    entries: list[Any]

    @classmethod
    def of(cls, out: list[Any]) -> Claim:
        due = text(out[4])
        return cls(int(out[0]), int(out[1]), text(out[2]), text(out[3]),
                   float(due) if due else None, text(out[5]) == "1", text(out[6]) == "1",
                   list(out[7:]))


class Completion(NamedTuple):
    """complete.lua: 1 recorded | 0 not the current attempt (ignored) | 6 a poke |
    7 not recorded: maps expand over the result (``maps``: map id -> max_length), call
    again with their expansions | < 0 an error code."""

    code: int
    released: int
    state: str  # the flow's state after it
    queue: str  # the node's queue (its cap slot is freed)
    maps: dict[str, int] | None = None

    @classmethod
    def of(cls, out: list[Any]) -> Completion:
        maps = json.loads(text(out[6])) if len(out) > 6 and out[6] else None
        return cls(int(out[0]), int(out[1]), text(out[2]), text(out[3]), maps)


class Recovery(NamedTuple):
    """recover.lua: 1 a new attempt | 2 recoveries used up (failed) | 0 moved on."""

    code: int
    released: int
    state: str

    @classmethod
    def of(cls, out: list[Any]) -> Recovery:
        return cls(int(out[0]), int(out[1]), text(out[2]))


class Started(NamedTuple):
    """start.lua: 1 the body may run, with its context; other codes in
    codes.START_REASONS."""

    code: int
    context: dict[str, Any]
    overlay: dict[str, Any] | None


class Change(NamedTuple):
    """A change transition (cancel, pause, retry, remove_dependency, ignore_failure,
    add_node): its report (JSON) or the reason of a refusal, the flow's state and the
    script's extra values (cancel: the task ids of started nodes)."""

    code: int
    payload: str
    state: str
    extra: list[Any]

    @classmethod
    def of(cls, out: list[Any]) -> Change:
        return cls(int(out[0]), text(out[1]), text(out[2]), list(out[3:]))


class Admission(NamedTuple):
    """admit.lua: admitted (``at`` is the Redis time of the release), or refused by
    ``refused_by`` for ``wait`` seconds (0: until a slot frees or it is its turn)."""

    admitted: bool
    at: float
    wait: float
    refused_by: str


class FairHead(NamedTuple):
    """fair_head.lua: the member a limiter's releaser tries next and its share unit
    ('' for one of an old single wait queue), or none (``member`` None) and ``wake``, the
    seconds until a parked flow's turn comes back (None when none is parked)."""

    member: str | None
    unit: str
    wake: float | None


class Published(NamedTuple):
    """One published node, as published.lua acknowledges it."""

    node_id: str
    attempt: int
    queue: str
    task_id: str
    released_at: float | None  # when its limiters admitted it (None: no limiter)
    retries: int = 0  # the node's retry count its message was sent with


@dataclass(frozen=True)
class Marked(Generic[R]):
    """A transition run behind a dirty marker (``token``, cleared once its outbox is
    published) and followed by a claim in the same round trip."""

    token: str
    reply: R
    claim: Claim | None
