"""Webhook rules of SPEC section 8 on a real worker: redirects are never followed (a 3xx
is a failed delivery), node events are opt-in and signed, every attempt is in the
delivery log that inspect shows, and unsigned deliveries warn at worker start."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from celery_flows import Flow, FlowDefinitionError, FlowState
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, WorkerFactory
from tests.helpers import FLOWS

SECRET = "hook-secret"


class Endpoint:
    """A local HTTP server recording every request; ``/redirect`` answers 302 to
    ``target``, everything else 200."""

    def __init__(self, target: str = "") -> None:
        self.calls: list[tuple[str, dict[str, str], bytes]] = []
        me = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                me.calls.append((self.path, dict(self.headers), body))
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", target)
                else:
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET = _any  # noqa: N815 - http.server's names

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoints() -> Iterator[tuple[Endpoint, Endpoint]]:
    target = Endpoint()
    redirecting = Endpoint(target.base + "/target")
    yield redirecting, target
    redirecting.close()
    target.close()


def test_redirects_are_never_followed_and_node_events_arrive_signed(
    import_app: ImportApp, worker_factory: WorkerFactory,
    endpoints: tuple[Endpoint, Endpoint], monkeypatch: pytest.MonkeyPatch,
) -> None:
    redirecting, target = endpoints
    monkeypatch.setenv("FLOWS_TEST_WEBHOOK_SECRET", SECRET)
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, env={"FLOWS_TEST_WEBHOOK_SECRET": SECRET})

    f = Flow("redirected", id="wh-redirect", webhook=redirecting.base + "/redirect")
    f.add(proj.add.si(1, 2), id="a")
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=30) == FlowState.SUCCEEDED
    # the 302 is a failed delivery, retried (after 2 s), and logged as such
    wait_until(lambda: len(redirecting.calls) >= 2, timeout=20)
    assert target.calls == []
    log = handle.inspect()["webhooks"]
    assert log and all(e["status"] == 302 and "redirect" in e["error"] for e in log)
    assert log[0]["to"] == redirecting.base  # scheme://host:port only
    assert "/redirect" not in json.dumps(log)
    assert handle.state() == FlowState.SUCCEEDED

    g = Flow("noded", id="wh-nodes", webhook=target.base + "/hook",
             webhook_events=("flow", "node"))
    a = g.add(proj.add.si(1, 2), id="a")
    g.add(proj.boom.si("no"), id="b", after=[a], failure_policy="ignore")
    h2 = proj.flows.submit(g)
    assert h2.wait(timeout=30) == FlowState.SUCCEEDED

    def posted() -> list[dict[str, Any]]:
        return [json.loads(body) for path, _, body in target.calls if path == "/hook"]

    wait_until(lambda: any("node" not in e for e in posted()), timeout=20)
    for _, headers, body in target.calls:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Flows-Signature"] == expected
    events = posted()
    assert [(e.get("node"), e["state"]) for e in events] == [
        ("a", "succeeded"), ("b", "failed"), (None, "succeeded")]
    assert events[1]["nodes"]["b"]["error"].endswith("no")
    assert all(e["flow_id"] == "wh-nodes" and e["sent_at"] for e in events)
    assert len({e["event_id"] for e in events}) == 3
    assert [e["status"] for e in h2.inspect()["webhooks"]] == [200, 200, 200]


def test_webhook_events_are_checked_and_unsigned_deliveries_warn_at_start(
    import_app: ImportApp, worker_factory: WorkerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(FlowDefinitionError, match="webhook_events"):
        Flow("bad", webhook="http://x.example/", webhook_events=("nodes",))
    with pytest.raises(FlowDefinitionError, match="webhook_events"):
        Flow("bad", webhook="http://x.example/", webhook_events="node")  # type: ignore[arg-type]
    env = {"FLOWS_TEST_WEBHOOK_URL": "http://127.0.0.1:9/hook"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    worker = worker_factory("tests.proj", extra_args=FLOWS, env=env)
    warning = "webhook deliveries to http://127.0.0.1:9 are unsigned"
    wait_until(lambda: warning in Path(worker.log_path).read_text(), timeout=20)
    line = next(t for t in Path(worker.log_path).read_text().splitlines() if warning in t)
    assert "/hook" not in line  # no more of the URL than scheme://host:port
    assert Path(worker.log_path).read_text().count(warning) == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_node_events_outlive_a_tiny_event_stream_and_a_receiver_that_was_down(
    import_app: ImportApp, worker_factory: WorkerFactory, monkeypatch: pytest.MonkeyPatch,
    redis_db: Any,
) -> None:
    env = {"FLOWS_TEST_WEBHOOK_SECRET": SECRET, "FLOWS_TEST_EVENTS_MAXLEN": "10"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, env=env)
    port = _free_port()  # nothing listens there yet: every delivery is refused
    f = Flow("wide-hooks", id="wh-wide", webhook=f"http://127.0.0.1:{port}/hook",
             webhook_events=("flow", "node"))
    for i in range(50):
        f.add(proj.add.si(i, i), id=f"n{i}")
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    wait_until(lambda: handle.inspect()["webhooks"], timeout=20)
    assert all(e["status"] is None for e in handle.inspect()["webhooks"])
    # the stream kept a fraction of the 150-odd events: the node events to post are not
    # read from it
    assert redis_db.client.xlen(proj.flows.store.keys.flow_events(handle.id)) < 60

    class Up(Endpoint):
        def __init__(self) -> None:
            self.calls = []
            me = self

            class Handler(BaseHTTPRequestHandler):
                def do_POST(self) -> None:  # noqa: N802 - http.server's name
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    me.calls.append((self.path, dict(self.headers), body))
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

                def log_message(self, *args: Any) -> None:
                    return None

            self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
            threading.Thread(target=self.server.serve_forever, daemon=True).start()

    receiver = Up()  # the receiver comes up; the retries (2 s, 4 s, ...) reach it
    try:
        wait_until(lambda: any(b"\"node\"" not in body for _, _, body in receiver.calls),
                   timeout=60)
        for _, headers, body in receiver.calls:
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert headers["X-Flows-Signature"] == expected
        posted = [json.loads(body) for _, _, body in receiver.calls]
        nodes = [e["node"] for e in posted if "node" in e]
        assert sorted(set(nodes)) == sorted(f"n{i}" for i in range(50))
        assert all(e["state"] == "succeeded" for e in posted)
        assert "node" not in posted[-1]  # the flow's own event comes last
        assert redis_db.client.llen(proj.flows.store.keys.hooks(handle.id)) == 0
    finally:
        receiver.close()


def test_a_per_flow_webhook_without_a_secret_warns_once_at_its_first_delivery(
    import_app: ImportApp, worker_factory: WorkerFactory,
    endpoints: tuple[Endpoint, Endpoint],
) -> None:
    _, target = endpoints
    proj = import_app("tests.proj")
    worker = worker_factory("tests.proj", extra_args=FLOWS)  # no secret, no configured URL
    warning = "flows_webhook_secret is not set: webhook deliveries are unsigned"
    for i in range(2):
        f = Flow("unsigned", id=f"wh-unsigned-{i}",
                 webhook=target.base + "/private/path?token=hush",
                 webhook_events=("flow", "node"))
        f.add(proj.add.si(1, i), id="a")
        assert proj.flows.submit(f).wait(timeout=30) == FlowState.SUCCEEDED
    wait_until(lambda: len(target.calls) == 4, timeout=20)
    assert all("X-Flows-Signature" not in headers for _, headers, _ in target.calls)
    log = Path(worker.log_path).read_text()
    assert log.count(warning) == 1  # four deliveries, one warning
    line = next(t for t in log.splitlines() if warning in t)
    assert target.base in line  # scheme://host:port, no more of the URL
    assert "/private" not in log and "hush" not in log
    assert "flows_webhook_url is set" not in log
