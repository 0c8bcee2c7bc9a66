"""External nodes, sensors and webhooks (SPEC section 8) on real workers."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from celery_flows import Flow, FlowState, NodeState
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, run_counts

SECRET = "s3cret"


class Hook:
    """A local HTTP endpoint that records POSTs and answers with scripted statuses."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.calls: list[tuple[dict[str, str], bytes, int]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = hook.statuses.pop(0) if hook.statuses else 200
                hook.calls.append((dict(self.headers), body, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook([500])
    yield h
    h.close()


def test_external_node_times_out(import_app: ImportApp, worker_factory: WorkerFactory) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f = Flow("gated")
    gate = f.add_external("gate", timeout=1)
    f.add(proj.ident.si(1), id="after", after=[gate])
    handle = proj.flows.submit(f)
    started = time.monotonic()
    assert handle.wait(timeout=20) == FlowState.FAILED
    assert 0.9 <= time.monotonic() - started < 8
    nodes = handle.inspect()["nodes"]
    assert nodes["gate"]["error"].startswith("TimeoutError")
    assert nodes["after"]["state"] == "skipped"


def test_sensor_pokes_until_truthy_or_times_out(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f = Flow("sensing")
    s = f.add_sensor(proj.check_key.s("file-landed"), id="sensor", poke_interval=0.3,
                     timeout=20)
    f.add(proj.ident.s(), id="use", after=[s])
    f.add_sensor(proj.check_key.s("never"), id="hopeless", poke_interval=0.3, timeout=1)
    handle = proj.flows.submit(f)
    time.sleep(1.2)
    assert handle.node_states()["sensor"] in (NodeState.RETRYING, NodeState.QUEUED,
                                              NodeState.RUNNING)
    redis_db.client.set("file-landed", "s3://bucket/key")
    assert handle.wait(timeout=30) == FlowState.FAILED
    assert handle.results()["use"] == "s3://bucket/key"
    nodes = handle.inspect()["nodes"]
    assert nodes["sensor"]["state"] == "succeeded" and nodes["sensor"]["attempts"] == 1
    assert run_counts(redis_db, handle.id)["sensor"] >= 3
    assert nodes["hopeless"]["state"] == "failed"
    assert nodes["hopeless"]["error"].startswith("TimeoutError")


def test_webhooks_are_signed_retried_and_never_change_the_flow(
    import_app: ImportApp, worker_factory: WorkerFactory, hook: Hook,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOWS_TEST_WEBHOOK_SECRET", SECRET)
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, env={"FLOWS_TEST_WEBHOOK_SECRET": SECRET})
    f = Flow("hooked", webhook=hook.url)
    f.add(proj.add.si(1, 2), id="a")
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=20) == FlowState.SUCCEEDED
    deadline = time.monotonic() + 15
    while len(hook.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [c[2] for c in hook.calls] == [500, 200]  # retried after the failure
    headers, body, _ = hook.calls[-1]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Flows-Signature"] == expected
    event = json.loads(body)
    assert event["flow_id"] == handle.id and event["state"] == "succeeded"
    assert event["name"] == "hooked" and event["nodes"]["a"]["state"] == "succeeded"
    assert event["event_id"] == json.loads(hook.calls[0][1])["event_id"]
    assert handle.state() == FlowState.SUCCEEDED
    # a cancelled flow is announced too
    g = Flow("hooked-cancel", webhook=hook.url)
    g.add(proj.wait_for_key.si("never-set", 30), id="slow")
    h2 = proj.flows.submit(g)
    proj.flows.cancel(h2.id, terminate=True)
    deadline = time.monotonic() + 15
    while len(hook.calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(hook.calls[-1][1])["state"] == "cancelled"


def test_sensors_and_signals_under_eager_mode(import_app: ImportApp, redis_db: RedisDB) -> None:
    proj = import_app("tests.proj")
    proj.app.conf.task_always_eager = True
    redis_db.client.set("there", "yes")
    f = Flow("eager-sensing")
    found = f.add_sensor(proj.check_key.s("there"), id="found", poke_interval=0.05,
                         timeout=5)
    f.add(proj.ident.s(), id="use", after=[found])
    f.add_sensor(proj.check_key.s("absent"), id="absent", poke_interval=0.05, timeout=0.3)
    gate = f.add_external("gate")
    f.add(proj.ident.s(), id="after-gate", after=[gate])
    handle = proj.flows.submit(f)
    nodes = handle.inspect()["nodes"]
    assert nodes["use"]["state"] == "succeeded"
    assert nodes["absent"]["state"] == "failed"
    assert nodes["absent"]["error"].startswith("TimeoutError")
    assert run_counts(redis_db, handle.id)["absent"] >= 3
    # nothing signals an external node during submit: the flow waits for it
    assert handle.state() == FlowState.RUNNING
    proj.flows.signal(handle.id, "gate", result=7)
    assert handle.state() == FlowState.FAILED  # "absent" failed under "fail"
    assert handle.results()["after-gate"] == 7
    assert redis_db.client.llen(b"celery") == 0, "eager mode must not publish"
