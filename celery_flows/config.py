"""``flows_*`` settings read once from ``app.conf`` into a validated object, and the one
place that makes URLs and secrets safe to show.

Celery reads a setting in several spellings: ``flows_retention`` in ``app.conf``,
``FLOWS_RETENTION`` from an upper-case config module, and ``CELERY_FLOWS_RETENTION``
(or ``<NAMESPACE>_FLOWS_RETENTION``) under ``config_from_object(..., namespace=...)``.
All of them are read here, and any other ``flows_*`` name in any of those spellings is
refused with the closest known key: a typo must not silently disable a limit.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import FlowsConfigError

RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*$")
PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
REDIS_SCHEMES = ("redis://", "rediss://", "redis+socket://", "unix://")
HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$|^\[[0-9A-Fa-f:.]+\]$")

#: SPEC section 1: every setting celery-flows reads (without the ``flows_`` prefix).
KNOWN = (
    "redis_url", "redis_cluster", "key_prefix", "retention", "rate_limits", "queue_limits",
    "webhook_url", "webhook_secret", "lease_timeout", "max_recoveries", "max_result_bytes",
    "max_nodes", "webhook_allowed_hosts", "concurrency_limits", "events_maxlen",
    "dashboard_token", "dashboard_show_args",
)  # fmt: skip


def parse_rate(value: str) -> float:
    """Interval in seconds between releases for ``"N/s|m|h"``; ValueError if malformed."""
    m = RATE_RE.match(value) if isinstance(value, str) else None
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a rate; use 'N/s', 'N/m' or 'N/h' with N > 0")
    return PERIODS[m.group(2)] / float(m.group(1))


# -- redaction: every URL or secret that reaches a message goes through these -----------


def redact_url(url: Any) -> str:
    """A Redis (or any) URL without its password: ``redis://user:***@host:6379/0``."""
    text = str(url)
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
    except ValueError:
        return "<unparseable URL>"
    if "@" not in netloc:
        return text
    userinfo, _, hostport = netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    safe = f"{user}:***@{hostport}" if ":" in userinfo else f"***@{hostport}"
    return parts._replace(netloc=safe).geturl()


def redact_webhook(url: Any) -> str:
    """A webhook URL as ``scheme://host:port``: its path, query and credentials may
    carry a token."""
    try:
        parts = urlsplit(str(url))
        host = parts.hostname or "?"
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "<unparseable URL>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme or '?'}://{host}:{port}"


def scrub(text: str, config: FlowsConfig | None = None, *urls: Any) -> str:
    """``text`` (an exception message, say) with every secret of ``config`` and of the
    given URLs cut out."""
    secrets: list[str] = []
    values = list(urls)
    if config is not None:
        values += [config.redis_url, config.webhook_url]
        secrets += [s for s in (config.webhook_secret, config.dashboard_token) if s]
    for url in values:
        if not url:
            continue
        url = str(url)
        secrets.append(url)
        try:
            parts = urlsplit(url)
        except ValueError:
            continue
        secrets += [p for p in (parts.password, parts.path, parts.query, parts.netloc)
                    if p and len(p) > 1]
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


# -- reading ---------------------------------------------------------------------------


def _broker_redis_url(app: Any) -> str | None:
    url = app.conf.broker_url
    if isinstance(url, (list, tuple)):
        url = url[0] if url else None
    if isinstance(url, str) and url.startswith(REDIS_SCHEMES[:3]):
        return url
    return None


def _setting_name(key: str, namespace: str | None) -> str | None:
    """The ``flows_`` setting a conf key spells, if Celery would read it as one.

    Without a namespace Celery reads ``flows_x``, ``FLOWS_X`` and (old style)
    ``CELERY_FLOWS_X``; under ``namespace="NS"`` it reads ``NS_FLOWS_X`` (case matched
    to the namespace) and ``flows_x`` set on ``app.conf``, while other upper-case names
    of the config object (a Django project's ``FLOWS_ENABLED``) are not Celery's."""
    lower = key.lower()
    if lower.startswith("flows_") and (not namespace or key == lower):
        return lower[len("flows_"):]
    prefix = (namespace.rstrip("_").lower() + "_") if namespace else "celery_"
    if lower.startswith(prefix + "flows_"):
        return lower[len(prefix) + len("flows_"):]
    return None


