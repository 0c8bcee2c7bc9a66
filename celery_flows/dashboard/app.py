"""The dashboard's WSGI application (SPEC section 11): the pages, the JSON API, the
Server-Sent Events of a flow's events, the actions and ``/metrics``.

Standard library only. The pages are HTML shells whose scripts are files under
``static/`` (the Content-Security-Policy allows no inline script); the flow's graph is
laid out in the browser by a vendored, pinned dagre (``static/vendor``, MIT licence
beside it), so nothing is fetched from elsewhere and the page works offline.
"""

from __future__ import annotations

import hmac
import html
import json
import mimetypes
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from ..errors import FlowNotFoundError, FlowsError, FlowStateError
from ..observe.events import follow
from ..observe.inspect import describe

if TYPE_CHECKING:
    from ..core import Flows

__all__ = ["CSP", "Dashboard", "STATIC"]

STATIC = Path(__file__).with_name("static")
CSP = ("default-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
       "form-action 'self'; img-src 'self' data:")
PAGE_LIMIT = 100  # most flows one list request returns
SCAN_PAGE = 200  # index entries read per round trip while filtering
COUNT_NODES = 2000  # flows up to this size get exact per-state node counts in the list
ACTIONS = ("cancel", "pause", "resume", "retry")
FLOW_ID = r"[A-Za-z0-9_.:\-]{1,128}"
StartResponse = Callable[..., Any]


