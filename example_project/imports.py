"""Nightly imports, at most one running per tenant: ``python3 example_project/run.py
imports``.

::

    extract ──► load        one flow per tenant and night, concurrency=("tenant", <tenant>)

The app sets ``flows_concurrency_limits = {"tenant": 1}`` (proj.py): while an import of
a tenant runs, that tenant's next imports wait (flow state ``waiting``, nothing of them
released) and start one after the other in the order they were submitted; another
tenant's imports are not held back. ``run.py imports`` submits three nights of
``acme`` and one of ``globex``, prints what each waits for, then when each ran.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery_flows import Flow
from example_project.proj import flows

#: (tenant, night) of the imports run.py submits, in this order
NIGHTS = [("acme", "2024-05-01"), ("acme", "2024-05-02"), ("globex", "2024-05-01"),
          ("acme", "2024-05-03")]


@flows.task
def extract(tenant: str, night: str) -> dict[str, Any]:
    """Pretend to pull one night's export of a tenant; notes when it began."""
    started = time.time()
    time.sleep(0.5)
    return {"tenant": tenant, "night": night, "started": started}


@flows.task
def load(batch: dict[str, Any]) -> dict[str, Any]:
    """Pretend to load the export into the tenant's warehouse; notes when it ended."""
    time.sleep(0.3)
    return {**batch, "finished": time.time()}


def build_import(tenant: str, night: str) -> Flow:
    """One tenant's import of one night, in the tenant's concurrency group key."""
    f = Flow("nightly-import", concurrency=("tenant", tenant),
             context={"tenant": tenant, "night": night})
    extracted = f.add(extract.s(tenant, night), id="extract")
    f.add(load.s(), id="load", after=[extracted])
    return f


def run_imports(log: Callable[[str], None], timeout: float) -> int:
    """Submit NIGHTS, say what each waits for, wait, and show when each ran. 0 when every
    import succeeded and acme's never overlapped."""
    handles = [flows.submit(build_import(tenant, night)) for tenant, night in NIGHTS]
    for (tenant, night), h in zip(NIGHTS, handles, strict=True):
        wait = h.inspect()["waiting_for"]
        why = (f"waits for a place of tenant {wait['key']!r} (number {wait['position']} "
               "in line)" if wait else "admitted")
        log(f"import {tenant} {night}: {h.state().value}, {why}")
    t0 = time.time()
    ok = all(h.wait(timeout=timeout).value == "succeeded" for h in handles)
    acme = []
    for (tenant, night), h in zip(NIGHTS, handles, strict=True):
        done = h.results().get("load")
        if done is None:
            log(f"import {tenant} {night}: {h.state().value}")
            continue
        log(f"import {tenant} {night}: ran {done['started'] - t0:+.2f}s .. "
            f"{done['finished'] - t0:+.2f}s")
        if tenant == "acme":
            acme.append((done["started"], done["finished"]))
    # in submission order, each after the one before had ended
    serial = all(a[1] <= b[0] for a, b in zip(acme, acme[1:], strict=False))
    log("acme's imports ran one at a time, in the order submitted" if serial
        else "acme's imports overlapped!")
    return 0 if ok and serial else 1