def collect(app: Any) -> dict[str, tuple[str, Any]]:
    """``{known name: (key as the user wrote it, value)}`` over every spelling; raises
    for an unknown ``flows_*`` key or one setting given twice with different values."""
    found: dict[str, tuple[str, Any]] = {}
    namespace = getattr(app, "namespace", None) or None
    for key in list(app.conf.keys()):
        name = _setting_name(key, namespace) if isinstance(key, str) else None
        if name is None:
            continue
        value = app.conf.get(key)
        if name not in KNOWN:
            given = key[: len(key) - len(name)]
            close = difflib.get_close_matches(name, KNOWN, n=1, cutoff=0.5)
            if close:
                suggestion = close[0].upper() if key.isupper() else close[0]
                hint = f"did you mean {given}{suggestion}?"
            else:
                hint = "known: " + ", ".join("flows_" + k for k in KNOWN)
            raise FlowsConfigError(f"app.conf.{key} is not a celery-flows setting; {hint}")
        if value is None:
            continue
        if name in found and found[name][1] != value:
            raise FlowsConfigError(f"app.conf.{found[name][0]} and app.conf.{key} are the "
                                   "same setting with different values; keep one")
        found[name] = (key, value)
    return found


def _whole(value: Any, least: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= least


@dataclass(frozen=True)
class FlowsConfig:
    redis_url: str
    redis_cluster: bool = False
    key_prefix: str = "flows"
    retention: int = 604800
    rate_limits: dict[str, str] = field(default_factory=dict)
    queue_limits: dict[str, int] = field(default_factory=dict)
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    lease_timeout: float = 60.0
    max_recoveries: int = 3
    max_result_bytes: int = 1048576
    max_nodes: int = 100000
    webhook_allowed_hosts: tuple[str, ...] | None = None
    concurrency_limits: dict[str, int] = field(default_factory=dict)
    events_maxlen: int = 100000
    dashboard_token: str | None = field(default=None, repr=False)
    dashboard_show_args: bool = False

    def __repr__(self) -> str:
        return (f"FlowsConfig(redis_url={redact_url(self.redis_url)!r}, "
                f"key_prefix={self.key_prefix!r}, cluster={self.redis_cluster})")

    def webhook_allowed(self, url: str) -> bool:
        """Whether ``url``'s host is in ``flows_webhook_allowed_hosts`` (when set)."""
        if self.webhook_allowed_hosts is None:
            return True
        try:
            host = (urlsplit(url).hostname or "").lower()
        except ValueError:
            return False
        return host in self.webhook_allowed_hosts

    @classmethod
    def from_app(cls, app: Any) -> FlowsConfig:
        given = collect(app)

        def get(name: str, default: Any) -> Any:
            return given[name][1] if name in given else default

        def bad(name: str, why: str) -> FlowsConfigError:
            key = given[name][0] if name in given else f"flows_{name}"
            return FlowsConfigError(f"app.conf.{key}: {why}")

        redis_url = get("redis_url", None) or _broker_redis_url(app)
        if not redis_url:
            raise bad("redis_url",
                      "required because the broker is not Redis; set it to a redis:// URL")
        if not isinstance(redis_url, str) or not redis_url.startswith(REDIS_SCHEMES):
            # the value itself is not shown: a malformed URL may carry a password
            scheme = redis_url.partition("://")[0] if isinstance(redis_url, str) and \
                re.match(r"^[a-z][a-z0-9+.-]*://", redis_url) else None
            what = f"a {scheme}:// URL" if scheme else f"not a URL ({type(redis_url).__name__})"
            raise bad("redis_url", f"is {what}; use a redis://, rediss:// or "
                      "redis+socket:// URL")
        cluster = get("redis_cluster", False)
        if not isinstance(cluster, bool):
            raise bad("redis_cluster", "must be True or False")
        prefix = get("key_prefix", "flows")
        if not isinstance(prefix, str) or not prefix or re.search(r"[\s{}]", prefix):
            raise bad("key_prefix", "must be a non-empty string without spaces or braces")
        retention = get("retention", 604800)
        if not _whole(retention, 1):
            raise bad("retention", "must be a whole number of seconds >= 1")
        rate_limits = get("rate_limits", {})
        if not isinstance(rate_limits, dict):
            raise bad("rate_limits", "must be a dict of group name -> 'N/s|m|h'")
        for name, rate in rate_limits.items():
            if not isinstance(name, str) or not name or RATE_RE.match(name):
                raise bad("rate_limits", f"group name {name!r} must be a non-empty "
                          "string that is not itself a rate")
            try:
                parse_rate(rate)
            except ValueError as exc:
                raise bad("rate_limits", f"group {name!r}: {exc}") from None
        queue_limits = _int_map(get("queue_limits", {}), "queue", lambda why: bad(
            "queue_limits", why))
        concurrency = _int_map(get("concurrency_limits", {}), "group", lambda why: bad(
            "concurrency_limits", why))
        allowed = get("webhook_allowed_hosts", None)
        if allowed is not None:
            if isinstance(allowed, (str, bytes)) or not isinstance(allowed, (list, tuple,
                                                                             set, frozenset)):
                raise bad("webhook_allowed_hosts", "must be a list of host names, e.g. "
                          "['hooks.example.com']")
            for host in allowed:
                if not isinstance(host, str) or not HOST_RE.match(host):
                    raise bad("webhook_allowed_hosts", f"{host!r} is not a host name (no "
                              "scheme, port or path: 'hooks.example.com')")
            allowed = tuple(sorted({h.lower().strip("[]") for h in allowed}))
        webhook_url = get("webhook_url", None)
        if webhook_url is not None and (
            not isinstance(webhook_url, str) or not webhook_url.startswith(("http://", "https://"))
        ):
            raise bad("webhook_url", "only http:// and https:// URLs are accepted")
        secret = get("webhook_secret", None)
        if secret is not None and not isinstance(secret, (str, bytes)):
            raise bad("webhook_secret", "must be a string")
        lease = get("lease_timeout", 60)
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or lease <= 0:
            raise bad("lease_timeout", "must be a number of seconds > 0")
        max_rec = get("max_recoveries", 3)
        if not _whole(max_rec, 0):
            raise bad("max_recoveries", "must be an int >= 0")
        max_bytes = get("max_result_bytes", 1048576)
        if not _whole(max_bytes, 1):
            raise bad("max_result_bytes", "must be an int >= 1")
        max_nodes = get("max_nodes", 100000)
        if not _whole(max_nodes, 1):
            raise bad("max_nodes", "must be an int >= 1")
        maxlen = get("events_maxlen", 100000)
        if not _whole(maxlen, 1):
            raise bad("events_maxlen", "must be an int >= 1")
        token = get("dashboard_token", None)
        if token is not None and (not isinstance(token, str) or not token):
            raise bad("dashboard_token", "must be a non-empty string (or None: the "
                      "dashboard is then read-only)")
        show_args = get("dashboard_show_args", False)
        if not isinstance(show_args, bool):
            raise bad("dashboard_show_args", "must be True or False")
        config = cls(
            redis_url=redis_url,
            redis_cluster=cluster,
            key_prefix=prefix,
            retention=retention,
            rate_limits=dict(rate_limits),
            queue_limits=queue_limits,
            webhook_url=webhook_url,
            webhook_secret=secret.decode() if isinstance(secret, bytes) else secret,
            lease_timeout=float(lease),
            max_recoveries=max_rec,
            max_result_bytes=max_bytes,
            max_nodes=max_nodes,
            webhook_allowed_hosts=allowed,
            concurrency_limits=concurrency,
            events_maxlen=maxlen,
            dashboard_token=token,
            dashboard_show_args=show_args,
        )
        if webhook_url is not None and not config.webhook_allowed(webhook_url):
            raise bad("webhook_url", f"host of {redact_webhook(webhook_url)} is not in "
                      "flows_webhook_allowed_hosts; add it there or change the URL")
        return config


def _int_map(value: Any, what: str, bad: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise bad(f"must be a dict of {what} name -> int >= 1")
    for name, cap in value.items():
        if not isinstance(name, str) or not name:
            raise bad(f"{what} name {name!r} must be a non-empty string")
        if not _whole(cap, 1):
            raise bad(f"{what} {name!r}: {cap!r} must be an int >= 1")
    return dict(value)
