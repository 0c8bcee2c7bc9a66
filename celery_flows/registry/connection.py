"""The registry's Redis connection: the client, its registered scripts, how calls are
sent (one by one, or batched in one round trip), and Redis time."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any
from urllib.parse import parse_qs, urlparse

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .. import faults  # noqa: F401  (applies a test clock skew before anything reads time)
from ..config import FlowsConfig
from .codec import Codec
from .ids import new_request_id
from .keys import Keys
from .scripts import NO_REQUEST, Batch, Sequential, script_texts

__all__ = ["CLOCK_REFRESH", "Connection", "to_redis_py_url"]

CLOCK_REFRESH = 30.0  # seconds between measurements of the offset to Redis TIME



#: The connection parameters that name one Redis database
_WHERE = ("host", "port", "path", "db")


def to_redis_py_url(url: str) -> str:
    """kombu's ``redis+socket:///path?virtual_host=N`` as redis-py's ``unix://``."""
    if url.startswith("redis+socket://"):
        parsed = urlparse(url)
        query = parse_qs(parsed.query)
        db = query.get("virtual_host", query.get("db", ["0"]))[0] or "0"
        return f"unix://{parsed.path}?db={db}"
    return url


class Connection:
    """The client and the scripts; the base of :class:`~celery_flows.registry.Store`."""

    def __init__(self, config: FlowsConfig, codec: Codec) -> None:
        self.config = config
        self.codec = codec  # decodes the contexts start.lua hands back
        self.keys = Keys(config.key_prefix)
        self._pid = os.getpid()
        # Redis TIME minus this process's monotonic clock, and when it was measured
        self._offset: float | None = None
        self._offset_at = 0.0

    @cached_property
    def client(self) -> redis.Redis:
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), 8)
        url = to_redis_py_url(self.config.redis_url)
        if self.config.redis_cluster:
            from .cluster import FailoverCluster

            return FailoverCluster.from_url(url, retry=retry)  # type: ignore[return-value]
        return redis.Redis.from_url(
            url,
            retry=retry,
            # a restarted Redis answers BUSY LOADING until its data is back
            retry_on_error=[redis.ConnectionError, redis.TimeoutError,
                            redis.exceptions.BusyLoadingError],
            health_check_interval=30,
        )

    def close(self) -> None:
        """Close the connections (they reopen on next use)."""
        if "client" in self.__dict__:
            self.client.close()
            del self.__dict__["client"]
            self.__dict__.pop("_scripts", None)

    @cached_property
    def _scripts(self) -> dict[str, Any]:
        return {name: self.client.register_script(text) for name, text in
                script_texts(self.config.events_maxlen).items()}

    def sha(self, name: str) -> str:
        """The SHA1 of a script as sent to Redis (EVALSHA)."""
        return str(self._scripts[name].sha)

    @property
    def inline(self) -> bool:
        """Whether flow scripts also write the global indexes themselves (GKEYS in
        lua/_request.lua): on a single Redis. On a cluster those keys live in other
        slots, so they are written by separate commands in the same round trip."""
        return not self.config.redis_cluster

    @property
    def want_paths(self) -> str:
        """Ask claim.lua for longest paths when any shared limit may hold nodes."""
        return "1" if self.config.rate_limits or self.config.queue_limits else ""

    def _claim_args(self, lease: float, limit: int) -> list[Any]:
        return [lease, limit, self.want_paths]

    def _flow_keys(self, fid: str, request_id: str) -> list[str]:
        keys = self.keys.flow(fid)
        return [*keys, self.keys.request(keys[0], request_id)]

    def _run(self, name: str, fid: str, args: Sequence[Any], *, dry_run: bool = False,
             note: bool = True) -> Any:
        """One flow transition; ``dry_run`` keeps no reply (the script writes nothing).
        ``note`` False: a script that writes no event (see :meth:`_note_events`)."""
        rid = NO_REQUEST if dry_run else new_request_id()
        if note and not dry_run:
            self._note_events(fid)
        keys = [*self._flow_keys(fid, rid), *self._events_key()]
        return self._scripts[name](keys=keys, args=list(args))

    def _note_events(self, fid: str) -> None:
        """On Redis Cluster, note the flow in the copy queue of its events (keys.py
        ``{events}:due``) *before* its script runs: a process that dies between the two
        leaves a note with nothing new behind it, never events without a note. The
        --flows workers copy the noted flows' events into the registry's stream
        (worker/eventcopy.py). On a single Redis the scripts write that stream
        themselves, and nothing is sent here."""
        if not self.inline:
            self.client.zadd(self.keys.events_due, {fid: self.now()})

    def _events_key(self) -> list[str]:
        """The registry's event stream, passed after every flow script's global keys on
        a single Redis (lua/_request.lua takes it off GKEYS); on a cluster it is of
        another slot, and the events go to the flow's own stream only (keys.py)."""
        return [self.keys.events] if self.inline else []

    def _run_global(self, name: str, keys: list[str], args: Sequence[Any]) -> Any:
        """A script of ``lua/global/``: its reply is kept beside ``keys[0]``."""
        request = self.keys.request(keys[0], new_request_id())
        return self._scripts[name](keys=[*keys, request], args=list(args))

    def _queue(self, pipe: Any, name: str, fid: str, args: Sequence[Any],
               gkeys: Sequence[str] = (), keep_reply: bool = True) -> None:
        """Queue a flow transition in ``pipe``; ``gkeys``: the global keys it also
        writes (only when :attr:`inline`). ``keep_reply`` False: a transition that is
        idempotent by itself and whose reply nobody reads keeps no request key."""
        if not keep_reply:
            rid = NO_REQUEST
        else:
            rid = pipe.request_id() if isinstance(pipe, Batch) else new_request_id()
        if not self.inline and not (isinstance(pipe, Batch) and fid in pipe.noted):
            # sent now, ahead of the batch (which goes out after this): see _note_events
            self._note_events(fid)
            if isinstance(pipe, Batch):
                pipe.noted.add(fid)
        keys = [*self._flow_keys(fid, rid), *gkeys,
                *self._events_key()]
        pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)

    def _execute(self, build: Callable[[Any], None]) -> list[Any]:
        """One round trip for several commands (scripts by SHA; Sequential.execute).
        After NOSCRIPT (a restarted Redis) the whole batch is re-sent with the same
        request ids: the commands are idempotent and the scripts that ran answer from
        their kept reply."""
        ids: list[str] = []
        for _ in range(3):
            calls = Sequential(self.client)
            build(Batch(calls, ids))
            try:
                return calls.execute(pipelined=not self.config.redis_cluster)
            except redis.exceptions.NoScriptError:
                for script in self._scripts.values():
                    self.client.script_load(script.script)
        raise redis.exceptions.NoScriptError("scripts could not be loaded")

    # -- time ---------------------------------------------------------------------------

    def time(self) -> float:
        """Redis ``TIME`` (one round trip)."""
        secs, micros = self.client.time()
        return float(secs) + float(micros) / 1e6

    def is_registry(self, connection_kwargs: dict[str, Any]) -> bool:
        """Whether a redis-py pool with these connection parameters (a broker's, a
        result backend's) reaches the registry's own Redis database."""
        mine = self.client.connection_pool.connection_kwargs
        return all(connection_kwargs.get(k) == mine.get(k) for k in _WHERE)

    def now(self) -> float:
        """Redis ``TIME`` without a round trip: scores compared with times written by
        other processes (or by the scripts, which read TIME) must not depend on this
        machine's clock. Kept as an offset from the monotonic clock (immune to wall
        clock steps), measured again every CLOCK_REFRESH seconds."""
        mono = time.monotonic()
        if self._offset is None or mono - self._offset_at > CLOCK_REFRESH:
            before = time.monotonic()
            redis_now = self.time()
            after = time.monotonic()
            self._offset = redis_now - (before + after) / 2
            self._offset_at = after
            mono = after
        return mono + self._offset
