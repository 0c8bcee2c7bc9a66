"""Fault-injection points for tests: inert unless ``CELERY_FLOWS_FAULTS`` is set.

A guarantee about a crash is only shown by crashing there. Code marks the places where
a crash matters with ``faults.point("name")``; a test process sets, for example::

    CELERY_FLOWS_FAULTS="after-record=kill"            # SIGKILL this process there
    CELERY_FLOWS_FAULTS="before-publish=sleep:3,after-record=exit"

``clock=skew:<seconds>`` is not a point: it makes this process's wall clock
(``time.time``) run that many seconds off, as on a machine whose clock drifted, to show
that timers, leases and limits are timed by Redis ``TIME``, not by any machine's clock.

Actions: ``kill`` (SIGKILL the calling process), ``kill-once:<path>`` (SIGKILL the
first process of all to get there: the one that creates the marker file), ``exit``
(``os._exit(70)``), ``raise`` (``FaultInjected``), ``sleep:<seconds>``.
``<name>@<n>`` fires only on the n-th time the point is reached in this process
(1-based), so "die in the middle of a chunked write" can be asked for. Without the
variable a point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import threading
import time

ENV = "CELERY_FLOWS_FAULTS"


class FaultInjected(RuntimeError):
    """Raised at a fault point whose action is ``raise`` (tests only)."""


def _parse(spec: str) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, action = part.partition("=")
        name, _, nth = name.partition("@")
        out[name.strip()] = (action.strip() or "kill", int(nth) if nth else 0)
    return out


_PLAN = _parse(os.environ.get(ENV, ""))
_HITS: dict[str, int] = {}
_LOCK = threading.Lock()


def _skew_clock() -> None:
    action = _PLAN.get("clock", ("", 0))[0]
    if not action.startswith("skew:"):
        return
    skew = float(action.split(":", 1)[1])
    real = time.time
    time.time = lambda: real() + skew


_skew_clock()


def reload() -> None:
    """Re-read the environment (for a test that sets the variable in-process)."""
    global _PLAN
    _PLAN = _parse(os.environ.get(ENV, ""))
    _HITS.clear()


def point(name: str) -> None:
    """Act here if the environment asks for a fault at ``name``."""
    if not _PLAN:
        return
    planned = _PLAN.get(name)
    if planned is None:
        return
    action, nth = planned
    with _LOCK:
        _HITS[name] = hits = _HITS.get(name, 0) + 1
    if nth and hits != nth:
        return
    if action.startswith("kill-once:"):
        # the first process of all to get here (pool children each count their own
        # hits): whoever creates the marker file dies, the others go on
        try:
            os.close(os.open(action.split(":", 1)[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(70)
    elif action == "raise":
        raise FaultInjected(f"fault injected at {name!r}")
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    else:
        raise ValueError(f"{ENV}: unknown action {action!r} for point {name!r}; "
                         "use kill, kill-once:<marker path>, exit, raise or sleep:<seconds>")
