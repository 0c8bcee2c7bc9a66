"""The producer side at scale: ``python benchmarks/submit.py [--chain 100000] [--bulk 10000]``.

Against a private redis-server, no worker (nothing runs; publishing is to the broker):

- ``submit()`` of an N-node chain: wall time (compile, serialise, digest and store
  included), the longest single Redis command meanwhile (``SLOWLOG``: a large flow is
  stored in bounded pieces) and registry memory per pending node (``INFO memory``,
  only the root released);
- ``submit()`` of one-node flows: wall time and Redis commands per submit
  (``INFO commandstats``, the scripts' inner calls included), beside bare
  ``apply_async``;
- ``add_bulk()`` of M five-node flows beside M bare ``apply_async`` calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from celery_flows.testing import RedisServer  # noqa: E402


def _chain(flow_cls: Any, task: Any, n: int, fid: str) -> Any:
    f = flow_cls("chain", id=fid)
    prev = f.add(task.s(0), id="n0")
    for i in range(1, n):
        prev = f.add(task.s(), id=f"n{i}", after=[prev])
    return f


def _five(flow_cls: Any, task: Any, i: int) -> Any:
    f = flow_cls("five", id=f"b{i}")
    a = f.add(task.s(i), id="a")
    b = f.add(task.s(), id="b", after=[a])
    c = f.add(task.s(), id="c", after=[a])
    d = f.add(task.s(), id="d", after=[b])
    f.add(task.s(), id="e", after=[c, d])
    return f


def _commands(client: Any) -> tuple[int, int]:
    stats = client.info("commandstats")
    return (sum(v["calls"] for v in stats.values()), sum(v["usec"] for v in stats.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", type=int, default=100000)
    parser.add_argument("--memory-chain", type=int, default=20000)
    parser.add_argument("--one", type=int, default=2000)
    parser.add_argument("--bulk", type=int, default=10000)
    opts = parser.parse_args()
    with RedisServer() as server:
        url = server.celery_url(1)
        os.environ["CELERY_BROKER_URL"] = os.environ["CELERY_RESULT_BACKEND"] = url
        from celery import Celery

        from celery_flows import Flow, Flows

        app = Celery("bench_submit", broker=url)
        app.conf.task_ignore_result = True
        flows = Flows(app)

        @app.task(shared=False)
        def inc(x: int = 0) -> int:
            return x + 1

        client = server.client(1)
        flows.submit(_chain(Flow, inc, 1, "warm"))
        inc.delay(0)

        f = _chain(Flow, inc, opts.memory_chain, "mem")
        before = client.info("memory")["used_memory"]
        flows.submit(f)
        per_node = (client.info("memory")["used_memory"] - before) / opts.memory_chain
        print(f"memory: {per_node:.0f} B per pending node ({opts.memory_chain}-node chain)")

        f = _chain(Flow, inc, opts.chain, "big")
        client.config_set("slowlog-log-slower-than", 1000)
        client.slowlog_reset()
        t = time.perf_counter()
        flows.submit(f)
        wall = time.perf_counter() - t
        longest = max((e["duration"] for e in client.slowlog_get(1000)), default=0) / 1000
        print(f"submit of a {opts.chain}-node chain: {wall:.2f} s, longest Redis command "
              f"{longest:.1f} ms")

        ones = [Flow("one", id=f"o{i}") for i in range(opts.one)]
        for i, one in enumerate(ones):
            one.add(inc.s(i), id="n")
        client.config_resetstat()
        t = time.perf_counter()
        for one in ones:
            flows.submit(one)
        wall = time.perf_counter() - t
        calls, usec = _commands(client)
        client.config_resetstat()
        t = time.perf_counter()
        for i in range(opts.one):
            inc.apply_async((i,))
        bare = time.perf_counter() - t
        bare_calls, _ = _commands(client)
        n = opts.one
        print(f"one-node submit: {wall / n * 1e6:.0f} us, {calls / n:.1f} Redis commands, "
              f"{usec / n:.0f} us Redis time; apply_async: {bare / n * 1e6:.0f} us, "
              f"{bare_calls / n:.1f} commands")

        batch = [_five(Flow, inc, i) for i in range(opts.bulk)]
        t = time.perf_counter()
        flows.add_bulk(batch)
        bulk = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(opts.bulk):
            inc.apply_async((i,))
        bare = time.perf_counter() - t
        print(f"add_bulk of {opts.bulk} five-node flows: {bulk:.2f} s; {opts.bulk} "
              f"apply_async: {bare:.2f} s; ratio {bulk / bare:.2f}")


if __name__ == "__main__":
    main()
