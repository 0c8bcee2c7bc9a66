"""The Lua scripts as sent to Redis, and the batches they are sent in.

Each flow transition in ``lua/`` is sent with the engine in front of it (the files of
``lua/engine/`` joined in the order of :data:`ENGINE_PARTS`; no include preprocessor),
and every script, the global ones in
``lua/global/`` included, inside the request wrapper of ``lua/_request.lua``: each call
carries a request key (keys.py), so a call redis-py re-sends after a connection error
returns the first answer instead of running the transition twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .ids import new_request_id

__all__ = ["CHUNK", "ENGINE_PARTS", "LUA_DIR", "NO_REQUEST", "REPLY_TTL", "Batch", "Sequential",
           "engine_text", "script_texts"]

LUA_DIR = Path(__file__).with_name("lua")

#: Seconds a transition's reply is kept for a re-sent call: well past redis-py's retry
#: window (8 tries with a backoff capped at 2 s, see connection.py) and a failover.
REPLY_TTL = 120

#: The bounded step of large transitions: nodes per step of a chunked change (a cancel
#: or retry of a flow with more nodes goes in steps), and half the edges one
#: script settles before it leaves the rest to the next claim (lua/engine/cache.lua
#: BUDGET), so that no script call blocks Redis for long; ``CELERY_FLOWS_CHUNK`` sets it
#: (the tests use small chunks).
CHUNK = int(os.environ.get("CELERY_FLOWS_CHUNK", "") or 25)
#: Scripts whose kept answer is the ids of the entries they claimed (lua/_request.lua)
REPLAY_ENTRIES = frozenset({"claim"})
REPLAY_CLAIMED = frozenset({"complete"})
_TRANSITION = "-- @transition\n"
#: The request id of a call that must write nothing, not even its reply (dry runs)
NO_REQUEST = ""


#: The parts of the Lua engine (``lua/engine/<part>.lua``) in the order they are joined:
#: a part uses only what the parts before it define (Lua locals exist from their
#: definition on). Each file's header says what it owns and what it uses.
ENGINE_PARTS = ("constants", "cache", "flow", "evaluate", "cancel", "settle", "scan",
                "reopen", "claim", "piece")


def engine_text() -> str:
    """The engine every flow transition runs on, as one Lua text."""
    return "".join((LUA_DIR / "engine" / f"{part}.lua").read_text() for part in ENGINE_PARTS)


def script_texts(events_maxlen: int = 100000) -> dict[str, str]:
    """Every script as sent to Redis: the flow transitions with the engine in front,
    the global ones without it, all inside the request wrapper (lua/_request.lua).
    ``events_maxlen`` (``flows_events_maxlen``) is written into the text: the event
    streams' approximate length (lua/engine/cache.lua)."""
    head, tail = (LUA_DIR / "_request.lua").read_text().split(_TRANSITION)
    engine = engine_text()

    def wrap(name: str, body: str, prelude: str = "") -> str:
        flags = f"local REPLY_TTL, STEP, REPLAY_ENTRIES, REPLAY_CLAIMED = {REPLY_TTL}, " \
                f"{CHUNK}, " \
                f"{'true' if name in REPLAY_ENTRIES else 'false'}, " \
                f"{'true' if name in REPLAY_CLAIMED else 'false'}\n" \
                f"local EVENTS_MAXLEN = {int(events_maxlen)}\n"
        return (f"{flags}{head}{prelude}\nlocal function transition()\n{body}\nend\n"
                f"{tail}")

    return {
        p.stem: wrap(p.stem, p.read_text(), engine)
        for p in sorted(LUA_DIR.glob("*.lua"))
        if not p.name.startswith("_")
    } | {
        # scripts on global keys: no engine
        p.stem: wrap(p.stem, p.read_text())
        for p in sorted((LUA_DIR / "global").glob("*.lua"))
    }


class Batch:
    """A pipeline (or :class:`Sequential`) whose scripts get request ids that stay the
    same when the batch is built again after NOSCRIPT, so that what already ran there
    answers from its kept reply."""

    def __init__(self, pipe: Any, ids: list[str]) -> None:
        self.pipe = pipe
        self._ids = ids
        self._used = 0
        self.noted: set[str] = set()  # flows whose events are noted (Connection._queue)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def request_id(self) -> str:
        if self._used == len(self._ids):
            self._ids.append(new_request_id())
        self._used += 1
        return self._ids[self._used - 1]


class Sequential:
    """Stands in for a pipeline on Redis Cluster, where redis-py refuses scripts in
    pipelines: the same commands, sent one by one in order."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))

        return record

    def execute(self) -> list[Any]:
        return [getattr(self.client, name)(*args, **kwargs) for name, args, kwargs in self.calls]
