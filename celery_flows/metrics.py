"""Prometheus metrics (SPEC section 11), read from the registry at scrape time; needs
the optional extra ``celery-flows[metrics]`` (prometheus_client).

``collector(app)`` is a custom collector to register in an existing registry::

    from prometheus_client import REGISTRY
    REGISTRY.register(celery_flows.metrics.collector(app))

The dashboard serves ``/metrics`` and ``celery flows metrics --port`` serves it alone.
No label carries a flow or node id: flows and nodes are counted by state, slots by
queue, backlogs by limiter. Flows are those of the index's newest ``MAX_FLOWS``
(as ``flows stats``); nodes are those of the unfinished flows among them, read whole
for a flow of at most ``COUNT_NODES`` nodes, from its counters for a bigger one (its
finished nodes as ``succeeded`` or ``failed``, the rest as ``pending``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .observe.stats import MAX_FLOWS
from .registry.ids import queue_limiter

if TYPE_CHECKING:
    from .core import Flows

__all__ = ["FlowsCollector", "collector", "exposition", "serve"]

COUNT_NODES = 2000
_FINISHED = ("succeeded", "failed", "cancelled")


class FlowsCollector(Collector):
    """Reads the registry of one app on every ``collect()``."""

    def __init__(self, flows: Flows) -> None:
        self.flows = flows

    def collect(self) -> Iterator[Any]:
        store, config = self.flows.store, self.flows.config
        flow_states: Counter[str] = Counter()
        node_states: Counter[str] = Counter()
        start = 0
        more = True
        while more and start < MAX_FLOWS:
            rows, more = store.flow_summaries(start, 500)
            start += len(rows)
            for fid, meta in rows:
                if meta is None:
                    continue
                state = meta.get("state", "")
                flow_states[state] += 1
                if state in _FINISHED:
                    continue
                total, done = int(meta.get("total") or 0), int(meta.get("done") or 0)
                if total <= COUNT_NODES:
                    node_states.update(rec["state"] for rec in store.nodes(fid).values())
                else:
                    full = store.meta(fid) or {}
                    failed = int(full.get("nfail") or 0)
                    node_states.update({"succeeded": done - failed, "failed": failed,
                                        "pending": total - done})
        flows = GaugeMetricFamily("celery_flows_flows", "Flows by state", labels=["state"])
        for state, n in sorted(flow_states.items()):
            flows.add_metric([state], n)
        yield flows
        nodes = GaugeMetricFamily("celery_flows_nodes", "Nodes of unfinished flows by state",
                                  labels=["state"])
        for state, n in sorted(node_states.items()):
            nodes.add_metric([state], n)
        yield nodes
        slots = GaugeMetricFamily("celery_flows_queue_slots",
                                  "Flow tasks queued or running on a capped queue",
                                  labels=["queue"])
        for queue in sorted(config.queue_limits):
            slots.add_metric([queue], store.slots_used(queue_limiter(queue)))
        yield slots
        backlog = GaugeMetricFamily("celery_flows_limiter_backlog",
                                    "Nodes held by a limiter", labels=["limiter"])
        for limiter in sorted(set(store.rate_limiters()) | set(store.waiting_limiters())):
            backlog.add_metric([limiter], store.waiting(limiter))
        yield backlog
        recoveries = CounterMetricFamily("celery_flows_recoveries",
                                         "Nodes recovered from lost workers")
        recoveries.add_metric([], store.recoveries_total())
        yield recoveries
        workers = GaugeMetricFamily("celery_flows_workers", "Workers with a live heartbeat")
        now = store.time()
        workers.add_metric([], sum(1 for beat, _ in store.workers().values()
                                   if now - beat <= config.lease_timeout))
        yield workers


def _flows_of(app: Any) -> Flows:
    from .core import Flows

    flows = getattr(app, "flows", None)
    if not isinstance(flows, Flows):
        raise TypeError("needs a Celery app with celery-flows attached: Flows(app)")
    return flows


def collector(app: Any) -> FlowsCollector:
    """A collector of the app's registry, to register in a prometheus_client registry."""
    return FlowsCollector(_flows_of(app))


def exposition(flows: Flows) -> tuple[bytes, str]:
    """The Prometheus text format of the app's metrics, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FlowsCollector(flows))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve(app: Any, port: int, host: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` alone on a background thread (prometheus_client's server)."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector(app))
    return start_http_server(port, addr=host, registry=registry)
