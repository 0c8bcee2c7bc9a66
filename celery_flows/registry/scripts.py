"""The Lua scripts as sent to Redis, and the batches they are sent in.

Each flow transition in ``lua/`` is sent with the engine definitions it uses in front
of it (picked from the files of ``lua/engine/`` in the order of :data:`ENGINE_PARTS`,
without their comments: :func:`engine_for`; no include preprocessor), and every
script, the global ones in ``lua/global/`` included, inside the request wrapper of
``lua/_request.lua``: each call carries a request key (keys.py), so a call redis-py
re-sends after a connection error returns the first answer instead of running the
transition twice.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

from .ids import new_request_id

__all__ = ["CHUNK", "ENGINE_PARTS", "LUA_DIR", "NO_REQUEST", "REPLY_TTL", "WIDE", "Batch",
           "Sequential", "engine_for", "engine_text", "script_texts"]

LUA_DIR = Path(__file__).with_name("lua")

#: Seconds a transition's reply is kept for a re-sent call: well past redis-py's retry
#: window (8 tries with a backoff capped at 2 s, see connection.py) and a failover.
REPLY_TTL = 120

#: The bounded step of large transitions: nodes per step of a chunked change (a cancel
#: or retry of a flow with more nodes goes in steps), and half the edges one
#: script settles before it leaves the rest to the next claim (lua/engine/cache.lua
#: BUDGET), so that no script call blocks Redis for long; ``CELERY_FLOWS_CHUNK`` sets it
#: (the tests use small chunks). At 10, the longest script of a 20,000-node submit on an
#: idle Redis fell from 9.3 to 5.4 ms (published.lua acknowledging 2 * CHUNK nodes at
#: about 50 us each: 2.5 ms to 0.9 ms median), so the scripts stay under 10 ms on a
#: busy machine too (benchmarks/run.py SLOWLOG rows)
CHUNK = int(os.environ.get("CELERY_FLOWS_CHUNK", "") or 10)
#: A node with more dependencies than this is evaluated in steps, one per claim
#: (lua/engine/scan.lua): reading a dependency's record costs some 6 us, so a
#: 20,000-wide fan-in read at once blocked Redis for about 0.35 s
#: (benchmarks/chunk_slowlog.py fan-in)
WIDE = 4 * CHUNK
#: Scripts whose kept answer is the ids of the entries they claimed (lua/_request.lua)
REPLAY_ENTRIES = frozenset({"claim"})
REPLAY_CLAIMED = frozenset({"complete"})
#: Global scripts that use the fair wait queues (lua/fair/share.lua goes in front)
FAIR_SCRIPTS = frozenset({"admit", "fair_head", "fair_drop"})
_TRANSITION = "-- @transition\n"
#: The request id of a call that must write nothing, not even its reply (dry runs)
NO_REQUEST = ""


#: The parts of the Lua engine (``lua/engine/<part>.lua``) in the order they are joined:
#: a part uses only what the parts before it define (Lua locals exist from their
#: definition on). Each file's header says what it owns and what it uses.
ENGINE_PARTS = ("constants", "ids", "cache", "flow", "evaluate", "cancel", "settle", "scan",
                "reopen", "claim", "piece", "publish")


def engine_text() -> str:
    """The whole engine, as one Lua text."""
    return "".join(_engine_parts().values())


@functools.cache
def _engine_parts() -> dict[str, str]:
    return {part: (LUA_DIR / "engine" / f"{part}.lua").read_text() for part in ENGINE_PARTS}


# a part's top-level definitions: "local function name" and "local a, b = ..."
_DEFINITION = re.compile(r"^local\s+(?:function\s+([A-Za-z_]\w*)|([A-Za-z_][\w\s,]*?)\s*=)",
                         re.M)
_NAME = re.compile(r"[A-Za-z_]\w*")


def _code(text: str) -> str:
    """Lua text without its comments (a name in a comment pulls in nothing)."""
    text = re.sub(r"--\[\[.*?\]\]", "", text, flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))


_CHUNK_START = re.compile(r"^local\s", re.M)


@functools.cache
def _engine_chunks() -> list[tuple[frozenset[str], str]]:
    """The engine's top-level definitions in order, comments left out: each ``local``
    statement at the start of a line with the lines up to the next one (a table's
    closing brace, a loop filling the table just defined), and the names it defines."""
    chunks: list[tuple[frozenset[str], str]] = []
    for text in _engine_parts().values():
        code = _code(text)
        starts = [m.start() for m in _CHUNK_START.finditer(code)]
        for a, b in zip(starts, [*starts[1:], len(code)], strict=True):
            piece = code[a:b].rstrip() + "\n"
            m = _DEFINITION.match(piece)
            if m is not None:
                names = [m.group(1)] if m.group(1) else m.group(2).split(",")
            else:  # a declaration without a value ("local FLOW_SEEN")
                names = piece.split(None, 1)[1].split(",")
            chunks.append((frozenset(n.strip() for n in names), piece))
    return chunks


def engine_for(body: str) -> str:
    """The engine definitions a transition uses, in engine order: those defining a name
    its code says, and what those use in turn. Every call of a script runs its whole
    prelude, defining each of its functions anew, so a script carries no definition
    it never reaches: the whole engine cost some 30 us of Redis time a call, start.lua
    48 us, 20 us with only the engine parts it used (measured with SLOWLOG on
    redis-server 6.2). Picking single definitions instead of parts took start.lua
    from 31 KB to 17 KB and complete.lua from 72 KB to 45 KB, and 5-15 % off their
    Redis time per call."""
    chunks = _engine_chunks()
    owner: dict[str, int] = {}
    for i, (names, _) in enumerate(chunks):
        for name in names:
            owner.setdefault(name, i)
    need: set[int] = set()
    todo = [_code(body)]
    while todo:
        for name in set(_NAME.findall(todo.pop())):
            at = owner.get(name)
            if at is not None and at not in need:
                need.add(at)
                todo.append(chunks[at][1])
    return "".join(piece for i, (_, piece) in enumerate(chunks) if i in need)


def script_texts(events_maxlen: int = 100000) -> dict[str, str]:
    """Every script as sent to Redis: the flow transitions with the engine in front,
    the global ones without it, all inside the request wrapper (lua/_request.lua).
    ``events_maxlen`` (``flows_events_maxlen``) is written into the text: the event
    streams' approximate length (lua/engine/cache.lua)."""
    head, tail = (LUA_DIR / "_request.lua").read_text().split(_TRANSITION)

    def wrap(name: str, body: str, prelude: str = "") -> str:
        flags = f"local REPLY_TTL, STEP, WIDE, REPLAY_ENTRIES, REPLAY_CLAIMED = " \
                f"{REPLY_TTL}, {CHUNK}, {WIDE}, " \
                f"{'true' if name in REPLAY_ENTRIES else 'false'}, " \
                f"{'true' if name in REPLAY_CLAIMED else 'false'}\n" \
                f"local EVENTS_MAXLEN = {int(events_maxlen)}\n"
        return (f"{flags}{head}{prelude}\nlocal function transition()\n{body}\nend\n"
                f"{tail}")

    fair = (LUA_DIR / "fair" / "share.lua").read_text()

    def engine(name: str, body: str) -> str:
        # a replayed completion claims again in the wrapper's tail (lua/_request.lua)
        return engine_for(body + ("\nclaim_entries" if name in REPLAY_CLAIMED else ""))

    return {
        p.stem: wrap(p.stem, p.read_text(), engine(p.stem, p.read_text()))
        for p in sorted(LUA_DIR.glob("*.lua"))
        if not p.name.startswith("_")
    } | {
        # scripts on global keys: no engine; the fair wait queues' helpers in front of
        # the scripts that use them
        p.stem: wrap(p.stem, p.read_text(),
                     fair if p.stem in FAIR_SCRIPTS else "")
        for p in sorted((LUA_DIR / "global").glob("*.lua"))
    }


class Batch:
    """A batch of commands (:class:`Sequential`) whose scripts get request ids that stay
    the same when the batch is built again after NOSCRIPT, so that what already ran
    there answers from its kept reply."""

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
    """A batch's commands, recorded in order and sent by :meth:`execute`."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))

        return record

    def execute(self, pipelined: bool = False) -> list[Any]:
        """Their replies. ``pipelined``: in one pipeline, unless there is only one (a
        pipeline around a single command cost some 25 us of client CPU a call, twice
        per node in a worker); otherwise one by one, as on Redis Cluster, where redis-py
        refuses scripts in pipelines."""
        if not pipelined or len(self.calls) == 1:
            return [getattr(self.client, name)(*args, **kwargs)
                    for name, args, kwargs in self.calls]
        pipe = self.client.pipeline(transaction=False)
        for name, args, kwargs in self.calls:
            getattr(pipe, name)(*args, **kwargs)
        return list(pipe.execute())
