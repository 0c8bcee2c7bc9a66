"""Worker integration: the ``--flows`` option and the bootstep every worker of a Flows
app runs.

Every worker installs the attempt guard (before the consumer builds its tracers),
checks the registry's Redis, and runs a thread that heartbeats its instance and
reconciles its own leases (see :mod:`celery_flows.recovery`). With ``--flows`` (or
``CELERY_WORKER_FLOWS=1``) it also runs the flow manager's services in another thread:
the outbox sweeper, which publishes nodes whose releasing process died between
recording an outcome and publishing, and the recovery of lost workers' nodes.

A warm shutdown (SIGTERM, Celery's ``shutdown`` control) is not a loss. Celery stops
the steps in reverse start order, so this step (it requires the Pool) stops *before*
the pool has finished its running bodies (CELERY_NOTES "Worker shutdown"). The step's
``stop`` therefore ends only the manager services and hands back the leases of
messages the consumer dropped unstarted (they return to the broker by themselves and
run later as the same attempt); the heartbeat goes on until ``worker_shutdown``, sent
once the pool has drained and every body's outcome is recorded. A cold shutdown
(``terminate``) stops the heartbeat at once: its killed bodies are losses under the
lease rule.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import click
from celery import bootsteps, signals

from ..config import redact_url, scrub
from ..define.states import NodeState
from ..engine import Engine, engine_of
from ..engine.batch import sweep_batches
from ..engine.chunks import finish_cancels
from ..engine.outcomes import set_instance
from ..engine.release import collect_slots, fire_timers, release_held
from ..errors import FlowsConfigError
from ..registry.ids import instance_host, parse_task_id, token_flow
from . import eventcopy, guard, receipts, recovery, webhooks

__all__ = ["FlowsStep", "check_redis", "install", "sweep"]

logger = logging.getLogger(__name__)

SWEEP_INTERVAL = 1.0
DIRTY_GRACE = 5.0  # seconds a release may take before the sweeper takes it over
# Redis Cluster: seconds between copies of new events into the registry's stream, and
# the copy rounds between two steps of the repair walk (worker/eventcopy.py)
EVENT_COPY_INTERVAL = 0.2
# seconds between rounds of the concurrency groups' service: how long a finished flow
# may keep its place before the next flow of its key is admitted
GROUPS_INTERVAL = 0.2
EVENT_REPAIR_EVERY = 25


def install(app: Any) -> None:
    """Add the ``--flows`` worker option and the bootstep to the app."""
    app.user_options["worker"].add(
        click.Option(
            ["--flows"],
            is_flag=True,
            default=False,
            help="Run the celery-flows manager services (sweeper, recovery, timers) in "
                 "this worker. At least one worker of the app must run them.",
        )
    )
    app.steps["worker"].add(FlowsStep)


def _env_flag() -> bool:
    return os.environ.get("CELERY_WORKER_FLOWS", "").lower() in ("1", "true", "yes", "on")


class FlowsStep(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
    """Installs the attempt guard; with ``--flows`` runs the manager services."""

    label = "celery-flows"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, flows: bool = False, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        engine = engine_of(parent.app)
        assert engine is not None, "the step is added by Flows(app) only"
        self.engine: Engine = engine
        self.manager = bool(flows) or _env_flag()
        self._stop = threading.Event()
        self._stop_beat = threading.Event()
        self._threads: list[threading.Thread] = []
        self._beat_thread: threading.Thread | None = None
        self.engine.config  # noqa: B018 - validate configuration at worker start
        check_redis(self.engine)
        guard.install(self.engine)
        # before the pool forks: children report under the same instance
        self.instance = set_instance(getattr(parent, "hostname", "") or "")
        self.reconciler = recovery.Reconciler(self.engine, self.instance)
        self.receipts = receipts.Receipts(self.engine.store, self.instance)

    def start(self, parent: Any) -> None:
        self._stop.clear()
        self._stop_beat.clear()
        self._beat()
        self._beat_thread = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                             name="celery-flows-heartbeat")
        self._beat_thread.start()
        if self.engine.store.inline:
            self.receipts.install()
            self._spawn("celery-flows-receipts", lambda: self.receipts.run(self._stop))
        # sent by WorkController.stop() after the blueprint (the pool included) stopped
        signals.worker_shutdown.connect(self._on_worker_shutdown, sender=parent, weak=False,
                                        dispatch_uid=f"celery_flows.shutdown.{self.instance}")
        if self.manager:
            self._spawn("celery-flows-manager", self._manager_loop)
            self._spawn("celery-flows-releaser", self._releaser_loop)
            self._spawn("celery-flows-webhooks", self._webhook_loop)
            if self.engine.config.concurrency_limits:
                self._spawn("celery-flows-groups", self._groups_loop)
            if not self.engine.store.inline:
                self._spawn("celery-flows-events", self._event_copy_loop)
            logger.info("celery-flows: manager services started")
            webhooks.warn_if_unsigned(self.engine.config)

    def stop(self, parent: Any) -> None:
        """Warm shutdown: the consumer is closed, the pool still runs its bodies."""
        self._stop_services()
        self.hand_back()
        logger.info("celery-flows: keeping the leases of running nodes alive until the "
                    "pool has finished them")

    def terminate(self, parent: Any) -> None:
        """Cold shutdown: running bodies are killed; their leases expire (a loss).
        Unstarted messages go back to the broker as in a warm shutdown."""
        self._stop_services()
        self._stop_heartbeat()
        self.hand_back()

    def _on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        self._stop_heartbeat()
        self.hand_back(final=True)

    def _stop_services(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def _stop_heartbeat(self) -> None:
        self._stop_beat.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=5)
            self._beat_thread = None

    def hand_back(self, final: bool = False) -> None:
        """Drop the leases of messages this worker received but will not run: the
        consumer dropped them and the broker gives them to another worker, which runs
        them as the same attempt; a recovery of them would be a second copy and would
        use up ``max_recoveries``. ``final`` (the pool has stopped): everything left
        goes, except bodies started here whose outcome is not recorded, which are
        recovered when the lease expires; without any, the instance is forgotten so no
        manager mistakes the clean exit for a lost worker."""
        store = self.engine.store
        try:
            held = set() if final else self.reconciler.held_task_ids()
            kept = 0
            for task_id in store.leases(self.instance):
                if task_id in held:
                    continue
                if final and self._unrecorded_here(task_id):
                    kept += 1
                    continue
                store.lease_drop(self.instance, task_id)
            if final:
                if kept:
                    logger.warning("celery-flows: %d node(s) started here have no recorded "
                                   "outcome; they are recovered once the lease expires", kept)
                else:
                    store.forget_instance(self.instance)
        except Exception:
            logger.exception("celery-flows: could not hand back leases at shutdown")

    def _unrecorded_here(self, task_id: str) -> bool:
        ref = parse_task_id(task_id)
        rec = self.engine.store.node(ref.flow_id, ref.node_id) if ref is not None else None
        return (rec is not None and ref is not None and rec.get("attempt") == ref.attempt
                and rec.get("lease") == self.instance
                and rec.get("state") == NodeState.RUNNING.value)

    def _spawn(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _beat(self) -> None:
        info = {"hostname": instance_host(self.instance), "pid": os.getpid(),
                "manager": self.manager}
        self.engine.store.heartbeat(self.instance, info)

    def _heartbeat_loop(self) -> None:
        interval = recovery.heartbeat_interval(self.engine.config)
        while not self._stop_beat.wait(interval):
            try:
                self._beat()
                self.reconciler.run()
            except Exception:
                logger.exception("celery-flows: heartbeat failed; retrying")

    def _manager_loop(self) -> None:
        rounds = 0
        self._index_cursor = 0  # expired flows leave the index a chunk at a time
        while not self._stop.wait(SWEEP_INTERVAL):
            rounds += 1
            engine = self.engine
            try:
                sweep(engine)
                finish_cancels(engine.store, DIRTY_GRACE)
                sweep_batches(engine.submitter)
                recovery.recover_lost_workers(engine)
                if rounds % 2 == 0:
                    recovery.rescue_stranded(engine)
                if rounds % 2 == 0 and engine.config.queue_limits:
                    collect_slots(engine.store, engine.config)
                if rounds % 5 == 0 and not engine.config.concurrency_limits:
                    # groups no longer configured: their places still free and admit
                    engine.groups.reconcile()
                if rounds % 5 == 0:
                    self._index_cursor = engine.store.prune_index(self._index_cursor)[1]
            except Exception:
                logger.exception("celery-flows: sweep failed; retrying")

    def _webhook_loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                webhooks.deliver_due(self.engine.store, self.engine.config)
            except Exception:
                logger.exception("celery-flows: webhook delivery failed; retrying")

    def _groups_loop(self) -> None:
        """Concurrency groups: free the places of finished flows, admit the next, start
        admitted flows a dead process left waiting, cancel evicted ones
        (engine/groups.py)."""
        while not self._stop.wait(GROUPS_INTERVAL):
            try:
                self.engine.groups.reconcile()
            except Exception:
                logger.exception("celery-flows: concurrency groups round failed; retrying")

    def _event_copy_loop(self) -> None:
        """Redis Cluster: copy the flows' events into the registry's stream."""
        rounds, cursor = 0, 0
        while not self._stop.wait(EVENT_COPY_INTERVAL):
            rounds += 1
            try:
                eventcopy.copy_noted(self.engine.store)
                if rounds % EVENT_REPAIR_EVERY == 0:
                    cursor = eventcopy.repair(self.engine.store, cursor)
            except Exception:
                logger.exception("celery-flows: copying events failed; retrying")

    def _releaser_loop(self) -> None:
        """Admit held nodes as soon as their limiters allow (see engine/limits.py)."""
        store, dispatcher = self.engine.store, self.engine.dispatcher
        pause = 0.05
        while not self._stop.wait(pause):
            try:
                pause = min(release_held(store, dispatcher), fire_timers(store, dispatcher))
            except Exception:
                logger.exception("celery-flows: releasing held nodes failed; retrying")
                pause = 1.0


def sweep(engine: Engine) -> int:
    """Publish outboxes whose releasing process did not finish in time."""
    n = 0
    for token in engine.store.stale_dirty(DIRTY_GRACE):
        engine.dispatcher.release(token_flow(token), token)
        n += 1
    return n


def check_redis(engine: Engine) -> None:
    """Refuse a registry Redis that may evict keys: on a cluster, every master holds
    flows, so every master is checked."""
    config = engine.config
    checked = engine.store.eviction_policies()
    for where, policy, error in checked:
        if error is not None:
            logger.warning("celery-flows: cannot read maxmemory-policy of %s (%s); make "
                           "sure it is noeviction", where,
                           scrub(f"{type(error).__name__}: {error}", config))
            continue
        if policy is not None and policy != "noeviction":
            raise FlowsConfigError(
                f"the registry Redis node {where} (flows_redis_url) runs with "
                f"maxmemory-policy={policy}; celery-flows needs noeviction (an evicted key "
                f"loses a flow): CONFIG SET maxmemory-policy noeviction on {where}"
            )
    logger.info("celery-flows: registry %s%s, maxmemory-policy checked on %d node(s)",
                redact_url(config.redis_url), " (cluster)" if config.redis_cluster else "",
                len(checked))
