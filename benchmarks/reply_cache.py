"""What the reply cache of lua/_request.lua costs: ``python benchmarks/reply_cache.py``.

Every transition call keeps its reply for ``REPLY_TTL`` seconds under a request key
(keys.py), so that a call redis-py re-sends after a connection error answers as the
first one did. This runs a 200-node chain in-process (``task_always_eager``: create,
claim, published, start and complete per node) on a private redis-server, then prints

- the kept replies by shape, with ``MEMORY USAGE`` (key, value and overhead, not the
  expiry entry) and the packed value's length;
- Redis's own time per EVALSHA (``INFO commandstats``) of progress.lua, the cheapest
  flow transition, as it was before the wrapper, wrapped with no kept reply (the
  empty request id of dry runs), and wrapped keeping its reply.
"""

from __future__ import annotations

import importlib
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from celery_flows.testing import RedisServer  # noqa: E402

SHAPE = """
local t = cmsgpack.unpack(redis.call('GET', KEYS[1]))
if type(t) ~= 'table' then return {type(t)} end
local out = {'list of ' .. #t}
for i = 1, #t do out[#out + 1] = type(t[i]) end
return out
"""


def main() -> None:
    server = RedisServer().start()
    try:
        os.environ["BENCH_REDIS_URL"] = server.celery_url()
        bench: Any = importlib.import_module("benchmarks.bench_app")
        from celery_flows import Flow
        from celery_flows.registry.ids import new_request_id
        from celery_flows.registry.scripts import LUA_DIR, engine_text

        bench.app.conf.task_always_eager = True
        client = server.client()
        f = Flow("chain")
        prev = f.add(bench.inc.si(0), id="n0")
        for i in range(1, 200):
            prev = f.add(bench.inc.s(), id=f"n{i}", after=[prev])
        handle = bench.flows.submit(f)
        print(f"200-node chain: {handle.state().value}")
        shapes: dict[tuple[str, ...], list[tuple[int, int]]] = {}
        for key in client.scan_iter(match="flows:*:req:*", count=1000):
            shape = tuple(x.decode() for x in client.eval(SHAPE, 1, key))
            shapes.setdefault(shape, []).append((client.memory_usage(key, samples=0) or 0,
                                                 client.strlen(key)))
        print("kept replies:")
        for shape, sizes in sorted(shapes.items(), key=lambda kv: -len(kv[1])):
            print(f"  {len(sizes):4d} x {', '.join(shape):40s} "
                  f"{statistics.mean(s[0] for s in sizes):6.0f} bytes "
                  f"(value {statistics.mean(s[1] for s in sizes):.0f})")

        store = bench.flows.store
        keys = store.keys.flow(handle.id)
        client.persist(keys[0])
        client.persist(keys[1])
        bare = client.script_load(engine_text() + "\n" +
                                  (LUA_DIR / "progress.lua").read_text())
        wrapped = store.sha("progress")
        argv = ["n0", 1, "", "m"]

        def per_call(kind: str, n: int = 20000) -> float:
            client.config_resetstat()
            pipe = client.pipeline(transaction=False)
            for _ in range(n):
                if kind == "bare":
                    pipe.evalsha(bare, 6, *keys, *argv)
                else:
                    rid = new_request_id() if kind == "kept" else ""
                    pipe.evalsha(wrapped, 7, *keys, store.keys.request(keys[0], rid), *argv)
                if len(pipe) >= 500:
                    pipe.execute()
            pipe.execute()
            return float(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])

        times: dict[str, list[float]] = {"bare": [], "no reply kept": [], "kept": []}
        for _ in range(9):
            for kind in ("bare", "no reply kept", "kept"):
                times[kind].append(per_call(kind))
        print("progress.lua, Redis time per call (median of 9 x 20,000):")
        for kind, values in times.items():
            print(f"  {kind:14s} {statistics.median(values):6.1f} µs")
        bench.flows.close()
        bench.app.close()
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
