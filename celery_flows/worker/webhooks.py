"""Webhook delivery for flow events (``succeeded``, ``failed``, ``cancelled``).

When a flow with a webhook (its ``webhook=`` or ``flows_webhook_url``) finishes, the
transition marks it ``webhook_pending`` in its record; whoever drains the flow next
queues it in ``<prefix>:webhooks``. The ``--flows`` workers POST the event as JSON,
signed with HMAC-SHA256 of the body (``X-Flows-Signature: sha256=<hex>``, secret
``flows_webhook_secret``), and retry with exponential backoff. A failing webhook never
changes a flow's state. The event id is stable across retries, so receivers can
deduplicate.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import unquote, urlsplit

from ..config import FlowsConfig, redact_webhook, scrub
from ..registry import Store

__all__ = ["deliver_due", "payload", "post", "sign"]

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 10
TIMEOUT = 10.0


def backoff(attempt: int) -> float:
    return float(min(2 ** attempt, 600))


def payload(store: Store, fid: str, meta: dict[str, str]) -> dict[str, Any]:
    nodes = store.nodes(fid)
    finished = meta.get("finished_at") or ""
    return {
        "event_id": f"{fid}:{meta.get('state')}:{finished}",
        "timestamp": float(finished) if finished else store.now(),
        "flow_id": fid,
        "name": meta.get("name"),
        "state": meta.get("state"),
        "nodes": {nid: {"state": rec["state"], "attempts": rec.get("attempt", 0),
                        "error": rec.get("error")}
                  for nid, rec in nodes.items()},
    }


def sign(secret: str | None, body: bytes) -> str | None:
    if not secret:
        return None
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx answer is a failed delivery (retried), never followed."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects())


def post(url: str, body: bytes, signature: str | None) -> int:
    headers = {"Content-Type": "application/json", "User-Agent": "celery-flows"}
    if signature:
        headers["X-Flows-Signature"] = signature
    parts = urlsplit(url)
    if parts.username is not None:
        # credentials in the URL are HTTP basic auth, not part of the host
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=TIMEOUT) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:  # non-2xx (3xx included): a failed delivery
        return int(exc.code)


def deliver_due(store: Store, config: FlowsConfig) -> int:
    """Deliver the webhooks that are due; returns how many were delivered."""
    delivered = 0
    for fid in store.due_webhooks():
        if not store.lock_webhook(fid, int(TIMEOUT * 3)):
            continue
        try:
            meta = store.meta(fid)
            url = (meta or {}).get("webhook")
            if not meta or meta.get("webhook_pending") != "1" or not url:
                store.webhook_settled(fid, None)
                continue
            where = redact_webhook(url)
            if not config.webhook_allowed(url):
                logger.error("celery-flows: not sending the webhook of flow %s: %s is not "
                             "in flows_webhook_allowed_hosts", fid, where)
                store.webhook_settled(fid, "refused")
                continue
            body = json.dumps(payload(store, fid, meta), sort_keys=True).encode()
            try:
                status = post(url, body, sign(config.webhook_secret, body))
                ok = 200 <= status < 300
                if not ok:
                    logger.warning("celery-flows: webhook of flow %s to %s answered %d",
                                   fid, where, status)
            except Exception as exc:
                # an exception's text may quote the URL's path, query or credentials
                logger.warning("celery-flows: webhook of flow %s to %s failed: %s", fid,
                               where, scrub(f"{type(exc).__name__}: {exc}", config, url))
                ok = False
            if ok:
                store.webhook_settled(fid, "0")
                delivered += 1
                continue
            attempts = store.webhook_failed(fid, MAX_ATTEMPTS, backoff)
            if attempts >= MAX_ATTEMPTS:
                logger.error("celery-flows: giving up the webhook of flow %s to %s after "
                             "%d attempts", fid, where, attempts)
        finally:
            store.unlock_webhook(fid)
    return delivered
