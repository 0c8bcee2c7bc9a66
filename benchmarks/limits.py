"""Rate limiter accuracy and overhead: ``python benchmarks/limits.py``.

Against one private redis-server and one prefork worker (``-c 2 --flows``):

- accuracy: nodes of two flows share a limiter group; the release times (``queued_at``,
  Redis TIME) are checked for the most releases in any one-second window against the
  limit, and the time the backlog took against the ideal ``(n - 1) / rate``;
- overhead: a flow of independent nodes under a limit that never binds vs the same flow
  without a limit, median of alternating rounds: the extra time per release is the cost
  of the admission check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from celery_flows.testing import RedisServer, Worker  # noqa: E402

APP = "benchmarks.bench_app"
GROUPS = {"ten": "10/s", "fifty": "50/s", "wide": "100000/s"}


def max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i in range(len(times)):
        while times[i] - times[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best


def accuracy(app: Any, flows: Any, group: str, rate: float, n: int) -> dict[str, Any]:
    from celery_flows import Flow

    handles = []
    for k in range(2):
        f = Flow(f"acc-{group}-{k}")
        for i in range(n // 2):
            f.add(app.tasks["benchmarks.bench_app.inc"].si(i), id=f"n{i}", rate_limit=group)
        handles.append(flows.submit(f))
    for h in handles:
        h.wait(timeout=n / rate + 60)
    times = [node["queued_at"] for h in handles for node in h.inspect()["nodes"].values()]
    span = max(times) - min(times)
    ideal = (len(times) - 1) / rate
    return {"group": group, "limit_per_s": rate, "releases": len(times),
            "peak_per_1s_window": max_in_window(times), "span_s": span, "ideal_s": ideal,
            "span_over_ideal": span / ideal}


def timed_flow(app: Any, flows: Any, n: int, group: str | None) -> float:
    from celery_flows import Flow

    f = Flow("overhead")
    for i in range(n):
        f.add(app.tasks["benchmarks.bench_app.inc"].si(i), id=f"n{i}", rate_limit=group)
    start = time.perf_counter()
    handle = flows.submit(f)
    handle.wait(timeout=120)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="nodes per overhead round")
    parser.add_argument("-r", "--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)
    server = RedisServer()
    log_dir = Path(tempfile.mkdtemp(prefix="cfb-log-"))
    worker: Worker | None = None
    try:
        server.start()
        env = {"BENCH_REDIS_URL": server.celery_url(), "BENCH_RATE_LIMITS": json.dumps(GROUPS)}
        os.environ.update(env)
        from benchmarks import bench_app

        log = log_dir / "worker.log"
        worker = Worker(APP, loglevel="warning", log_path=log, env=env, pythonpath=[ROOT])
        worker.start()
        worker.wait_ready(60, app=bench_app.app)
        acc = [accuracy(bench_app.app, bench_app.flows, "ten", 10.0, 40),
               accuracy(bench_app.app, bench_app.flows, "fifty", 50.0, 150)]
        timed_flow(bench_app.app, bench_app.flows, args.n, None)  # warm-up
        plain, limited = [], []
        for _ in range(args.rounds):
            plain.append(timed_flow(bench_app.app, bench_app.flows, args.n, None))
            limited.append(timed_flow(bench_app.app, bench_app.flows, args.n, "wide"))
        p, lim = statistics.median(plain), statistics.median(limited)
        print("limiter accuracy (two flows sharing a group; release times from Redis TIME)")
        print(f"{'limit':>8} {'releases':>9} {'peak/1s':>8} {'span':>8} {'ideal':>8} "
              f"{'span/ideal':>10}")
        for a in acc:
            print(f"{a['limit_per_s']:>6g}/s {a['releases']:>9} {a['peak_per_1s_window']:>8} "
                  f"{a['span_s']:>7.2f}s {a['ideal_s']:>7.2f}s {a['span_over_ideal']:>10.3f}")
        print(f"\noverhead: {args.n} independent nodes, median of {args.rounds} alternating "
              "rounds")
        print(f"  no limit           {p * 1000:8.1f} ms")
        print(f"  non-binding limit  {lim * 1000:8.1f} ms   ratio {lim / p:.2f}x, "
              f"{(lim - p) / args.n * 1e6:+.0f} us per release")
        if args.json:
            args.json.write_text(json.dumps({"accuracy": acc, "overhead": {
                "nodes": args.n, "plain_median_s": p, "limited_median_s": lim,
                "ratio": lim / p, "per_release_us": (lim - p) / args.n * 1e6}}, indent=2))
        ok = all(a["peak_per_1s_window"] <= a["limit_per_s"] for a in acc)
        return 0 if ok else 1
    finally:
        if worker is not None:
            worker.stop(timeout=20)
        server.cleanup()
        shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
