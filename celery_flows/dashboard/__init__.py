"""The web dashboard (SPEC section 11): ``make_app(app)`` gives a WSGI application
to mount under any WSGI server (gunicorn, Django, Flask); ``serve`` runs it on the
standard library's server, as ``celery -A proj flows dashboard`` does."""

from __future__ import annotations

import socketserver
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .app import Dashboard

__all__ = ["Dashboard", "make_app", "serve", "server"]


def make_app(app: Any, read_only: bool = False) -> Dashboard:
    """The dashboard of a Celery app that has the extension attached (``Flows(app)``)."""
    from ..core import Flows

    flows = getattr(app, "flows", None)
    if not isinstance(flows, Flows):
        raise TypeError("make_app needs a Celery app with celery-flows attached: "
                        "Flows(app)")
    return Dashboard(flows, read_only=read_only)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # an open event stream never holds the process
    allow_reuse_address = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def server(app: Any, host: str = "127.0.0.1", port: int = 5580, read_only: bool = False,
           ) -> WSGIServer:
    """A threaded standard-library server of the dashboard, bound but not serving
    (``serve_forever()``; ``server_address`` says where, port 0 picks one)."""
    return make_server(host, port, make_app(app, read_only=read_only),
                       server_class=_Server, handler_class=_Quiet)


def serve(app: Any, host: str = "127.0.0.1", port: int = 5580, read_only: bool = False,
          ) -> None:
    """Serve the dashboard until interrupted."""
    httpd = server(app, host, port, read_only)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
