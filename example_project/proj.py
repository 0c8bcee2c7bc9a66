"""The example app: a daily sales report for one tenant, built as a flow.

::

    fetch-orders    ──► transform-orders    ──┐
    fetch-refunds   ──► transform-refunds   ──┤
    fetch-inventory ──► transform-inventory ──┼──► aggregate ──► report
    fetch-web       ──► transform-web       ──┘

The fetches run in parallel on the ``io`` queue; each transform receives its fetch's
rows; ``aggregate`` receives the list of the transforms' summaries (fan-in, in
``after`` order); ``report`` receives the aggregate. The tenant and the report date are
the flow's context, which tasks read through ``current_flow.context``; fetches and the
aggregation report milestones with ``current_flow.progress()``, shown by
``celery -A example_project.proj flows inspect FLOW_ID``.

Broker, result backend and flow registry share one Redis, named by the environment
variable ``EXAMPLE_REDIS_URL`` (``run.py`` sets it to a ``redis+socket://`` URL).
Start a worker with ``celery -A example_project.proj worker --flows -Q celery,io``.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from typing import Any

from celery import Celery

from celery_flows import Flow, Flows, Node, current_flow

REDIS_URL = os.environ.get("EXAMPLE_REDIS_URL", "redis://localhost:6379/0")

# the other examples' tasks (run.py crawl: a map over the pages a crawl finds; run.py
# imports: nightly imports, one per tenant at a time; run.py fair: fair share of a rate)
app = Celery("example_project", broker=REDIS_URL, backend=REDIS_URL,
             include=["example_project.crawl", "example_project.imports",
                      "example_project.fairness"])
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    # How long a finished flow stays inspectable with `celery flows inspect`.
    flows_retention=24 * 3600,
    # At most one nightly import per tenant at a time (imports.py): a tenant's further
    # imports wait, in the order they were submitted.
    flows_concurrency_limits={"tenant": 1},
    # A partner API's limit, shared by every flow that calls it (fairness.py).
    flows_rate_limits={"partner-api": "20/s"},
)
flows = Flows(app)

#: The simulated upstream systems, by node-id-safe name.
SOURCES: tuple[str, ...] = ("orders", "refunds", "inventory", "web")

Row = dict[str, Any]


def _rng(*parts: str) -> random.Random:
    """A generator seeded by its inputs, so the same tenant and date give the same data."""
    seed = hashlib.sha256("|".join(parts).encode()).digest()
    return random.Random(int.from_bytes(seed[:8], "big"))


@flows.task(queue="io")
def fetch(source: str) -> list[Row]:
    """Pretend to call an upstream API: deterministic rows for (tenant, date, source)."""
    ctx = current_flow.context
    rng = _rng(ctx["tenant"], ctx["report_date"], source)
    time.sleep(0.2 + rng.random() * 0.3)  # network latency
    rows = [
        {"sku": f"SKU-{rng.randrange(1, 40):03d}", "amount": round(rng.uniform(5, 250), 2)}
        for _ in range(rng.randrange(20, 60))
    ]
    current_flow.progress(100, f"fetched {len(rows)} rows from {source}")
    return rows


@flows.task
def transform(rows: list[Row], source: str) -> dict[str, Any]:
    """Clean one source's rows and summarise them (refunds count negative)."""
    sign = -1 if source == "refunds" else 1
    by_sku: dict[str, float] = {}
    for row in rows:
        by_sku[row["sku"]] = by_sku.get(row["sku"], 0.0) + sign * row["amount"]
    return {
        "source": source,
        "rows": len(rows),
        "total": round(sum(by_sku.values()), 2),
        "by_sku": {sku: round(v, 2) for sku, v in by_sku.items()},
    }


@flows.task
def aggregate(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the per-source summaries (one list entry per transform, in order)."""
    totals: dict[str, float] = {}
    per_source: dict[str, float] = {}
    for i, summary in enumerate(summaries, start=1):
        per_source[summary["source"]] = summary["total"]
        if summary["source"] in ("orders", "refunds"):
            for sku, value in summary["by_sku"].items():
                totals[sku] = totals.get(sku, 0.0) + value
        current_flow.progress(100 * i / len(summaries), f"merged {summary['source']}")
    top = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    return {
        "per_source": per_source,
        "net_sales": round(per_source.get("orders", 0.0) + per_source.get("refunds", 0.0), 2),
        "top_skus": [[sku, round(v, 2)] for sku, v in top],
    }


@flows.task
def report(agg: dict[str, Any]) -> str:
    """Render the report text (a real project would e-mail or upload it)."""
    ctx = current_flow.context
    lines = [
        f"Daily sales report for {ctx['tenant']} on {ctx['report_date']}",
        f"  net sales: {agg['net_sales']:.2f}",
        "  by source: " + ", ".join(f"{s}={v:.2f}" for s, v in agg["per_source"].items()),
        "  top SKUs:  " + ", ".join(f"{sku} ({v:.2f})" for sku, v in agg["top_skus"]),
    ]
    return "\n".join(lines)


def build_flow(tenant: str, report_date: str, sources: tuple[str, ...] = SOURCES) -> Flow:
    """The report flow: fetch every source in parallel, transform each, fan in, report."""
    f = Flow("daily-report", context={"tenant": tenant, "report_date": report_date})
    transformed: list[str | Node] = []
    for source in sources:
        fetched = f.add(fetch.s(source), id=f"fetch-{source}")
        transformed.append(f.add(transform.s(source), id=f"transform-{source}", after=[fetched]))
    summary = f.add(aggregate.s(), id="aggregate", after=transformed)
    f.add(report.s(), id="report", after=[summary])
    return f
