"""Webhook delivery for flow events (``succeeded``, ``failed``, ``cancelled``).

When a flow with a webhook (its ``webhook=`` or ``flows_webhook_url``) finishes, the
transition marks it ``webhook_pending`` in its record; whoever drains the flow next
queues it in ``<prefix>:webhooks``. The ``--flows`` workers POST the event as JSON,
signed with HMAC-SHA256 of the body (``X-Flows-Signature: sha256=<hex>``, secret
``flows_webhook_secret``), and retry with exponential backoff. A failing webhook never
changes a flow's state. The event id is stable across retries, so receivers can
deduplicate; ``sent_at`` is the attempt's time (each attempt is signed afresh), so they
can refuse replays. A 3xx answer is a failed delivery: redirects are never followed.

Node events are opt-in (``Flow(webhook_events=("flow", "node"))``): a node that ends
makes the webhook due, and its event goes to the flow's delivery list (keys.py
``hooks``) in the same script (lua/engine/cache.lua). The deliverer posts them from
there, oldest first, each popped once posted, before the flow's own event. Not from the
event stream: that is trimmed at ``flows_events_maxlen``, and a receiver that is down
for a while must still get every node event (at least once: a deliverer that dies
between a post and its pop posts that event again, with the same event id). The list
is never trimmed; it is as long as the node events not yet delivered, and expires with
the flow. Every attempt goes to the flow's delivery log (meta ``webhook_log``), shown
by ``inspect`` and the dashboard.
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
from ..engine.logcontext import flow_scope
from ..registry import Store

__all__ = ["deliver_due", "node_payload", "payload", "post", "sign", "warn_if_unsigned"]

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


_FINISHED = frozenset({"succeeded", "failed", "cancelled"})
_unsigned_warned = False
_unsigned_sent = False


def warn_if_unsigned(config: FlowsConfig) -> None:
    """Warn once per process (at ``--flows`` worker start) when deliveries of the
    configured webhook go unsigned."""
    global _unsigned_warned
    if config.webhook_url and not config.webhook_secret and not _unsigned_warned:
        _unsigned_warned = True
        logger.warning("celery-flows: flows_webhook_url is set without "
                       "flows_webhook_secret: webhook deliveries to %s are unsigned",
                       redact_webhook(config.webhook_url))


def _warn_unsigned_delivery(config: FlowsConfig, where: str) -> None:
    """Warn once per process at the first unsigned delivery. A flow's own ``webhook=``
    is known only at submit, so no start-up check can see it; without this, a
    per-flow webhook would go unsigned with no word to anyone. Silent when the start-up
    warning already said it (the configured URL is the only one then, or the first)."""
    global _unsigned_sent
    if config.webhook_secret or _unsigned_sent:
        return
    _unsigned_sent = True
    if _unsigned_warned and where == redact_webhook(config.webhook_url):
        return
    logger.warning("celery-flows: flows_webhook_secret is not set: webhook deliveries "
                   "are unsigned (the first went to %s); set flows_webhook_secret so "
                   "that receivers can check X-Flows-Signature", where)


def node_payload(store: Store, fid: str, meta: dict[str, str], event: dict[str, Any]
                 ) -> dict[str, Any]:
    """A node event in the format of the flow's, with a ``node`` field."""
    node = event["node"]
    return {
        "event_id": f"{fid}:{node}:{event['state']}:{event['attempt']}:{event['id']}",
        "timestamp": event["time"],
        "flow_id": fid,
        "name": meta.get("name"),
        "state": event["state"],
        "node": node,
        "nodes": {node: {"state": event["state"], "attempts": event["attempt"],
                         "error": event["error"]}},
    }


class _Delivery:
    """The attempts of one flow's due webhook, each signed afresh and logged."""

    def __init__(self, store: Store, config: FlowsConfig, fid: str, url: str) -> None:
        self.store, self.config, self.fid, self.url = store, config, fid, url
        self.where = redact_webhook(url)

    def send(self, event: dict[str, Any]) -> bool:
        event = {**event, "sent_at": self.store.now()}
        body = json.dumps(event, sort_keys=True).encode()
        entry: dict[str, Any] = {"at": event["sent_at"], "event_id": event["event_id"],
                                 "to": self.where, "status": None, "error": None}
        _warn_unsigned_delivery(self.config, self.where)
        try:
            status = post(self.url, body, sign(self.config.webhook_secret, body))
            entry["status"] = status
            ok = 200 <= status < 300
            if not ok:
                entry["error"] = f"answered {status}" + (
                    " (a redirect, not followed)" if 300 <= status < 400 else "")
                logger.warning("celery-flows: webhook of flow %s to %s %s", self.fid,
                               self.where, entry["error"])
        except Exception as exc:
            # an exception's text may quote the URL's path, query or credentials
            entry["error"] = scrub(f"{type(exc).__name__}: {exc}", self.config, self.url)
            logger.warning("celery-flows: webhook of flow %s to %s failed: %s", self.fid,
                           self.where, entry["error"])
            ok = False
        self.store.webhook_note(self.fid, entry)
        return ok

    def node_events(self) -> bool:
        """Post the flow's waiting node events, oldest first; False at a failure."""
        meta = self.store.meta(self.fid) or {}
        while True:
            waiting = self.store.node_events_to_post(self.fid)
            if not waiting:
                return True
            for event_id, body in waiting:
                event = {**json.loads(body), "id": event_id}
                if not self.send(node_payload(self.store, self.fid, meta, event)):
                    return False
                self.store.node_event_posted(self.fid)


def deliver_due(store: Store, config: FlowsConfig) -> int:
    """Deliver the webhooks that are due; returns how many were delivered."""
    delivered = 0
    for fid in store.due_webhooks():
        if not store.lock_webhook(fid, int(TIMEOUT * 3)):
            continue
        try:
            with flow_scope(fid):
                delivered += _deliver(store, config, fid)
        finally:
            store.unlock_webhook(fid)
    return delivered


def _deliver(store: Store, config: FlowsConfig, fid: str) -> int:
    meta = store.meta(fid)
    url = (meta or {}).get("webhook")
    if not meta or meta.get("webhook_pending") != "1" or not url:
        store.webhook_settled(fid, None)
        return 0
    delivery = _Delivery(store, config, fid, url)
    if not config.webhook_allowed(url):
        logger.error("celery-flows: not sending the webhook of flow %s: %s is not "
                     "in flows_webhook_allowed_hosts", fid, delivery.where)
        store.webhook_settled(fid, "refused")
        return 0
    kinds = (meta.get("webhook_events") or "flow").split(",")
    ok = delivery.node_events() if "node" in kinds else True
    finished = meta.get("state") in _FINISHED
    if ok and finished and "flow" in kinds:
        ok = delivery.send(payload(store, fid, meta))
    if ok:
        # a running flow's node events are posted; its end makes the webhook due again
        store.webhook_delivered(fid)
        store.webhook_settled(fid, "0")
        if "node" in kinds and store.node_events_to_post(fid, 1):
            # a node ended after the list was drained, while the flag still said due
            # (so its script left the flag alone): due again, or it would wait for the
            # next node or the flow's end
            store.webhook_due_again(fid)
        return 1
    attempts = store.webhook_failed(fid, MAX_ATTEMPTS, backoff)
    if attempts >= MAX_ATTEMPTS:
        logger.error("celery-flows: giving up the webhook of flow %s to %s after "
                     "%d attempts", fid, delivery.where, attempts)
    return 0
