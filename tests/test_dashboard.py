"""The dashboard (SPEC section 11) over real HTTP: a served WSGI app (the standard
library's threaded server, in this process) on a real redis-server, with a real worker
running the flows. The browser tests are in tests/test_dashboard_browser.py."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from celery_flows import Flow, FlowState
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, cli

TOKEN = "s3cret-token"


class Served:
    def __init__(self, app: Any, read_only: bool = False) -> None:
        from celery_flows.dashboard import server

        self.httpd = server(app, "127.0.0.1", 0, read_only=read_only)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def request(self, path: str, method: str = "GET", token: str | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.url + path, method=method,
                                     headers=dict(headers or {}))
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def json(self, path: str, **kw: Any) -> tuple[int, Any]:
        status, _, body = self.request(path, **kw)
        return status, json.loads(body)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proj(import_app: ImportApp, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("FLOWS_TEST_DASHBOARD_TOKEN", TOKEN)
    return import_app("tests.proj")


@pytest.fixture
def served(proj: Any) -> Iterator[Served]:
    s = Served(proj.app)
    yield s
    s.stop()


def _held(proj: Any, fid: str, key: str) -> Flow:
    f = Flow("dash", id=fid)
    hold = f.add(proj.wait_for_key.si(key), id="hold")
    f.add(proj.ident.si("x"), id="next", after=[hold])
    return f


def test_api_lists_documents_acts_and_streams_events(
    proj: Any, served: Served, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    worker_factory("tests.proj", extra_args=FLOWS)
    done = proj.flows.submit(_quick(proj))
    assert done.wait(timeout=30) == FlowState.SUCCEEDED
    held = proj.flows.submit(_held(proj, "d-held", "d-go"))
    wait_until(lambda: held.node_states()["hold"] == "running", timeout=20)

    # the list: newest first, with per-state node counts; filters; pages by cursor
    status, headers, body = served.request("/api/flows")
    assert status == 200
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert "unsafe" not in headers["Content-Security-Policy"]
    doc = json.loads(body)
    assert [f["id"] for f in doc["flows"]] == ["d-held", "d-quick"]
    assert doc["flows"][0]["nodes"] == {"running": 1, "pending": 1}
    assert doc["flows"][1]["state"] == "succeeded" and doc["flows"][1]["finished_at"]
    assert set(doc["flows"][0]) == {"id", "name", "state", "created_at", "finished_at",
                                    "nodes"}
    _, page = served.json("/api/flows?limit=1")
    assert [f["id"] for f in page["flows"]] == ["d-held"] and page["next"]
    _, rest = served.json(f"/api/flows?limit=1&cursor={page['next']}")
    assert [f["id"] for f in rest["flows"]] == ["d-quick"]
    _, only = served.json("/api/flows?state=succeeded")
    assert [f["id"] for f in only["flows"]] == ["d-quick"] and only["next"] is None
    _, named = served.json("/api/flows?name=dash")
    assert [f["id"] for f in named["flows"]] == ["d-held"]

    # a flow's document is inspect --json's
    status, flow_doc = served.json("/api/flows/d-held")
    shown = json.loads(cli("inspect", "d-held", "--json", broker=redis_db.celery_url).stdout)
    assert status == 200 and set(flow_doc) == set(shown) and flow_doc["nodes"].keys() == \
        shown["nodes"].keys()
    assert served.json("/api/flows/nope")[0] == 404
    # task arguments only with flows_dashboard_show_args
    assert "args" not in flow_doc["nodes"]["hold"]
    from celery_flows.dashboard import Dashboard

    shown_args = Dashboard(proj.flows, show_args=True).flow_doc("d-held")
    assert shown_args["nodes"]["hold"]["args"] == {"args": ["d-go"], "kwargs": {}}

    # actions: the token, compared in constant time; 409 when the state forbids; 404
    assert served.json("/api/flows/d-held/pause", method="POST")[0] == 401
    assert served.json("/api/flows/d-held/pause", method="POST", token="wrong")[0] == 401
    status, paused = served.json("/api/flows/d-held/pause", method="POST", token=TOKEN)
    assert status == 200 and paused["state"] == "paused" and held.state() == "paused"
    status, again = served.json("/api/flows/d-held/pause", method="POST", token=TOKEN)
    assert status == 409 and "pause" in again["error"]
    assert served.json("/api/flows/nope/cancel", method="POST", token=TOKEN)[0] == 404
    read_only = Served(proj.app, read_only=True)
    try:
        assert read_only.json("/api/flows/d-held/resume", method="POST",
                              token=TOKEN)[0] == 403
    finally:
        read_only.stop()
    assert held.state() == "paused"  # none of the refused calls changed anything
    assert served.json("/api/flows/d-held/resume", method="POST", token=TOKEN)[0] == 200

    # the event stream: Last-Event-ID resumes after that event; it ends with the flow
    events = [json.loads(line) for line in cli(
        "events", "d-quick", "--json", broker=redis_db.celery_url).stdout.splitlines()]
    status, headers, body = served.request("/api/flows/d-quick/events",
                                           headers={"Last-Event-ID": events[1]["id"]})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    sent = [json.loads(line[len("data: "):]) for line in body.decode().splitlines()
            if line.startswith("data: {\"")]
    assert sent == events[2:]
    ids = [line[len("id: "):] for line in body.decode().splitlines() if line.startswith("id: ")]
    assert ids == [e["id"] for e in events[2:]]
    redis_db.client.set("d-go", 1)
    assert held.wait(timeout=30) == FlowState.SUCCEEDED

    # pages are shells whose scripts are files (no inline script), assets are local
    status, headers, page_html = served.request("/flows/d-held")
    assert status == 200 and b'<script src="/static/flow.js">' in page_html
    assert b"<script>" not in page_html and b"http" not in page_html.replace(b"http-equiv", b"")
    for asset in ("flow.js", "list.js", "dashboard.css", "vendor/dagre.min.js"):
        assert served.request(f"/static/{asset}")[0] == 200
    assert served.request("/static/../app.py")[0] == 404


def _quick(proj: Any) -> Flow:
    f = Flow("quick", id="d-quick")
    f.add(proj.add.si(1, 2), id="a")
    return f


def test_without_a_token_the_dashboard_is_read_only(
    import_app: ImportApp, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    served = Served(proj.app)
    try:
        proj.flows.submit(_quick(proj))
        assert served.json("/api/flows/d-quick/cancel", method="POST", token="x")[0] == 403
        assert proj.flows.get("d-quick").state() == "running"
    finally:
        served.stop()
