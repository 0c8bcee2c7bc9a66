"""The only Python caller of the Lua transitions, and the registry's read side.

Each transition in ``lua/`` is loaded once per client with the engine in front of it
(the files of ``lua/engine/`` joined in the order of :data:`ENGINE_PARTS`; no include
preprocessor), and every script, the global ones in ``lua/global/`` included, inside
the request wrapper of ``lua/_request.lua``: each call carries a request key (keys.py),
so a call redis-py re-sends after a connection error returns the first answer instead
of running the transition twice. Negative return codes map to exceptions in
:data:`ERRORS`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlparse

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import faults  # also applies a test clock skew before anything reads time
from .codec import Codec
from .config import FlowsConfig
from .errors import FlowNotFoundError, FlowsError, FlowVersionError
from .keys import Keys, new_request_id
from .models import as_list

LUA_DIR = Path(__file__).with_name("lua")
CLOCK_REFRESH = 30.0  # seconds between measurements of the offset to Redis TIME
INDEX_GRACE = 30.0  # an index entry this young may belong to a flow being created

#: Seconds a transition's reply is kept for a re-sent call: well past redis-py's retry
#: window (8 tries with a backoff capped at 2 s, see Store.client) and a failover.
REPLY_TTL = 120
#: Scripts whose kept answer is the ids of the entries they claimed (lua/_request.lua)
REPLAY_ENTRIES = frozenset({"claim"})
_TRANSITION = "-- @transition\n"
#: The request id of a call that must write nothing, not even its reply (dry runs)
NO_REQUEST = ""

ERRORS: dict[int, tuple[type[FlowsError], str]] = {
    -1: (FlowNotFoundError, "flow {fid!r} does not exist (never created, or expired)"),
    -2: (FlowVersionError, "flow {fid!r} has a record format this version of celery-flows "
                           "does not understand; upgrade celery-flows on this process"),
    -4: (FlowNotFoundError, "flow {fid!r} has no such node"),
}


def check_code(code: int, fid: str) -> None:
    if code in ERRORS:
        exc, msg = ERRORS[code]
        raise exc(msg.format(fid=fid))


def to_redis_py_url(url: str) -> str:
    """kombu's ``redis+socket:///path?virtual_host=N`` as redis-py's ``unix://``."""
    if url.startswith("redis+socket://"):
        parsed = urlparse(url)
        query = parse_qs(parsed.query)
        db = query.get("virtual_host", query.get("db", ["0"]))[0] or "0"
        return f"unix://{parsed.path}?db={db}"
    return url


def _create_argv(meta: dict[str, str], digest: str,
                 nodes: list[tuple[str, dict[str, Any], bytes]],
                 blobs: Sequence[tuple[str, bytes]] = ()) -> list[Any]:
    argv: list[Any] = [json.dumps(meta), digest, len(nodes)]
    for nid, rec, blob in nodes:
        argv += [nid, json.dumps(rec), blob]
    argv.append(len(blobs))
    for field, blob in blobs:
        argv += [field, blob]
    return argv


