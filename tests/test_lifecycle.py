"""Worker and flow lifecycles (SPEC section 9): warm shutdown and rolling deploys, pause
against an in-flight release, reused flow ids, eager flows next to live workers, and a
flow of an unknown format version. Real redis-server, real worker subprocesses; races
are produced with fault-injection points (celery_flows/faults.py)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from typing import Any

import pytest

from celery_flows import Flow, FlowState, NodeState
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.harness import WorkerProcess, wait_until
from tests.test_engine import FLOWS, run_counts

LEASE = 3.0


def _env(**extra: str) -> dict[str, str]:
    return {"FLOWS_TEST_LEASE": str(LEASE), **extra}


def _doc(handle: Any, nid: str) -> dict[str, Any]:
    return handle.inspect()["nodes"][nid]


def _warm_stop(worker: WorkerProcess, timeout: float = 90.0) -> None:
    """SIGTERM and wait for the worker to exit by itself (no SIGKILL fallback)."""
    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    try:
        worker.process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{worker.name} did not finish its warm shutdown") from None
    worker.stop()


@pytest.mark.parametrize("how", ["sigterm", "shutdown-control"])
def test_warm_shutdown_keeps_the_lease_of_a_node_longer_than_it(
    how: str, import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOWS_TEST_LEASE", str(LEASE))
    proj = import_app("tests.proj")
    leaving = worker_factory("tests.proj", env=_env(), concurrency=1)
    f = Flow("deploy")
    a = f.add(proj.sleepy.si(4 * LEASE, "a"), id="a")
    f.add(proj.ident.s(), id="b", after=[a])
    handle = proj.flows.submit(f)
    wait_until(lambda: _doc(handle, "a")["state"] == "running", "a running", timeout=30)
    worker_factory("tests.proj", env=_env(), extra_args=FLOWS, concurrency=2)
    if how == "sigterm":
        _warm_stop(leaving)
    else:
        host = proj.flows.store.node(handle.id, "a")["worker"]
        proj.app.control.shutdown(destination=[host])
        assert leaving.process is not None
        leaving.process.wait(90)
        leaving.stop()
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results() == {"a": "a", "b": "a"}
    assert run_counts(redis_db, handle.id) == {"a": 1, "b": 1}
    doc = _doc(handle, "a")
    assert doc["attempts"] == 1 and doc["recoveries"] == 0, doc
    # the clean exit left nothing for a manager to recover
    assert not any(info.get("hostname", "").startswith(leaving.name)
                   for _beat, info in proj.flows.store.workers().values())
