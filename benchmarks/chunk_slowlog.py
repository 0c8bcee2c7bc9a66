"""The longest single Redis command around the changes of large flows:
``python benchmarks/chunk_slowlog.py`` (``BENCH_ROOT=<checkout>`` measures another).

On a private redis-server with ``slowlog-log-slower-than 0`` (every command logged),
without workers: the cancel of a 20,000-node flow (one root running, 19,999 children),
and the 2,000 completions of a 2,000-wide fan-in's dependencies (each recorded with
complete.lua as a worker would). Prints the longest command (µs) of each, and the
total Redis time of the completions.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("BENCH_ROOT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

from celery_flows.testing import RedisServer  # noqa: E402

SCRIPTS: dict[str, str] = {}


def slowest(client: Any) -> tuple[int, int, str]:
    """(longest µs, total µs, its command) since the last SLOWLOG RESET."""
    def name(entry: dict[str, Any]) -> str:
        command = entry["command"]
        return command.decode(errors="replace") if isinstance(command, bytes) else str(command)

    # the measuring commands themselves (SLOWLOG RESET of a long log, CONFIG) aside
    log = [e for e in client.slowlog_get(1_000_000)
           if not name(e).upper().startswith(("SLOWLOG", "CONFIG"))]
    top = max(log, key=lambda e: e["duration"])
    words = name(top).split()
    label = SCRIPTS.get(words[1], words[1]) if words[0].upper() == "EVALSHA" else words[0]
    if os.environ.get("BENCH_VERBOSE"):
        print(sorted((e["duration"], SCRIPTS.get(name(e).split()[1], "?")) for e in log
                     if name(e).upper().startswith("EVALSHA"))[-8:])
    return top["duration"], sum(e["duration"] for e in log), label


def main() -> None:
    server = RedisServer().start()
    try:
        os.environ["BENCH_REDIS_URL"] = server.celery_url()
        bench: Any = importlib.import_module("benchmarks.bench_app")
        import celery_flows
        from celery_flows import Flow
        print(f"celery_flows from {celery_flows.__file__}")
        client = server.client()
        client.config_set("slowlog-max-len", 1_000_000)
        store = bench.flows.store
        from celery_flows.registry.scripts import script_texts
        SCRIPTS.update({store.sha(n): f"{n}.lua" for n in script_texts()})

        f = Flow("wide", id="wide")
        root = f.add(bench.inc.si(0), id="root")
        for i in range(19_999):
            f.add(bench.inc.s(), id=f"c{i}", after=[root])
        bench.flows.submit(f)
        client.config_set("slowlog-log-slower-than", 0)
        client.slowlog_reset()
        report = bench.flows.cancel("wide")
        top, _, cmd = slowest(client)
        print(f"cancel of 20,000 nodes: {len(set(report['cancelled']))} cancelled, "
              f"longest command {top} µs ({cmd})")
        client.config_set("slowlog-log-slower-than", 10_000)

        f = Flow("fan-in", id="fan")
        deps = [f.add(bench.inc.si(i), id=f"d{i}").id for i in range(2_000)]
        f.add(bench.tsum.s(), id="sink", after=deps)
        bench.flows.submit(f)
        client.config_set("slowlog-log-slower-than", 0)
        client.slowlog_reset()
        for nid in deps:
            store.complete("fan", nid, 1, "succeeded", b"1")
        top, total, cmd = slowest(client)
        sink = store.node("fan", "sink") or {}
        print(f"2,000-wide fan-in: sink {sink.get('state')}, longest command {top} µs "
              f"({cmd}), all commands {total / 1000:.0f} ms")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
