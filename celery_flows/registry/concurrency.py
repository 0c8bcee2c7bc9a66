"""The registry side of concurrency groups (SPEC section 12): the ``{conc}`` keys
(keys.py) and the scripts that decide a key's places (lua/global/conc_enqueue.lua,
conc_admit.lua) and start an admitted flow (lua/conc_start.lua). What to do with their
answers is engine/groups.py's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .connection import Connection
from .replies import text

__all__ = ["ConcurrencyStore", "KeyEntries", "Place"]

#: the meta fields a group's bookkeeping reads of each flow
_META_FIELDS = ("state", "cgen", "cwait", "cgroup", "ckey", "on_limit", "hidden")


class Place(NamedTuple):
    """conc_enqueue.lua's answer: ``admitted`` (``victim``: the flow cancel_oldest evicted,
    or ''), ``waiting`` at ``position`` (1-based), or ``cancel`` (cancel_newest)."""

    outcome: str
    position: int = 0
    victim: str = ""


class KeyEntries(NamedTuple):
    """One key of a group: the flows holding a place (with when they were admitted), the
    head of the line in order, how many wait in all, and the life each entry belongs
    to."""

    running: list[tuple[str, float]]
    line: list[str]
    queued: int
    lives: dict[str, str]


class ConcurrencyStore(Connection):
    def conc_enqueue(self, group: str, key: str, fid: str, gen: str, limit: int,
                     on_limit: str) -> Place:
        keys = [*self.keys.conc(group, key), self.keys.conc_evict, self.keys.conc_keys,
                self.keys.conc_seq]
        out = self._run_global("conc_enqueue", keys,
                               [fid, gen, limit, on_limit, f"{group}|{key}"])
        code = int(out[0])
        if code == 1:
            return Place("admitted", victim=text(out[1]))
        if code == 2:
            return Place("cancel")
        return Place("waiting", position=int(out[1]))

    def conc_admit(self, group: str, key: str, limit: int,
                   frees: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
        """Free the given (flow id, life) entries, then admit from the line while the key
        has places; returns the (flow id, life) admitted now."""
        keys = [*self.keys.conc(group, key), self.keys.conc_keys]
        args: list[Any] = [limit, f"{group}|{key}"]
        for fid, gen in frees:
            args += [fid, gen]
        out = self._run_global("conc_admit", keys, args)
        return [(text(out[i]), text(out[i + 1])) for i in range(0, len(out), 2)]

    def conc_start(self, fid: str, gen: str) -> tuple[int, str]:
        """conc_start.lua: (1 started | 0 nothing to do | 2 finished | < 0, flow state)."""
        out = self._run("conc_start", fid, [gen])
        return int(out[0]), text(out[1])

    def conc_group_keys(self) -> list[tuple[str, str]]:
        """Every (group, key) that has flows running or waiting."""
        out = []
        for raw in self.client.zrange(self.keys.conc_keys, 0, -1):
            group, _, key = text(raw).partition("|")
            out.append((group, key))
        return out

    def conc_entries(self, group: str, key: str, head: int) -> KeyEntries:
        """One key's entries, the line's first ``head`` only."""
        run, line, life = self.keys.conc(group, key)
        pipe = self.client.pipeline(transaction=False)
        pipe.zrange(run, 0, -1, withscores=True)
        pipe.zcard(line)
        if head > 0:
            pipe.zrange(line, 0, head - 1)
        running, queued, *rest = pipe.execute()
        waiting = [text(f) for f in (rest[0] if rest else [])]
        names = [text(f) for f, _s in running] + waiting
        lives = self.client.hmget(life, names) if names else []
        return KeyEntries([(text(f), float(s)) for f, s in running], waiting, int(queued),
                          {f: text(g) for f, g in zip(names, lives, strict=True)
                           if g is not None})

    def conc_counts(self, group: str, key: str) -> tuple[int, int]:
        """(running, waiting) of one key."""
        run, line, _ = self.keys.conc(group, key)
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(run)
        pipe.zcard(line)
        n_run, n_line = pipe.execute()
        return int(n_run), int(n_line)

    def conc_position(self, group: str, key: str, fid: str) -> int | None:
        """The flow's 1-based place in its key's line, None when not in it."""
        rank: Any = self.client.zrank(self.keys.conc(group, key)[1], fid)
        return None if rank is None else int(rank) + 1

    def conc_metas(self, fids: list[str]) -> list[dict[str, str] | None]:
        """The group fields of each flow's meta (None for a flow that is gone)."""
        if not fids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for fid in fids:
            pipe.hmget(self.keys.meta(fid), _META_FIELDS)
        out: list[dict[str, str] | None] = []
        for values in pipe.execute():
            if values[0] is None:
                out.append(None)
            else:
                out.append({k: text(v) for k, v in zip(_META_FIELDS, values, strict=True)
                            if v is not None})
        return out

    def conc_evicted(self) -> list[str]:
        return [text(f) for f in self.client.zrange(self.keys.conc_evict, 0, -1)]

    def conc_evict_done(self, fid: str) -> None:
        self.client.zrem(self.keys.conc_evict, fid)
