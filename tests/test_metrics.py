"""Prometheus metrics (SPEC section 11) of a running flow: the dashboard's /metrics,
``celery_flows.metrics.collector(app)`` in an existing registry and ``celery flows
metrics --port``, parsed with prometheus_client's own parser. Real redis-server, real
worker."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from celery_flows import Flow, FlowState
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import BROKER_ENV, FLOWS, ROOT
from tests.test_dashboard import Served


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_reflect_a_running_flow_without_ids_in_labels(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f = Flow("metered", id="m-flow")
    hold = f.add(proj.wait_for_key.si("m-go"), id="m-hold")
    f.add(proj.ident.si(1), id="m-next", after=[hold])
    handle = proj.flows.submit(f)
    wait_until(lambda: handle.node_states()["m-hold"] == "running", timeout=20)
    served = Served(proj.app)
    try:
        status, headers, body = served.request("/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        running = _samples(body.decode())
        assert running[("celery_flows_flows", (("state", "running"),))] == 1
        assert running[("celery_flows_nodes", (("state", "running"),))] == 1
        assert running[("celery_flows_nodes", (("state", "pending"),))] == 1
        assert running[("celery_flows_workers", ())] == 1
        assert running[("celery_flows_recoveries_total", ())] == 0
        labels = {v for (_, pairs) in running for _, v in pairs}
        assert not labels & {"m-flow", "m-hold", "m-next"}

        redis_db.client.set("m-go", 1)
        assert handle.wait(timeout=30) == FlowState.SUCCEEDED
        registry = CollectorRegistry()
        from celery_flows.metrics import collector

        registry.register(collector(proj.app))
        done = _samples(generate_latest(registry).decode())
        assert done[("celery_flows_flows", (("state", "succeeded"),))] == 1
        assert ("celery_flows_flows", (("state", "running"),)) not in done
        assert not any(name == "celery_flows_nodes" for name, _ in done)
    finally:
        served.stop()


def test_metrics_command_serves_alone_and_the_dashboard_names_the_missing_extra(
    import_app: ImportApp, redis_db: RedisDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    proj = import_app("tests.proj")
    env = {**os.environ, BROKER_ENV: redis_db.celery_url, "PYTHONPATH": str(ROOT)}
    cmd = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tests.proj", "flows",
                            "metrics", "--port", "0"], stdout=subprocess.PIPE, text=True,
                           env=env, cwd=ROOT)
    try:
        assert cmd.stdout is not None
        line = cmd.stdout.readline()
        url = line.split(" on ", 1)[1].strip()
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        assert ("celery_flows_workers", ()) in _samples(text)
    finally:
        cmd.kill()
        cmd.communicate()

    # without prometheus_client: 501 naming the extra
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "celery_flows.metrics", raising=False)
    served = Served(proj.app)
    try:
        status, _, body = served.request("/metrics")
        assert status == 501 and b"celery-flows[metrics]" in body
    finally:
        served.stop()
