"""Fair share of a rate limit: ``python3 example_project/run.py fair``.

::

    backfill: 200 calls ─┐
                         ├─► the rate group "partner-api", 20 releases a second
    lookup:     5 calls ─┘

The app sets ``flows_rate_limits = {"partner-api": "20/s"}`` (proj.py). A backfill of
200 calls is submitted first, then a lookup of 5 calls, both naming the group. One
queue would release the backfill's 10 s backlog before the lookup; the limit serves its
waiting flows round-robin instead, so the lookup is done in about half a second (two
releases per call of it). ``run.py fair`` prints when the lookup finished and how many
backfill calls were still waiting then, and cancels the backfill.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from celery_flows import Flow, FlowState
from example_project.proj import flows


@flows.task(flow_rate_limit="partner-api")
def call_api(request: int) -> int:
    """Pretend to call a partner's API, which allows 20 calls a second in all."""
    return request


def build_calls(name: str, calls: int) -> Flow:
    f = Flow(name)
    for i in range(calls):
        f.add(call_api.s(i), id=f"call-{i}")
    return f


def run_fair(log: Callable[[str], None], timeout: float) -> int:
    """0 when the lookup finished while most of the backfill still waited."""
    backfill = flows.submit(build_calls("backfill", 200))
    t0 = time.time()
    lookup = flows.submit(build_calls("lookup", 5))
    log(f"submitted backfill {backfill.id} (200 calls), then lookup {lookup.id} (5 calls)")
    state = lookup.wait(timeout=timeout)
    took = time.time() - t0
    states = backfill.node_states().values()
    waiting = sum(1 for s in states if s in ("pending", "scheduled"))
    log(f"lookup {state.value} {took:.2f} s after its submit; {waiting} of the backfill's "
        "200 calls were still waiting for the limit")
    flows.cancel(backfill.id)
    log("backfill cancelled")
    return 0 if state is FlowState.SUCCEEDED and waiting > 100 else 1
