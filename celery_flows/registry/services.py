"""The global keys the services of ``--flows`` workers share (keys.py lists them): the
dispatch index, timers, the queued-message index, webhooks, worker heartbeats and
leases, limiter state and wait queues. Plain commands, each safe to repeat."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import redis

from .connection import Connection
from .ids import is_queue_limiter, new_dirty_token, share_unit
from .replies import FairHead, text

__all__ = ["PARK_SECONDS", "Services"]

#: The longest a flow stays parked at a limiter (fair_head.lua) before that limiter
#: tries its node again: normally the limiter that holds the node releases it first.
PARK_SECONDS = 1.0


class Services(Connection):
    # -- the dispatch outbox index ------------------------------------------------------

    def mark_dirty(self, fid: str) -> str:
        token = new_dirty_token(fid)
        self.client.zadd(self.keys.dispatch, {token: self.now()})
        return token

    def clear_dirty(self, token: str) -> None:
        self.client.zrem(self.keys.dispatch, token)

    def stale_dirty(self, older_than: float, limit: int = 200) -> list[str]:
        raw = self.client.zrangebyscore(self.keys.dispatch, "-inf", self.now() - older_than,
                                        start=0, num=limit)
        return [text(m) for m in raw]

    # -- timers -------------------------------------------------------------------------

    def set_timer(self, fid: str, due: float) -> None:
        """Drain this flow's outbox at ``due`` (keeps an earlier timer)."""
        self.client.zadd(self.keys.timers, {fid: due}, lt=True)

    def due_timers(self, limit: int = 100) -> tuple[list[str], float | None]:
        """Timers due now, and when the next one is due (Redis time)."""
        now = self.now()
        due = [text(m) for m in self.client.zrangebyscore(self.keys.timers, "-inf", now,
                                                            start=0, num=limit)]
        nxt = self.client.zrange(self.keys.timers, 0, 0, withscores=True)
        return due, (float(nxt[0][1]) if nxt else None)

    def drop_timer(self, fid: str) -> None:
        self.client.zrem(self.keys.timers, fid)

    # -- published messages not yet started ---------------------------------------------

    def stale_queued(self, older_than: float, limit: int = 200) -> list[str]:
        raw = self.client.zrangebyscore(self.keys.queued, "-inf", self.now() - older_than,
                                        start=0, num=limit)
        return [text(m) for m in raw]

    def drop_queued(self, task_id: str) -> None:
        self.client.zrem(self.keys.queued, task_id)

    # -- webhooks -----------------------------------------------------------------------

    def queue_webhook(self, fid: str) -> None:
        """Due now, unless already queued (a retry keeps its time)."""
        self.client.zadd(self.keys.webhooks, {fid: self.now()}, nx=True)

    def due_webhooks(self, limit: int = 20) -> list[str]:
        raw = self.client.zrangebyscore(self.keys.webhooks, "-inf", self.now(), start=0,
                                        num=limit)
        return [text(m) for m in raw]

    def lock_webhook(self, fid: str, seconds: int) -> bool:
        return bool(self.client.set(self.keys.webhook_lock(fid), "1", nx=True, ex=seconds))

    def unlock_webhook(self, fid: str) -> None:
        self.client.delete(self.keys.webhook_lock(fid))

    def webhook_settled(self, fid: str, pending: str | None) -> None:
        """Dequeue the flow's webhook; ``pending`` (if given) is its final
        ``webhook_pending`` value: ``0`` delivered, ``refused``, ``gave-up``."""
        if pending is not None:
            self.client.hset(self.keys.meta(fid), "webhook_pending", pending)
        self.client.zrem(self.keys.webhooks, fid)

    def webhook_failed(self, fid: str, max_attempts: int, backoff: Callable[[int], float]
                       ) -> int:
        """Count a failed delivery and retry it after ``backoff(attempts)``, or give it
        up after ``max_attempts``; returns the attempts so far."""
        attempts = int(self.client.hincrby(self.keys.meta(fid), "webhook_attempts", 1))
        if attempts >= max_attempts:
            self.webhook_settled(fid, "gave-up")
        else:
            self.client.zadd(self.keys.webhooks, {fid: self.now() + backoff(attempts)},
                             xx=True)
        return attempts

    def webhook_note(self, fid: str, entry: dict[str, Any], keep: int = 20) -> None:
        """Append one delivery attempt to the flow's delivery log (meta
        ``webhook_log``, its last ``keep`` entries; shown by inspect and the dashboard)."""
        meta = self.keys.meta(fid)
        raw = self.client.hget(meta, "webhook_log")
        log = json.loads(raw) if raw else []
        log = [*log, entry][-keep:]
        self.client.hset(meta, "webhook_log", json.dumps(log))

    def node_events_to_post(self, fid: str, count: int = 100) -> list[tuple[str, str]]:
        """The oldest ``count`` node events waiting in the flow's delivery list
        (keys.py ``hooks``): (event id, the event as JSON without its id)."""
        out = []
        for raw in self.client.lrange(self.keys.hooks(fid), 0, count - 1):
            entry = json.loads(raw)
            out.append((text(entry["id"]), text(entry["e"])))
        return out

    def node_event_posted(self, fid: str) -> None:
        """The oldest waiting node event was posted (one deliverer per flow: the
        webhook lock)."""
        self.client.lpop(self.keys.hooks(fid))

    def webhook_due_again(self, fid: str) -> None:
        self.client.hset(self.keys.meta(fid), "webhook_pending", "1")
        self.queue_webhook(fid)

    def webhook_delivered(self, fid: str) -> None:
        """A delivery succeeded: the failures counted toward giving up start over (a
        flow that posts node events delivers many times over its life)."""
        self.client.hdel(self.keys.meta(fid), "webhook_attempts")

    # -- workers and leases -------------------------------------------------------------

    def lease_add(self, instance: str, task_id: str) -> None:
        self.client.zadd(self.keys.leases(instance), {task_id: self.now()})

    def lease_add_many(self, instance: str, task_ids: Iterable[str]) -> None:
        now = self.now()
        self.client.zadd(self.keys.leases(instance), dict.fromkeys(task_ids, now))

    def lease_drop(self, instance: str, task_id: str) -> None:
        self.client.zrem(self.keys.leases(instance), task_id)

    def leases(self, instance: str, older_than: float | None = None) -> list[str]:
        top = "+inf" if older_than is None else self.now() - older_than
        return [text(m) for m in self.client.zrangebyscore(self.keys.leases(instance), "-inf",
                                                             top)]

    def leased_by(self, instances: list[str], task_id: str) -> bool:
        """Whether one of these worker instances holds a lease on ``task_id``."""
        return any(self.client.zscore(self.keys.leases(i), task_id) is not None
                   for i in instances)

    def lost_instances(self, lease_timeout: float) -> list[str]:
        now = self.time()
        raw = self.client.zrangebyscore(self.keys.workers, "-inf", now - lease_timeout)
        return [text(m) for m in raw]

    def workers(self) -> dict[str, tuple[float, dict[str, Any]]]:
        beats: list[Any] = list(self.client.zrange(self.keys.workers, 0, -1, withscores=True))
        info = self.client.hgetall(self.keys.worker_info)
        decoded = {text(k): json.loads(v) for k, v in info.items()}
        return {text(pair[0]): (float(pair[1]), decoded.get(text(pair[0]), {}))
                for pair in beats}

    def forget_instance(self, instance: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self.keys.leases(instance))
        pipe.zrem(self.keys.workers, instance)
        pipe.hdel(self.keys.worker_info, instance)
        pipe.delete(self.keys.recovering(instance))
        pipe.execute()

    def lock_instance(self, instance: str, seconds: int) -> bool:
        return bool(self.client.set(self.keys.recovering(instance), "1", nx=True, ex=seconds))

    def extend_lock(self, instance: str, seconds: int) -> None:
        """Keep holding the recovery lock of ``instance`` (it lapses if we die)."""
        self.client.set(self.keys.recovering(instance), "1", xx=True, ex=seconds)

    def unlock_instance(self, instance: str) -> None:
        self.client.delete(self.keys.recovering(instance))

    # -- limiters -----------------------------------------------------------------------

    def waiting_limiters(self) -> list[str]:
        """Limiters with nodes in their wait queues."""
        return [text(m) for m in self.client.smembers(self.keys.waits)]

    def limiter_tat(self, limiter_id: str) -> float | None:
        """A rate limiter's theoretical arrival time (GCRA), None when unset."""
        tat = self.client.get(self.keys.limiter_state(limiter_id))
        return float(tat) if tat else None

    def fair_head(self, limiter_id: str) -> FairHead:
        """The member the limiter's releaser tries next (fair_head.lua)."""
        keys = [self.keys.wait_queue(limiter_id), *self.keys.fair(limiter_id)]
        out = self._run_global("fair_head", keys, [PARK_SECONDS])
        member, unit, wake = (text(x) for x in out)
        return FairHead(member or None, unit, float(wake) if wake else None)

    def wait_drop(self, limiter_id: str, member: str, unit: str, flow_id: str) -> None:
        """A stale member leaves the limiter's queues (fair_drop.lua)."""
        keys = [self.keys.wait_queue(limiter_id), *self.keys.fair(limiter_id)]
        self._run_global("fair_drop", keys, [member, unit, flow_id])

    def waiting(self, limiter_id: str) -> int:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.wait_queue(limiter_id))
            pipe.zcard(self.keys.fair_queue(limiter_id))
            return sum(int(n) for n in pipe.execute())

    def drop_empty_wait(self, limiter_id: str) -> None:
        """Forget a limiter in the waits index once its queues are empty (checked in one
        transaction so a member added meanwhile keeps it listed; a parked flow keeps
        its unit in the units zset)."""
        legacy, units = self.keys.wait_queue(limiter_id), self.keys.fair_units(limiter_id)
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(legacy, units)
                if pipe.zcard(legacy) == 0 and pipe.zcard(units) == 0:
                    pipe.multi()
                    pipe.srem(self.keys.waits, limiter_id)
                    pipe.execute()
            except redis.WatchError:
                pass

    def share_unit(self, fid: str) -> str:
        """The fair-share unit of a flow (ids.share_unit): its meta's concurrency key."""
        cgroup, ckey = self.client.hmget(self.keys.meta(fid), ["cgroup", "ckey"])
        return share_unit(fid, text(cgroup) if cgroup else None,
                          text(ckey) if ckey else None)

    def slot_holders(self, limiter_id: str) -> list[str]:
        """The task ids holding slots of a queue cap."""
        return [text(m) for m in self.client.zrange(self.keys.limiter_state(limiter_id), 0, -1)]

    def slots_used(self, limiter_id: str) -> int:
        return int(self.client.zcard(self.keys.limiter_state(limiter_id)))

    def release_slot(self, limiter_id: str, task_id: str) -> None:
        self.client.zrem(self.keys.limiter_state(limiter_id), task_id)

    def rate_limiters(self) -> list[str]:
        """Every rate limiter with state (a SCAN: for ``flows stats``, not hot paths)."""
        prefix = self.keys.limiter_state("")
        out = []
        for raw in self.client.scan_iter(match=prefix + "*", count=500):
            limiter = text(raw)[len(prefix):]
            if not is_queue_limiter(limiter):
                out.append(limiter)
        return out

    # -- the server ---------------------------------------------------------------------

    def eviction_policies(self) -> list[tuple[str, str | None, Exception | None]]:
        """``maxmemory-policy`` of every node holding flows (each master of a cluster):
        (where, policy, or the error that kept it from being read)."""
        client: Any = self.client
        if self.config.redis_cluster:
            nodes = [(f"{n.host}:{n.port}", n) for n in client.get_primaries()]
        else:
            kwargs = client.connection_pool.connection_kwargs
            where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
            nodes = [(str(where), None)]
        out: list[tuple[str, str | None, Exception | None]] = []
        for where, node in nodes:
            try:
                if node is None:
                    conf = client.config_get("maxmemory-policy")
                else:
                    conf = client.config_get("maxmemory-policy", target_nodes=node)
            except Exception as exc:  # CONFIG may be disabled on managed Redis
                out.append((where, None, exc))
                continue
            if isinstance(conf, dict) and node is not None and "maxmemory-policy" not in conf:
                conf = next(iter(conf.values()), {})  # redis-py keyed the answer by node
            policy = conf.get("maxmemory-policy") if isinstance(conf, dict) else None
            out.append((where, None if policy is None else text(policy), None))
        return out

    def count_recovery(self) -> None:
        """One more node recovered from a lost worker (metrics: recoveries_total)."""
        self.client.incr(self.keys.recoveries)

    def recoveries_total(self) -> int:
        return int(self.client.get(self.keys.recoveries) or 0)
