"""``flows_*`` settings read once from ``app.conf`` into a validated object."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import FlowsConfigError

RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*$")
PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
REDIS_SCHEMES = ("redis://", "rediss://", "redis+socket://", "unix://")


def parse_rate(value: str) -> float:
    """Interval in seconds between releases for ``"N/s|m|h"``; ValueError if malformed."""
    m = RATE_RE.match(value) if isinstance(value, str) else None
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a rate; use 'N/s', 'N/m' or 'N/h' with N > 0")
    return PERIODS[m.group(2)] / float(m.group(1))


def _broker_redis_url(app: Any) -> str | None:
    url = app.conf.broker_url
    if isinstance(url, (list, tuple)):
        url = url[0] if url else None
    if isinstance(url, str) and url.startswith(REDIS_SCHEMES[:3]):
        return url
    return None


@dataclass(frozen=True)
class FlowsConfig:
    redis_url: str
    redis_cluster: bool = False
    key_prefix: str = "flows"
    retention: int = 604800
    rate_limits: dict[str, str] = field(default_factory=dict)
    queue_limits: dict[str, int] = field(default_factory=dict)
    webhook_url: str | None = None
    webhook_secret: str | None = None
    lease_timeout: float = 60.0
    max_recoveries: int = 3
    max_result_bytes: int = 1048576
    max_nodes: int = 100000

    @classmethod
    def from_app(cls, app: Any) -> FlowsConfig:
        conf = app.conf

        def get(key: str, default: Any) -> Any:
            value = conf.get(key, None)
            return default if value is None else value

        def bad(key: str, why: str) -> FlowsConfigError:
            return FlowsConfigError(f"app.conf.{key}: {why}")

        redis_url = get("flows_redis_url", None) or _broker_redis_url(app)
        if not redis_url:
            raise bad(
                "flows_redis_url",
                "required because the broker is not Redis; set it to a redis:// URL",
            )
        if not isinstance(redis_url, str) or not redis_url.startswith(REDIS_SCHEMES):
            raise bad("flows_redis_url", f"{redis_url!r} is not a redis://, rediss:// or "
                      "redis+socket:// URL")
        cluster = get("flows_redis_cluster", False)
        if not isinstance(cluster, bool):
            raise bad("flows_redis_cluster", "must be True or False")
        prefix = get("flows_key_prefix", "flows")
        if not isinstance(prefix, str) or not prefix or re.search(r"[\s{}]", prefix):
            raise bad("flows_key_prefix", "must be a non-empty string without spaces or braces")
        retention = get("flows_retention", 604800)
        if isinstance(retention, bool) or not isinstance(retention, int) or retention < 1:
            raise bad("flows_retention", "must be a whole number of seconds >= 1")
        rate_limits = get("flows_rate_limits", {})
        if not isinstance(rate_limits, dict):
            raise bad("flows_rate_limits", "must be a dict of group name -> 'N/s|m|h'")
        for name, rate in rate_limits.items():
            if not isinstance(name, str) or not name or RATE_RE.match(name):
                raise bad("flows_rate_limits", f"group name {name!r} must be a non-empty "
                          "string that is not itself a rate")
            try:
                parse_rate(rate)
            except ValueError as exc:
                raise bad("flows_rate_limits", f"group {name!r}: {exc}") from None
        queue_limits = get("flows_queue_limits", {})
        if not isinstance(queue_limits, dict):
            raise bad("flows_queue_limits", "must be a dict of queue name -> int >= 1")
        for queue, cap in queue_limits.items():
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise bad("flows_queue_limits", f"queue {queue!r}: cap {cap!r} must be an "
                          "int >= 1")
        webhook_url = get("flows_webhook_url", None)
        if webhook_url is not None and (
            not isinstance(webhook_url, str) or not webhook_url.startswith(("http://", "https://"))
        ):
            raise bad("flows_webhook_url", "only http:// and https:// URLs are accepted")
        secret = get("flows_webhook_secret", None)
        if secret is not None and not isinstance(secret, (str, bytes)):
            raise bad("flows_webhook_secret", "must be a string")
        lease = get("flows_lease_timeout", 60)
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or lease <= 0:
            raise bad("flows_lease_timeout", "must be a number of seconds > 0")
        max_rec = get("flows_max_recoveries", 3)
        if isinstance(max_rec, bool) or not isinstance(max_rec, int) or max_rec < 0:
            raise bad("flows_max_recoveries", "must be an int >= 0")
        max_bytes = get("flows_max_result_bytes", 1048576)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise bad("flows_max_result_bytes", "must be an int >= 1")
        max_nodes = get("flows_max_nodes", 100000)
        if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1:
            raise bad("flows_max_nodes", "must be an int >= 1")
        return cls(
            redis_url=redis_url,
            redis_cluster=cluster,
            key_prefix=prefix,
            retention=retention,
            rate_limits=dict(rate_limits),
            queue_limits=dict(queue_limits),
            webhook_url=webhook_url,
            webhook_secret=secret.decode() if isinstance(secret, bytes) else secret,
            lease_timeout=float(lease),
            max_recoveries=max_rec,
            max_result_bytes=max_bytes,
            max_nodes=max_nodes,
        )
