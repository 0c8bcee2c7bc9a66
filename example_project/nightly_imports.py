"""Nightly imports limited to one per tenant (concurrency groups): run with
``python3 example_project/nightly_imports.py``.

Bootstraps like ``run.py`` (a venv with this repository when needed), starts a private
``redis-server`` and a ``--flows`` worker of ``example_project.proj`` (whose
``flows_concurrency_limits = {"tenant": 1}``), then submits four imports: three nights of
tenant ``acme`` and one of ``globex``. It prints what each flow waits for, then when
each import ran: acme's run one after another in submission order, globex's beside
them. The exit code is 0 only when every import succeeded and acme's never overlapped.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402 - the example's bootstrap and processes, beside this file

NIGHTS = [("acme", "2024-05-01"), ("acme", "2024-05-02"), ("globex", "2024-05-01"),
          ("acme", "2024-05-03")]


def imports(redis_url: str) -> int:
    os.environ["EXAMPLE_REDIS_URL"] = redis_url
    if str(run.ROOT) not in sys.path:
        sys.path.insert(0, str(run.ROOT))
    from example_project.proj import build_import, flows

    handles = [flows.submit(build_import(tenant, night)) for tenant, night in NIGHTS]
    for (tenant, night), h in zip(NIGHTS, handles, strict=True):
        wait = h.inspect()["waiting_for"]
        why = (f"waits for tenant {wait['key']!r} (number {wait['position']} in line)"
               if wait else "admitted")
        run.log(f"import {tenant} {night}: {h.state().value}, {why}")
    t0 = time.time()
    ok = all(h.wait(timeout=60).value == "succeeded" for h in handles)
    spans = {}
    for (tenant, night), h in zip(NIGHTS, handles, strict=True):
        done = h.results()["load"]
        spans[(tenant, night)] = (done["started"], done["finished"])
        run.log(f"import {tenant} {night}: ran {done['started'] - t0:+.2f}s .. "
                f"{done['finished'] - t0:+.2f}s")
    acme = sorted(span for (tenant, _), span in spans.items() if tenant == "acme")
    serial = all(a[1] <= b[0] for a, b in zip(acme, acme[1:], strict=False))
    run.log("acme's imports ran one at a time" if serial else "acme's imports overlapped!")
    return 0 if ok and serial else 1


def main() -> int:
    run.bootstrap(Path(__file__).resolve())
    try:
        with run.processes() as url:
            return imports(url)
    except KeyboardInterrupt:
        run.log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
