"""The longest single Redis command of each large transition, measured without any
worker running: ``python benchmarks/chunk_slowlog.py [N]`` (default 20,000 nodes;
``BENCH_ROOT=<checkout>`` measures another checkout).

SLOWLOG times a command by the wall clock. On this 2-core machine a worker's two
processes, the producer and redis-server compete for the cores, so under a running
worker a command's figure includes the time Redis waited for a core (an LPUSH was seen
at 22 ms). Here the producer process does what a worker would (``complete`` then the
dispatcher's ``drain``), so each figure is what the script itself costs:

- submit: ``flows.submit`` of N independent nodes (all N released and published);
- cancel: ``flows.cancel`` of that flow;
- release: a root then N dependents; the root's completion and the drain that
  publishes the N;
- retry: N nodes recorded failed, then ``flows.retry`` (which drains what it reopens);
- fan-in: N dependencies of one sink recorded succeeded, the last with the drain that
  publishes the sink (the first N - 1 completions are not in the figure);
- fan-in-args: the same with a sink that takes the N results (``.s()``), whose message
  carries the list of N results;
- map: a map of N items expanding in the completion of its input (its elements staged
  first) and the drain that publishes the N items;
- map-collect: the last item's completion, the map's collection of the N results as
  its own, and the release of its dependent.

``python benchmarks/chunk_slowlog.py N PHASE...`` measures only the phases named.

Prints the five longest commands of each phase, by script name.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("BENCH_ROOT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

from celery_flows.testing import RedisServer  # noqa: E402


def longest(client: Any, names: dict[str, str]) -> tuple[list[tuple[float, str]], str]:
    """The five longest commands since the last SLOWLOG RESET, (ms, script or command),
    and each script's calls, median and longest."""
    def label(entry: dict[str, Any]) -> str:
        cmd = entry["command"]
        words = (cmd.decode(errors="replace") if isinstance(cmd, bytes) else str(cmd)).split()
        if words[0].upper() == "EVALSHA":
            return names.get(words[1], "EVALSHA ?")
        return words[0].upper()

    log = [(e["duration"] / 1000.0, label(e)) for e in client.slowlog_get(1_000_000)]
    log = [e for e in log if not e[1].startswith(("SLOWLOG", "CONFIG"))]
    by: dict[str, list[float]] = {}
    for ms, name in log:
        by.setdefault(name, []).append(ms)
    rows = []
    for name, times in sorted(by.items()):
        if name.endswith(".lua"):
            times.sort()
            rows.append(f"{name} x{len(times)} median {times[len(times) // 2]:.2f} "
                        f"p99 {times[int(len(times) * 0.99)]:.2f} max {times[-1]:.2f}")
    return sorted(log, reverse=True)[:5], "\n           ".join(rows)


def main(n: int, only: list[str]) -> None:
    server = RedisServer().start()
    try:
        os.environ["BENCH_REDIS_URL"] = server.celery_url()
        bench: Any = importlib.import_module("benchmarks.bench_app")
        import celery_flows
        from celery_flows import Flow
        from celery_flows.registry.scripts import script_texts

        print(f"celery_flows from {celery_flows.__file__}, {n} nodes")
        client = server.client()
        client.config_set("slowlog-max-len", 1_000_000)
        flows = bench.flows
        store = flows.store
        names = {store.sha(s): f"{s}.lua" for s in script_texts()}

        def phase(label: str, action: Any) -> None:
            if only and label not in only:
                action()
                return
            client.config_set("slowlog-log-slower-than", 0)
            client.slowlog_reset()
            started = time.perf_counter()
            action()
            took = time.perf_counter() - started
            client.config_set("slowlog-log-slower-than", 10_000)
            five, scripts = longest(client, names)
            top = ", ".join(f"{name} {ms:.2f}" for ms, name in five)
            print(f"{label:8} {took:6.2f} s   longest (ms): {top}\n           {scripts}")

        def wanted(*labels: str) -> bool:
            return not only or any(label in only for label in labels)

        if wanted("submit", "cancel"):
            f = Flow("wide")
            for i in range(n):
                f.add(bench.noop.si(), id=f"n{i}")
            held: list[Any] = []
            phase("submit", lambda: held.append(flows.submit(f)))
            phase("cancel", lambda: flows.cancel(held[0].id))
            client.flushdb()

        if wanted("release"):
            f = Flow("release")
            root = f.add(bench.noop.si(), id="root")
            for i in range(n):
                f.add(bench.noop.si(), id=f"n{i}", after=[root])
            h = flows.submit(f)

            def release() -> None:
                store.complete(h.id, "root", 1, "succeeded", flows.codec.dump_result(None))
                flows.engine.dispatcher.drain(h.id)

            phase("release", release)
            queued = sum(1 for r in store.nodes(h.id).values() if r["state"] == "queued")
            assert queued == n, queued
            client.flushdb()

        if wanted("retry"):
            f = Flow("retry")
            for i in range(n):
                f.add(bench.noop.si(), id=f"n{i}")
            h = flows.submit(f)
            for i in range(n):
                store.complete(h.id, f"n{i}", 1, "failed", b"", "RuntimeError: boom")
            assert h.state().value == "failed", h.state()
            phase("retry", lambda: flows.retry(h.id))
            client.flushdb()

        if wanted("map", "map-collect"):
            # a map of N items: its expansion in the completion of its input (the
            # elements staged first), then its collection: the last item's completion,
            # the map's claim, the N results read and recorded as the map's, the sink
            f = Flow("map")
            src = f.add(bench.noop.si(), id="src")
            each = f.map(bench.inc.s(), over=src, id="each", max_length=n)
            f.add(bench.tsum.s(), id="sink", after=[each])
            h = flows.submit(f)
            outcomes = flows.engine.outcomes
            phase("map", lambda: outcomes.record(h.id, "src", 1, "succeeded",
                                                 result=list(range(n))))
            states = store.nodes(h.id)
            assert sum(1 for i in range(n) if states[f"each[{i}]"]["state"] == "queued") == n
            done = flows.codec.dump_result(1)
            for i in range(n - 1):
                store.complete(h.id, f"each[{i}]", 1, "succeeded", done)
            phase("map-collect", lambda: outcomes.record(h.id, f"each[{n - 1}]", 1,
                                                         "succeeded", result=1))
            assert store.node(h.id, "sink")["state"] == "queued"
            assert flows.codec.load_result(store.results(h.id, ["each"])["each"]) == [1] * n
            client.flushdb()

        for label, sink in (("fan-in", bench.noop.si()), ("fan-in-args", bench.collect.s())):
            if not wanted(label):
                continue
            f = Flow(label)
            deps = [f.add(bench.noop.si(), id=f"d{i}").id for i in range(n)]
            f.add(sink, id="sink", after=deps)
            h = flows.submit(f)
            done = flows.codec.dump_result(None)
            for nid in deps[:-1]:
                store.complete(h.id, nid, 1, "succeeded", done)

            def last(fid: str = h.id, nid: str = deps[-1], done: bytes = done) -> None:
                store.complete(fid, nid, 1, "succeeded", done)
                flows.engine.dispatcher.drain(fid)

            phase(label, last)
            assert store.node(h.id, "sink")["state"] == "queued"
            client.flushdb()
    finally:
        server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000, sys.argv[2:])
