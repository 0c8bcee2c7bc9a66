"""What the suite's test modules share besides fixtures (those are in ``conftest.py``).

The processes themselves (``redis-server``, workers) come from
:mod:`celery_flows.testing`; here are the suite's conventions on top of them: where the
test app modules read their URLs from, how task bodies log their executions, and
checks several test modules make.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from celery_flows.testing import RedisDatabase

#: The folder that holds ``tests/``: workers and the CLI run there so that
#: ``-A tests.<module>`` imports (a scratch copy of tests/ in CI, not the checkout).
ROOT = Path(__file__).resolve().parent.parent

#: Environment variable from which test app modules read their broker URL.
BROKER_ENV = "FLOWS_TEST_BROKER"
#: The test's Redis (Celery URL form) for results, the bodies' log and the registry;
#: the broker's URL when unset (the broker is that Redis).
REDIS_ENV = "FLOWS_TEST_REDIS"

#: ``worker_factory(..., extra_args=FLOWS)``: a worker that runs the manager's services.
FLOWS = ["--flows"]

#: Rate limiter groups and queue caps of ``tests.proj`` for the limits tests.
LIMITS = {"FLOWS_TEST_RATE_LIMITS": json.dumps({"api": "10/s", "five": "5/s"}),
          "FLOWS_TEST_QUEUE_LIMITS": json.dumps({"capped": 2, "single": 1})}


def runs(redis_db: RedisDatabase) -> list[str]:
    """Every body execution ``tests.proj`` logged, ``"<flow>|<node>|<attempt>"``."""
    return [r.decode() if isinstance(r, bytes) else r
            for r in redis_db.client.lrange("runs", 0, -1)]


def run_counts(redis_db: RedisDatabase, fid: str) -> Counter[str]:
    """How many times each node's body ran in flow ``fid``."""
    return Counter(r.split("|")[1] for r in runs(redis_db) if r.split("|")[0] == fid)


def cli(*args: str, broker: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """``celery -A tests.proj flows *args`` on ``broker``, captured."""
    env = {**os.environ, **(env or {}), BROKER_ENV: broker, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.proj", "flows", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )


def visible(proj: Any, fid: str) -> bool:
    """Whether ``flows.get`` finds the flow (a hidden or half-written one it does not)."""
    from celery_flows import FlowNotFoundError

    try:
        proj.flows.get(fid)
    except FlowNotFoundError:
        return False
    return True


def node_doc(handle: Any, nid: str) -> dict[str, Any]:
    """Node ``nid`` of ``handle.inspect()``."""
    doc: dict[str, Any] = handle.inspect()["nodes"][nid]
    return doc


def one_outcome_per_attempt(handle: Any) -> None:
    """Every attempt of every node has at most one recorded (non-late) outcome, and the
    node's final state is that of its last attempt."""
    for nid, rec in handle.store.nodes(handle.id).items():
        recorded = Counter(h["attempt"] for h in rec["history"]
                           if not h.get("late") and h["outcome"] in ("succeeded", "failed"))
        assert all(n == 1 for n in recorded.values()), (nid, rec["history"])
        if rec["state"] == "succeeded":
            assert recorded[rec["attempt"]] == 1, (nid, rec["history"])


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process; a zombie (dead, not yet reaped) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The command name is in parentheses and may itself contain spaces or parentheses.
    state = stat[stat.rfind(")") + 2 :].split(" ", 1)[0]
    return state not in ("Z", "X")


def wait_until_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` no longer runs (absent or a zombie); return whether it did."""
    deadline = time.monotonic() + timeout
    while True:
        if not pid_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