class _Reply(Exception):
    """An early answer: status and a JSON body."""

    def __init__(self, status: str, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _page(title: str, script: str, data: dict[str, str]) -> bytes:
    attrs = " ".join(f'data-{k}="{html.escape(v)}"' for k, v in data.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/dashboard.css">
</head><body {attrs}>
<header><a href="/">celery-flows</a> <span id="title">{html.escape(title)}</span></header>
<main id="main"></main>
<script src="/static/vendor/dagre.min.js"></script>
<script src="/static/{script}"></script>
</body></html>
""".encode()


class Dashboard:
    """The WSGI callable of one app's dashboard (``make_app(app)``)."""

    def __init__(self, flows: Flows, read_only: bool = False, block: float = 15.0,
                 show_args: bool | None = None) -> None:
        self.flows = flows
        self.store = flows.store
        self.config = flows.config
        self.read_only = read_only
        # task arguments only with flows_dashboard_show_args (they may hold secrets)
        self.show_args = self.config.dashboard_show_args if show_args is None else show_args
        self.block = block  # seconds an SSE stream waits between keep-alive comments

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/") or "/"
        try:
            return self._route(method, path, environ, start_response)
        except _Reply as reply:
            return self._json(start_response, reply.body, reply.status)

    # -- routing ---------------------------------------------------------------------

    def _route(self, method: str, path: str, environ: dict[str, Any],
               start_response: StartResponse) -> Iterable[bytes]:
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        if method == "POST":
            m = re.fullmatch(rf"/api/flows/({FLOW_ID})/(\w+)", path)
            if m and m.group(2) in ACTIONS:
                return self._json(start_response, self._act(m.group(1), m.group(2), environ))
            raise _Reply("404 Not Found", {"error": "no such action"})
        if method not in ("GET", "HEAD"):
            raise _Reply("405 Method Not Allowed", {"error": "GET or POST only"})
        if path == "/":
            return self._html(start_response, _page("flows", "list.js", {}))
        if m := re.fullmatch(rf"/flows/({FLOW_ID})", path):
            return self._html(start_response,
                              _page(f"flow {m.group(1)}", "flow.js", {"flow": m.group(1)}))
        if path.startswith("/static/"):
            return self._static(start_response, path[len("/static/"):])
        if path == "/api/flows":
            return self._json(start_response, self.list_flows(query))
        if m := re.fullmatch(rf"/api/flows/({FLOW_ID})", path):
            return self._json(start_response, self.flow_doc(m.group(1)))
        if m := re.fullmatch(rf"/api/flows/({FLOW_ID})/events", path):
            since = environ.get("HTTP_LAST_EVENT_ID") or query.get("since")
            return self._events(start_response, m.group(1), since)
        if path == "/metrics":
            return self._metrics(start_response)
        raise _Reply("404 Not Found", {"error": f"nothing at {path}"})

    # -- the API ---------------------------------------------------------------------

    def list_flows(self, query: dict[str, str]) -> dict[str, Any]:
        """``GET /api/flows``: newest first, filtered by state and name, in pages of the
        index (a cursor is an index rank, never a scan)."""
        try:
            limit = min(max(int(query.get("limit") or 50), 1), PAGE_LIMIT)
            start = max(int(query.get("cursor") or 0), 0)
        except ValueError:
            raise _Reply("400 Bad Request", {"error": "limit and cursor are integers"}) \
                from None
        state, name = query.get("state") or None, query.get("name") or None
        out: list[dict[str, Any]] = []
        more = True
        while more and len(out) < limit:
            rows, more = self.store.flow_summaries(start, SCAN_PAGE)
            for fid, meta in rows:
                start += 1
                if meta is None or (state and meta.get("state") != state) or \
                        (name and meta.get("name") != name):
                    continue
                out.append(self._summary(fid, meta))
                if len(out) >= limit:
                    break
        return {"flows": out, "next": str(start) if more or len(out) >= limit else None}

    def _summary(self, fid: str, meta: dict[str, str]) -> dict[str, Any]:
        total = int(meta.get("total") or 0)
        counts: dict[str, int] = {}
        if total <= COUNT_NODES:
            for rec in self.store.nodes(fid).values():
                counts[rec["state"]] = counts.get(rec["state"], 0) + 1
        else:  # a big flow: its counters only (finished or not), no read of its nodes
            done = int(meta.get("done") or 0)
            counts = {"finished": done, "unfinished": total - done}
        return {"id": fid, "name": meta.get("name"), "state": meta.get("state"),
                "created_at": _num(meta.get("created_at")),
                "finished_at": _num(meta.get("finished_at")), "nodes": counts}

    def flow_doc(self, fid: str) -> dict[str, Any]:
        """``GET /api/flows/<id>``: the document of ``inspect --json``."""
        try:
            doc = describe(self.store, fid)
        except FlowNotFoundError as exc:
            raise _Reply("404 Not Found", {"error": str(exc)}) from None
        if self.show_args and len(doc["nodes"]) <= COUNT_NODES:
            blobs = self.store.node_call_blobs(fid, list(doc["nodes"]))
            for nid, blob in blobs.items():
                try:
                    call = self.flows.codec.load_node_call(blob)
                    shown: Any = json.loads(json.dumps(
                        {"args": call.args, "kwargs": call.kwargs}, default=repr))
                except Exception as exc:  # an app serializer this process cannot read
                    shown = {"error": f"{type(exc).__name__}: {exc}"}
                doc["nodes"][nid]["args"] = shown
        return doc

    def _act(self, fid: str, action: str, environ: dict[str, Any]) -> dict[str, Any]:
        token = self.config.dashboard_token
        if self.read_only or not token:
            raise _Reply("403 Forbidden", {"error": "the dashboard is read-only (no "
                         "flows_dashboard_token, or --read-only)"})
        given = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                value.strip().encode(), token.encode()):
            raise _Reply("401 Unauthorized", {"error": "a valid Authorization: Bearer "
                         "token is required"})
        try:
            report = getattr(self.flows, action)(fid)
        except FlowNotFoundError as exc:
            raise _Reply("404 Not Found", {"error": str(exc)}) from None
        except FlowStateError as exc:
            raise _Reply("409 Conflict", {"error": str(exc)}) from None
        return {"ok": True, "state": str(report.get("state")), "report":
                json.loads(json.dumps(report, default=str))}

    def _events(self, start_response: StartResponse, fid: str, since: str | None
                ) -> Iterable[bytes]:
        try:
            self.store.require_meta(fid)
        except FlowsError as exc:
            raise _Reply("404 Not Found", {"error": str(exc)}) from None
        if since is not None and not re.fullmatch(r"\d+(-\d+)?", since):
            since = None
        start_response("200 OK", [("Content-Type", "text/event-stream"),
                                  ("Cache-Control", "no-cache"), *self._headers()])

        def stream() -> Iterator[bytes]:
            yield b"retry: 2000\n\n"
            try:
                for event in follow(self.store, fid, since, block=self.block, idle=True):
                    if event is None:
                        yield b": keep-alive\n\n"  # a closed connection fails here
                    else:
                        yield f"id: {event['id']}\ndata: {json.dumps(event)}\n\n".encode()
            except FlowsError:
                pass  # the flow expired meanwhile
            yield b"event: end\ndata: {}\n\n"

        return stream()

    def _metrics(self, start_response: StartResponse) -> Iterable[bytes]:
        try:
            from ..metrics import exposition
        except ImportError:
            raise _Reply("501 Not Implemented", {"error": "metrics need the optional "
                         "extra: pip install 'celery-flows[metrics]'"}) from None
        body, content_type = exposition(self.flows)
        start_response("200 OK", [("Content-Type", content_type), *self._headers()])
        return [body]

    # -- responses -------------------------------------------------------------------

    def _headers(self) -> list[tuple[str, str]]:
        return [("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
                ("Referrer-Policy", "no-referrer")]

    def _json(self, start_response: StartResponse, body: Any, status: str = "200 OK"
              ) -> list[bytes]:
        data = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(data))),
                                ("Cache-Control", "no-store"), *self._headers()])
        return [data]

    def _html(self, start_response: StartResponse, data: bytes) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                  ("Content-Length", str(len(data))), *self._headers()])
        return [data]

    def _static(self, start_response: StartResponse, name: str) -> list[bytes]:
        path = (STATIC / name).resolve()
        if STATIC.resolve() not in path.parents or not path.is_file():
            raise _Reply("404 Not Found", {"error": "no such file"})
        data = path.read_bytes()
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(data))),
                                  ("Cache-Control", "max-age=300"), *self._headers()])
        return [data]


def _num(value: str | None) -> float | None:
    return float(value) if value else None