def _b(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Batch:
    """A pipeline (or :class:`_Sequential`) whose scripts get request ids that stay the
    same when the batch is built again after NOSCRIPT, so that what already ran there
    answers from its kept reply."""

    def __init__(self, pipe: Any, ids: list[str]) -> None:
        self.pipe = pipe
        self._ids = ids
        self._used = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def request_id(self) -> str:
        if self._used == len(self._ids):
            self._ids.append(new_request_id())
        self._used += 1
        return self._ids[self._used - 1]


class _Sequential:
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


#: The parts of the Lua engine (``lua/engine/<part>.lua``) in the order they are joined:
#: a part uses only what the parts before it define (Lua locals exist from their
#: definition on). Each file's header says what it owns and what it uses.
ENGINE_PARTS = ("constants", "cache", "flow", "evaluate", "cancel", "settle", "reopen")


def engine_text() -> str:
    """The engine every flow transition runs on, as one Lua text."""
    return "".join((LUA_DIR / "engine" / f"{part}.lua").read_text() for part in ENGINE_PARTS)


def script_texts() -> dict[str, str]:
    """Every script as sent to Redis: the flow transitions with the engine in front,
    the global ones without it, all inside the request wrapper (lua/_request.lua)."""
    head, tail = (LUA_DIR / "_request.lua").read_text().split(_TRANSITION)
    engine = engine_text()

    def wrap(name: str, body: str, prelude: str = "") -> str:
        flags = f"local REPLY_TTL, REPLAY_ENTRIES = {REPLY_TTL}, " \
                f"{'true' if name in REPLAY_ENTRIES else 'false'}\n"
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


class Claim(NamedTuple):
    """What claim.lua returned: see its header."""

    code: int
    left: int
    nonce: str
    flow_rate: str
    next_due: float | None
    webhook_pending: bool
    entries: list[Any]

    @classmethod
    def of(cls, out: list[Any]) -> Claim:
        due = _s(out[4])
        return cls(int(out[0]), int(out[1]), _s(out[2]), _s(out[3]),
                   float(due) if due else None, _s(out[5]) == "1", list(out[6:]))


class Store:
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

    @cached_property
    def _scripts(self) -> dict[str, Any]:
        return {name: self.client.register_script(text) for name, text in script_texts().items()}

    def sha(self, name: str) -> str:
        """The SHA1 of a script as sent to Redis (EVALSHA)."""
        return str(self._scripts[name].sha)

    def _flow_keys(self, fid: str, request_id: str) -> list[str]:
        keys = self.keys.flow(fid)
        return [*keys, self.keys.request(keys[0], request_id)]

    def run(self, name: str, fid: str, args: Sequence[Any], *, dry_run: bool = False) -> Any:
        """One flow transition; ``dry_run`` keeps no reply (the script writes nothing)."""
        rid = NO_REQUEST if dry_run else new_request_id()
        return self._scripts[name](keys=self._flow_keys(fid, rid), args=list(args))

    def run_global(self, name: str, keys: list[str], args: Sequence[Any]) -> Any:
        """A script of ``lua/global/``: its reply is kept beside ``keys[0]``."""
        request = self.keys.request(keys[0], new_request_id())
        return self._scripts[name](keys=[*keys, request], args=list(args))

    def drop_empty_wait(self, limiter_id: str) -> None:
        """Forget a limiter in the waits index once its queue is empty (checked in one
        transaction so a member added meanwhile keeps it listed)."""
        key, index = self.keys.wait_queue(limiter_id), self.keys.waits
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                if pipe.zcard(key) == 0:
                    pipe.multi()
                    pipe.srem(index, limiter_id)
                    pipe.execute()
            except redis.WatchError:
                pass

    def hold(self, fid: str, nid: str, attempt: int, member: str, limiter_id: str,
             wait: float) -> int:
        return int(self.run("hold", fid, [nid, attempt, member, limiter_id, wait]))

    def _queue(self, pipe: Any, name: str, fid: str, args: Sequence[Any]) -> None:
        rid = pipe.request_id() if isinstance(pipe, _Batch) else new_request_id()
        keys = self._flow_keys(fid, rid)
        pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)

    def _execute(self, build: Callable[[Any], None]) -> list[Any]:
        """One round trip for several commands (scripts by SHA). After NOSCRIPT (a
        restarted Redis) the whole batch is re-sent with the same request ids: the
        commands are idempotent and the scripts that ran answer from their kept reply."""
        ids: list[str] = []
        for _ in range(3):
            pipe: Any = _Batch(_Sequential(self.client) if self.config.redis_cluster
                               else self.client.pipeline(transaction=False), ids)
            build(pipe)
            try:
                return list(pipe.execute())
            except redis.exceptions.NoScriptError:
                for script in self._scripts.values():
                    self.client.script_load(script.script)
        raise redis.exceptions.NoScriptError("scripts could not be loaded")

    # -- transitions ------------------------------------------------------------------

    def create_many(self, flows: list[tuple[str, dict[str, str], str,
                                            list[tuple[str, dict[str, Any], bytes]],
                                            list[tuple[str, bytes]]]]
                    ) -> list[int]:
        """Create several flows (create.lua codes): in one MULTI/EXEC on a single
        Redis, one by one on a cluster. add_bulk creates them hidden (batch.py), so a
        reader sees none of them either way until the batch is committed."""
        if not flows:
            return []
        script = self._scripts["create"]
        if self.config.redis_cluster:
            codes = []
            for fid, meta, digest, nodes, blobs in flows:
                codes.append(int(script(keys=self._flow_keys(fid, new_request_id()),
                                        args=_create_argv(meta, digest, nodes, blobs))))
                faults.point("bulk-created")
            return codes
        pipe = self.client.pipeline(transaction=True)
        for fid, meta, digest, nodes, blobs in flows:
            script(keys=self._flow_keys(fid, new_request_id()),
                   args=_create_argv(meta, digest, nodes, blobs), client=pipe)
        codes = [int(c) for c in pipe.execute()]
        for _ in codes:
            faults.point("bulk-created")
        return codes

    # -- add_bulk batches (see batch.py) ------------------------------------------------

    def batch_open(self, batch_id: str, fids: list[str]) -> None:
        # the record first: the sweeper finds a batch by its index entry and then
        # needs the record to know its flows
        self.run_global("batch", [self.keys.batch(batch_id)], ["open", json.dumps(fids)])
        self.client.zadd(self.keys.batches, {batch_id: self.now()})

    def batch_decide(self, batch_id: str, op: str, grace: float = 0.0) -> str:
        """'commit', 'abort' or 'expire' a pending batch; returns its state after."""
        return _s(self.run_global("batch", [self.keys.batch(batch_id)], [op, grace]))

    def batch_record(self, batch_id: str) -> tuple[str, list[str]]:
        raw = self.client.hmget(self.keys.batch(batch_id), ["state", "flows"])
        return (_s(raw[0]) if raw[0] else "", json.loads(raw[1]) if raw[1] else [])

    def batch_age(self, batch_id: str) -> float:
        created = self.client.hget(self.keys.batch(batch_id), "created")
        return self.time() - float(created) if created else float("inf")

    def batch_ids(self, limit: int = 100) -> list[str]:
        return [_s(m) for m in self.client.zrange(self.keys.batches, 0, limit - 1)]

    def batch_forget(self, batch_id: str) -> None:
        self.client.zrem(self.keys.batches, batch_id)
        self.client.delete(self.keys.batch(batch_id))

    def hidden_by(self, fid: str) -> str | None:
        """The batch a stored flow is hidden by, if any (whatever that batch's state)."""
        raw = self.client.hget(self.keys.meta(fid), "hidden")
        return _s(raw) if raw else None

    def unhide(self, fid: str, batch_id: str) -> int:
        return int(self.run("unhide", fid, [batch_id]))

    def discard(self, fid: str, batch_id: str) -> int:
        return int(self.run("discard", fid, [batch_id]))

    def claim(self, fid: str, lease: float, limit: int, node_ids: Sequence[str] = (),
              eager: bool = False) -> Claim:
        """``eager``: the eager driver's claim, the only one an eager flow accepts."""
        paths = "eager" if eager else self.want_paths
        return Claim.of(self.run("claim", fid, [lease, limit, paths, *node_ids]))

    def mark_and_claim(self, fid: str, lease: float, node_ids: Sequence[str]
                       ) -> tuple[str, Claim]:
        """Mark the flow dirty and claim the given outbox entries in one round trip."""
        token = f"{fid}|{uuid.uuid4().hex[:12]}"

        def build(pipe: Any) -> None:
            pipe.zadd(self.keys.dispatch, {token: self.now()})
            self._queue(pipe, "claim", fid, [lease, len(node_ids), self.want_paths, *node_ids])

        return token, Claim.of(self._execute(build)[1])

    @property
    def want_paths(self) -> str:
        """Ask claim.lua for longest paths when any shared limit may hold nodes."""
        return "1" if self.config.rate_limits or self.config.queue_limits else ""

    def published(self, fid: str, items: list[tuple[str, int, str, str, float | None]],
                  clear_token: str | None = None, track: bool = True) -> None:
        """Acknowledge published nodes, track their messages until a worker starts them
        (see recovery.rescue_stranded) and clear a dirty marker, in one round trip."""
        argv: list[Any] = []
        for nid, attempt, queue, task_id, released in items:
            argv += [nid, attempt, queue, "" if released is None else repr(released), task_id]
        now = self.now()

        def build(pipe: Any) -> None:
            if argv:
                self._queue(pipe, "published", fid, argv)
                if track:
                    pipe.zadd(self.keys.queued, {item[3]: now for item in items})
            if clear_token is not None:
                pipe.zrem(self.keys.dispatch, clear_token)

        if argv or clear_token is not None:
            self._execute(build)

    def complete_and_claim(self, fid: str, nid: str, attempt: int, outcome: str,
                           result: bytes, error: str, lease: float, limit: int,
                           external: bool = False, drop_lease: tuple[str, str] | None = None,
                           falsy: bool = False
                           ) -> tuple[str, tuple[int, int, str, str], Claim]:
        """Mark the flow dirty, record the outcome, claim what it made ready and drop
        the recording worker's lease, in one round trip (in this order on the server)."""
        token = f"{fid}|{uuid.uuid4().hex[:12]}"

        def build(pipe: Any) -> None:
            pipe.zadd(self.keys.dispatch, {token: self.now()})
            self._queue(pipe, "complete", fid,
                        [nid, attempt, outcome, result, error, "1" if external else "", "",
                         "0" if falsy else ""])
            self._queue(pipe, "claim", fid, [lease, limit, self.want_paths])
            if drop_lease is not None:
                pipe.zrem(self.keys.leases(drop_lease[0]), drop_lease[1])

        out = self._execute(build)
        done, claim = out[1], out[2]
        return token, (int(done[0]), int(done[1]), _s(done[2]), _s(done[3])), Claim.of(claim)

    def recover_and_claim(self, fid: str, nid: str, attempt: int, max_recoveries: int,
                          error: str, lost_instance: str, lease: float, limit: int
                          ) -> tuple[str, tuple[int, int, str], Claim]:
        token = f"{fid}|{uuid.uuid4().hex[:12]}"

        def build(pipe: Any) -> None:
            pipe.zadd(self.keys.dispatch, {token: self.now()})
            self._queue(pipe, "recover", fid,
                        [nid, attempt, max_recoveries, error, lost_instance])
            self._queue(pipe, "claim", fid, [lease, limit, self.want_paths])

        _z, done, claim = self._execute(build)
        return token, (int(done[0]), int(done[1]), _s(done[2])), Claim.of(claim)

    def create_marked(self, fid: str, meta: dict[str, str], digest: str,
                      nodes: list[tuple[str, dict[str, Any], bytes]],
                      claim: tuple[float, int] | None = None,
                      blobs: Sequence[tuple[str, bytes]] = ()
                      ) -> tuple[str, int, Claim | None]:
        """Index the flow, mark it dirty, create it and (given ``(lease, limit)``) claim
        its roots, in one round trip. ``blobs`` are user data for the args hash."""
        token = f"{fid}|{uuid.uuid4().hex[:12]}"
        argv = _create_argv(meta, digest, nodes, blobs)
        now = self.now()

        def build(pipe: Any) -> None:
            pipe.zadd(self.keys.index, {fid: now}, nx=True)
            pipe.zadd(self.keys.dispatch, {token: now})
            self._queue(pipe, "create", fid, argv)
            if claim is not None:
                self._queue(pipe, "claim", fid, [*claim, self.want_paths])

        out = self._execute(build)
        return token, int(out[2]), Claim.of(out[3]) if claim is not None else None

    def start(self, fid: str, nid: str, attempt: int, start_key: str, task_id: str,
              worker: str, instance: str = "") -> tuple[int, dict[str, Any], dict[str, Any] | None]:
        def build(pipe: Any) -> None:
            self._queue(pipe, "start", fid, [nid, attempt, start_key, task_id, worker, instance])
            pipe.zrem(self.keys.queued, task_id)

        out = self._execute(build)[0]
        code = int(out[0])
        if code != 1:
            return code, {}, None
        ctx = self.codec.load_context(out[1])
        overlay = self.codec.load_context(out[2])
        return code, ctx, overlay or None

    def complete(self, fid: str, nid: str, attempt: int, outcome: str,
                 result: bytes = b"", error: str = "", retry_delay: float | None = None,
                 external: bool = False, falsy: bool = False
                 ) -> tuple[int, int, str, str]:
        """Record an outcome. A retry held in Redis (``retry_delay``) also sets a timer
        for the releaser, in the same round trip."""
        delay: Any = "" if retry_delay is None else max(float(retry_delay), 0.0)
        now = self.now() if delay != "" else 0.0

        def build(pipe: Any) -> None:
            self._queue(pipe, "complete", fid, [nid, attempt, outcome, result, error,
                                                "1" if external else "", delay,
                                                "0" if falsy else ""])
            if delay != "":
                pipe.zadd(self.keys.timers, {fid: now + float(delay)}, lt=True)

        out = self._execute(build)[0]
        return int(out[0]), int(out[1]), _s(out[2]), _s(out[3])

    def set_timer(self, fid: str, due: float) -> None:
        """Drain this flow's outbox at ``due`` (keeps an earlier timer)."""
        self.client.zadd(self.keys.timers, {fid: due}, lt=True)

    def due_timers(self, limit: int = 100) -> tuple[list[str], float | None]:
        """Timers due now, and when the next one is due (Redis time)."""
        now = self.now()
        due = [_s(m) for m in self.client.zrangebyscore(self.keys.timers, "-inf", now,
                                                          start=0, num=limit)]
        nxt = self.client.zrange(self.keys.timers, 0, 0, withscores=True)
        return due, (float(nxt[0][1]) if nxt else None)

    def change(self, name: str, fid: str, args: Sequence[Any], *, dry_run: bool,
               claim: tuple[float, int] | None = None
               ) -> tuple[int, str, str, list[Any], str | None, Claim | None]:
        """Run a change transition (see the headers of cancel.lua, pause.lua, retry.lua,
        remove_dependency.lua, ignore_failure.lua, add_node.lua). Unless ``dry_run``,
        the flow is marked dirty first and (given ``(lease, limit)``) claimed after, in
        the same round trip. Returns (code, report-or-reason, state, extra, token, claim).
        """
        argv = [*args, "1" if dry_run else ""]
        if dry_run:
            out = self.run(name, fid, argv, dry_run=True)
            return int(out[0]), _s(out[1]), _s(out[2]), list(out[3:]), None, None
        token = f"{fid}|{uuid.uuid4().hex[:12]}"

        def build(pipe: Any) -> None:
            pipe.zadd(self.keys.dispatch, {token: self.now()})
            self._queue(pipe, name, fid, argv)
            if claim is not None:
                self._queue(pipe, "claim", fid, [*claim, self.want_paths])

        res = self._execute(build)
        out = res[1]
        return (int(out[0]), _s(out[1]), _s(out[2]), list(out[3:]), token,
                Claim.of(res[2]) if claim is not None else None)

    def progress(self, fid: str, nid: str, attempt: int, pct: float | None, msg: str) -> int:
        return int(self.run("progress", fid, [nid, attempt, "" if pct is None else pct, msg]))

    # -- the dispatch outbox index (a global key: its own slot) -----------------------

    def mark_dirty(self, fid: str) -> str:
        token = f"{fid}|{uuid.uuid4().hex[:12]}"
        self.client.zadd(self.keys.dispatch, {token: self.now()})
        return token

    def clear_dirty(self, token: str) -> None:
        self.client.zrem(self.keys.dispatch, token)

    def stale_dirty(self, older_than: float, limit: int = 200) -> list[str]:
        raw = self.client.zrangebyscore(self.keys.dispatch, "-inf", self.now() - older_than,
                                        start=0, num=limit)
        return [_s(m) for m in raw]

    # -- workers and leases (global keys) --------------------------------------------

    def heartbeat(self, instance: str, info: dict[str, Any]) -> float:
        keys = [self.keys.workers, self.keys.worker_info]
        return float(_s(self.run_global("heartbeat", keys, [instance, json.dumps(info)])))

    def lease_add(self, instance: str, task_id: str) -> None:
        self.client.zadd(self.keys.leases(instance), {task_id: self.now()})

    def lease_drop(self, instance: str, task_id: str) -> None:
        self.client.zrem(self.keys.leases(instance), task_id)

    def leases(self, instance: str, older_than: float | None = None) -> list[str]:
        top = "+inf" if older_than is None else self.now() - older_than
        return [_s(m) for m in self.client.zrangebyscore(self.keys.leases(instance), "-inf", top)]

    def lost_instances(self, lease_timeout: float) -> list[str]:
        now = self.time()
        raw = self.client.zrangebyscore(self.keys.workers, "-inf", now - lease_timeout)
        return [_s(m) for m in raw]

    def workers(self) -> dict[str, tuple[float, dict[str, Any]]]:
        beats: list[Any] = list(self.client.zrange(self.keys.workers, 0, -1, withscores=True))
        info = self.client.hgetall(self.keys.worker_info)
        decoded = {_s(k): json.loads(v) for k, v in info.items()}
        return {_s(pair[0]): (float(pair[1]), decoded.get(_s(pair[0]), {})) for pair in beats}

    def forget_instance(self, instance: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self.keys.leases(instance))
        pipe.zrem(self.keys.workers, instance)
        pipe.hdel(self.keys.worker_info, instance)
        pipe.delete(self.keys.recovering(instance))
        pipe.execute()

    def lock_instance(self, instance: str, seconds: int = 60) -> bool:
        return bool(self.client.set(self.keys.recovering(instance), "1", nx=True, ex=seconds))

    def index_add(self, fid: str, created: float) -> None:
        self.client.zadd(self.keys.index, {fid: created}, nx=True)

    # -- reads ------------------------------------------------------------------------

    def time(self) -> float:
        """Redis ``TIME`` (one round trip)."""
        secs, micros = self.client.time()
        return secs + micros / 1e6

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

    def meta(self, fid: str) -> dict[str, str] | None:
        raw = self.client.hgetall(self.keys.meta(fid))
        if not raw:
            return None
        meta = {_s(k): _s(v) for k, v in raw.items()}
        # a flow of an add_bulk batch exists for readers once its batch is committed
        if "hidden" in meta and self.batch_record(meta["hidden"])[0] != "committed":
            return None
        return meta

    def require_meta(self, fid: str) -> dict[str, str]:
        meta = self.meta(fid)
        if meta is None:
            check_code(-1, fid)
        assert meta is not None
        if not meta.get("v", "").startswith("1."):
            check_code(-2, fid)
        return meta

    def nodes(self, fid: str) -> dict[str, dict[str, Any]]:
        raw = self.client.hgetall(self.keys.nodes(fid))
        decoded = sorted(((json.loads(v), _s(k)) for k, v in raw.items()),
                         key=lambda item: (item[0].get("seq", 0), item[1]))
        out = {nid: rec for rec, nid in decoded}
        for rec in out.values():
            for name in ("after", "deps_of", "removed", "task_ids", "starts", "progress",
                         "history"):
                rec[name] = as_list(rec.get(name))
        return out

    def node(self, fid: str, nid: str) -> dict[str, Any] | None:
        raw = self.client.hget(self.keys.nodes(fid), nid)
        return json.loads(raw) if raw else None

    def results(self, fid: str, ids: list[str] | None = None) -> dict[str, bytes]:
        key = self.keys.results(fid)
        if ids is None:
            return {_s(k): _b(v) for k, v in self.client.hgetall(key).items()}
        if not ids:
            return {}
        values = self.client.hmget(key, ids)
        return {i: _b(v) for i, v in zip(ids, values, strict=True) if v is not None}

    def flow_ids(self, limit: int = 1000, start: int = 0) -> list[str]:
        """Flow ids of the index, newest first: ``limit`` of them from rank ``start``
        (always a bounded read: the index may hold millions)."""
        if limit < 1:
            return []
        return [_s(m) for m in self.client.zrevrange(self.keys.index, start,
                                                     start + limit - 1)]

    def flow_summaries(self, start: int, count: int
                       ) -> tuple[list[tuple[str, dict[str, str] | None]], bool]:
        """One page of the index, newest first, with each flow's name, state and
        counters (None once expired), and whether the index goes on past it."""
        ids = self.flow_ids(count, start)
        fields = ("name", "state", "done", "total", "created_at")
        pipe = self.client.pipeline(transaction=False)
        for fid in ids:
            pipe.hmget(self.keys.meta(fid), fields)
        out: list[tuple[str, dict[str, str] | None]] = []
        for fid, values in zip(ids, pipe.execute() if ids else [], strict=True):
            if values is None or values[1] is None:
                out.append((fid, None))
            else:
                out.append((fid, {k: _s(v) for k, v in zip(fields, values, strict=True)
                                  if v is not None}))
        return out, len(ids) == count

    def prune_index(self, cursor: int = 0, chunk: int = 200) -> tuple[int, int]:
        """Drop index entries of expired flows, ``chunk`` entries at a time, oldest
        first; returns (entries removed, cursor for the next call; 0 = start over).
        Entries younger than INDEX_GRACE are left: their flow may still be being
        created (the index is written just before the flow)."""
        index = self.keys.index
        raw: list[Any] = list(self.client.zrange(index, cursor, cursor + chunk - 1,
                                                 withscores=True))
        if not raw:
            return 0, 0
        old_enough = self.now() - INDEX_GRACE
        ids = [_s(m) for m, score in raw if float(score) < old_enough]
        pipe = self.client.pipeline(transaction=False)
        for fid in ids:
            pipe.exists(self.keys.meta(fid))
        gone = [fid for fid, n in zip(ids, pipe.execute() if ids else [], strict=True)
                if not n]
        if gone:
            self.client.zrem(index, *gone)
        if len(raw) < chunk or len(ids) < len(raw):
            return len(gone), 0  # the end, or the young entries: start over
        return len(gone), cursor + chunk - len(gone)
