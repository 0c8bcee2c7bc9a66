"""Worker integration: the ``--flows`` option and the bootstep every worker of a Flows
app runs.

Every worker installs the attempt guard (before the consumer builds its tracers) and
checks the registry's Redis. With ``--flows`` (or ``CELERY_WORKER_FLOWS=1``) it also
runs the flow manager's services in a thread: the outbox sweeper, which publishes
nodes whose releasing process died between recording an outcome and publishing.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

import click
from celery import bootsteps

from . import guard
from .errors import FlowsConfigError

if TYPE_CHECKING:
    from .core import Flows

logger = logging.getLogger(__name__)

SWEEP_INTERVAL = 1.0
DIRTY_GRACE = 5.0  # seconds a release may take before the sweeper takes it over


def install(flows: Flows) -> None:
    app = flows.app
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


class FlowsStep(bootsteps.StartStopStep):
    """Installs the attempt guard; with ``--flows`` runs the manager services."""

    label = "celery-flows"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, flows: bool = False, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.ext: Flows = parent.app.flows
        self.manager = bool(flows) or _env_flag()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ext.config  # noqa: B018 - validate configuration at worker start
        check_redis(self.ext)
        guard.install(self.ext)

    def start(self, parent: Any) -> None:
        if not self.manager:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="celery-flows-manager",
                                        daemon=True)
        self._thread.start()
        logger.info("celery-flows: manager services started")

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(SWEEP_INTERVAL):
            try:
                sweep(self.ext)
            except Exception:
                logger.exception("celery-flows: sweep failed; retrying")


def sweep(ext: Flows) -> int:
    """Publish outboxes whose releasing process did not finish in time."""
    n = 0
    for token in ext.store.stale_dirty(DIRTY_GRACE):
        fid = token.split("|", 1)[0]
        ext.dispatcher.release(fid, token)
        n += 1
    return n


def check_redis(ext: Flows) -> None:
    """Refuse a registry Redis that may evict keys."""
    try:
        conf = ext.store.client.config_get("maxmemory-policy")
    except Exception as exc:  # CONFIG may be disabled on managed Redis
        logger.warning("celery-flows: cannot read maxmemory-policy (%r); make sure it is "
                       "noeviction", exc)
        return
    policy = conf.get("maxmemory-policy") if isinstance(conf, dict) else None
    if policy is not None and str(policy) != "noeviction":
        raise FlowsConfigError(
            f"the registry Redis at flows_redis_url runs with maxmemory-policy={policy}; "
            "celery-flows needs noeviction (an evicted key loses a flow): "
            "CONFIG SET maxmemory-policy noeviction"
        )
