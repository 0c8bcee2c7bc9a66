"""The rows read off Redis itself rather than a stopwatch: commands per node (MONITOR
and ``INFO commandstats``), registry memory per pending node, the longest single
command (SLOWLOG) in the heavy transitions, and the 100,000-node submit.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
import urllib.request
from collections import Counter
from typing import Any

import redis

from benchmarks.harness import Bench, Figure
from benchmarks.timing import chain_flow, independent_flow
from celery_flows import FlowState

STOP = "bench-monitor-stop"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|"
                   r"[0-9a-f]{16,}")
_TAG = re.compile(r"\{[^}]*\}")
_DIGITS = re.compile(r"\d+")


def key_suffix(key: str) -> str:
    """A key with its ids blanked out, last ``:`` part only: what kind of key it is."""
    if key.count("|") >= 2:
        return "<worker>|<pid>|<id>"  # a worker instance's lease set
    key = _DIGITS.sub("#", _UUID.sub("*", _TAG.sub("{*}", key)))
    # a flow node's Celery task id carries the node id after the uuid
    key = re.sub(r"\*[^:]*$", "*", key)
    return key.rsplit(":", 1)[-1] if ":" in key else key


class Monitor:
    """Counts the commands clients send while it runs (not those Lua scripts run)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.names: Counter[str] = Counter()
        self.keys: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> Monitor:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("MONITOR did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.echo(STOP)  # the marker tells the reader where the window ends
        self._thread.join(30)

    def _run(self) -> None:
        with self.client.monitor() as mon:
            self._ready.set()
            for entry in mon.listen():
                parts = entry["command"].split(" ")
                if parts[0].upper() == "ECHO" and STOP in entry["command"]:
                    return
                if entry["client_type"] == "lua":
                    continue
                name = parts[0].upper()
                if name in ("EVALSHA", "EVAL") and len(parts) > 3 and parts[2] != "0":
                    key = parts[3]
                else:
                    key = parts[1] if len(parts) > 1 else ""
                self.names[name] += 1
                self.keys[f"{name} {key_suffix(key)}"] += 1


def _commandstats(bench: Bench) -> Counter[str]:
    stats = bench.client.info("commandstats")
    return Counter({k.removeprefix("cmdstat_").upper(): int(v["calls"])
                    for k, v in stats.items()})


class _SSEClient:
    """The dashboard served in this process with one client following a flow's
    Server-Sent Events, as a browser on the flow's page does: the commands it costs
    are the reader's (XREAD, the flow's state), and the completion path's must not
    change with it (issue #12)."""

    def __init__(self, bench: Bench) -> None:
        from celery_flows.dashboard import server

        self.httpd = server(bench.app, "127.0.0.1", 0, read_only=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.events = 0

    def follow(self, fid: str) -> threading.Thread:
        def read() -> None:
            with urllib.request.urlopen(f"{self.url}/api/flows/{fid}/events",
                                        timeout=300) as resp:
                for line in resp:
                    self.events += line.startswith(b"id: ")

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def commands_per_node(bench: Bench, nodes: int, rounds: int) -> Figure:
    """``nodes`` independent noop nodes in one flow (submit + wait) vs ``nodes`` bare
    ``apply_async`` (then ``get`` each), commands counted over the whole run; and the
    flow again with a dashboard client following its events (``flow+sse``)."""

    def body(fig: Figure) -> None:
        noop, t = bench.tasks.noop, bench.timeout
        sse = _SSEClient(bench)
        runs = iter(range(1_000_000))

        def bare() -> None:
            pending = [noop.apply_async() for _ in range(nodes)]
            for r in pending:
                r.get(timeout=t)

        def flow(watched: bool = False) -> None:
            f = independent_flow(bench, nodes, fid=f"bench-cmd-{next(runs)}")
            h = bench.flows.submit(f)
            reader = sse.follow(h.id) if watched else None
            assert h.wait(timeout=t) is FlowState.SUCCEEDED
            if reader is not None:
                reader.join(30)  # the stream ends after the flow's terminal event

        counts: dict[str, list[tuple[Counter[str], Counter[str], Counter[str]]]] = {
            "bare": [], "flow": [], "flow+sse": []}
        bare()  # warm-up
        flow()
        sides = (("bare", bare), ("flow", flow), ("flow+sse", lambda: flow(True)))
        for _ in range(rounds):
            for name, fn in sides:
                time.sleep(0.5)  # let the previous run's trailing commands pass
                bench.client.config_resetstat()
                mon = Monitor(bench.server.client())
                with mon:
                    fig.sides.setdefault(name, []).append(bench.timed(fn, f"commands {name}"))
                    time.sleep(0.3)
                counts[name].append((mon.names, mon.keys, _commandstats(bench)))

        def added(which: int, side: str = "flow", base: str = "bare") -> dict[str, float]:
            names = set().union(*(c[which] for v in counts.values() for c in v))
            out = {}
            for n in names:
                f = statistics.median(c[which][n] for c in counts[side])
                b = statistics.median(c[which][n] for c in counts[base])
                if f != b:
                    out[n] = (f - b) / nodes
            return dict(sorted(out.items(), key=lambda kv: -abs(kv[1])))

        sse.close()
        by_name, by_key, by_stats = added(0), added(1), added(2)
        totals = {side: statistics.median(sum(c[0].values()) for c in v)
                  for side, v in counts.items()}
        fig.value = (totals["flow"] - totals["bare"]) / nodes
        # the events are appended inside the transitions' scripts: the completion path
        # sends the same scripts (EVALSHA) with or without a reader; what a reader adds
        # are its own reads (the by-key breakdown names them)
        evalsha = {side: statistics.median(c[0]["EVALSHA"] for c in v) / nodes
                   for side, v in counts.items() if side != "bare"}
        fig.extra = {"client_commands_total_median": totals,
                     "added_per_node_by_command": by_name,
                     "added_per_node_by_key": by_key,
                     "commandstats_added_per_node": by_stats,
                     "commandstats_total_added_per_node": sum(by_stats.values()),
                     "evalsha_per_node": evalsha,
                     "sse_added_per_node_by_key": added(1, "flow+sse", "flow"),
                     "sse_events_received": sse.events}

    fig = Figure("commands/node", f"{nodes} noop nodes in one flow vs {nodes} apply_async",
                 "added client commands per node <= 2", 2.0, unit="cmd")
    return bench.guarded(fig, body)


def _used_memory(bench: Bench) -> int:
    return int(bench.client.info("memory")["used_memory"])


def _stream_bytes(bench: Bench, fid: str) -> tuple[int, int]:
    """``MEMORY USAGE`` (every entry, SAMPLES 0) of the flow's event stream and of the
    registry's; 0 for one that does not exist."""
    keys = bench.flows.store.keys
    flow, every = (int(bench.client.memory_usage(k, samples=0) or 0)
                   for k in (keys.flow_events(fid), keys.events))
    return flow, every


def memory(bench: Bench, nodes: int, rounds: int) -> Figure:
    """Worker stopped: a chain of ``nodes`` is submitted, only its root is published
    (to a queue nobody reads); used_memory after minus before, per node, with and
    without the event streams. Then ``cancel`` writes one event per node (and the
    flow's) to both streams: their growth over the events written is the cost of one
    event (issue #12)."""

    def body(fig: Figure) -> None:
        per_node, without_events, per_event, per_event_each = [], [], [], []
        for _ in range(rounds):
            bench.client.flushdb()
            f, _last = chain_flow(bench, nodes, name="bench-memory")
            before = _used_memory(bench)
            handles: list[Any] = []
            bench.timed(lambda f=f, handles=handles: handles.append(bench.flows.submit(f)),
                        "memory submit")
            fid = handles[0].id
            grown = _used_memory(bench) - before
            streams = _stream_bytes(bench, fid)
            per_node.append(grown / nodes)
            without_events.append((grown - sum(streams)) / nodes)
            written = bench.client.xlen(bench.flows.store.keys.events)
            bench.flows.cancel(fid)
            written = bench.client.xlen(bench.flows.store.keys.events) - written
            after = _stream_bytes(bench, fid)
            per_event.append((sum(after) - sum(streams)) / written)
            per_event_each.append([(a - b) / written for a, b in zip(after, streams,
                                                                      strict=True)])
        bench.client.flushdb()
        fig.sides = {"bytes_per_node": per_node}
        fig.value = statistics.median(per_node)
        fig.extra = {
            "bytes_per_node_without_events": statistics.median(without_events),
            "bytes_per_event_both_streams": statistics.median(per_event),
            "bytes_per_event_flow_stream": statistics.median(p[0] for p in per_event_each),
            "bytes_per_event_registry_stream": statistics.median(
                p[1] for p in per_event_each),
            "events_per_round": written,
        }

    fig = Figure("memory", f"chain of {nodes}, no payload", "used_memory / node <= 512 B",
                 512, unit="B")
    return bench.guarded(fig, body)


FLOOR_US = 500  # SLOWLOG keeps commands slower than this: the longest is all we report


def _script_names(bench: Bench) -> dict[str, str]:
    from celery_flows.registry.scripts import script_texts

    store = bench.flows.store
    return {store.sha(n): f"{n}.lua" for n in script_texts()}


def _mark(bench: Bench) -> int:
    """The id of the newest SLOWLOG entry: a phase reads only the entries after it.
    A SLOWLOG RESET right before a phase frees thousands of entries at once, and the
    next commands then stall while Redis takes memory back (measured: an HSCAN of 100
    fields, 0.2 ms otherwise, took 8.2 ms after a RESET of 50,000 entries), which would
    be charged to the phase."""
    newest = bench.client.slowlog_get(1)
    return int(newest[0]["id"]) if newest else -1


def _slowest(bench: Bench, after: int = -1) -> tuple[float, str, int, list[str]]:
    """(longest ms, its command or script, entries logged after the mark ``after``, the
    five longest labelled)."""
    def label(entry: dict[str, Any]) -> str:
        cmd = entry["command"]
        words = (cmd.decode(errors="replace") if isinstance(cmd, bytes) else str(cmd)).split()
        if words and words[0].upper() == "EVALSHA" and len(words) > 1:
            return names.get(words[1], f"EVALSHA {words[1][:10]}")
        return words[0] if words else "?"

    names = _script_names(bench)
    # SLOWLOG's own GET/RESET (long over a big log) are the bench's, not the phase's
    entries = [e for e in bench.client.slowlog_get(10_000_000)
               if int(e["id"]) > after
               and not label(e).upper().startswith(("SLOWLOG", "CONFIG"))]
    if not entries:
        return 0.0, "-", 0, []
    entries.sort(key=lambda e: e["duration"], reverse=True)
    top = [f"{label(e)} {e['duration'] / 1000.0:.2f} ms" for e in entries[:5]]
    return entries[0]["duration"] / 1000.0, label(entries[0]), len(entries), top


def slowlog(bench: Bench, nodes: int) -> list[Figure]:
    """The longest single command in four transitions of a ``nodes``-node flow. Runs
    with the default worker; submit and cancel happen while it is stopped."""
    goal = "longest command <= 10 ms"
    figs = {k: Figure("SLOWLOG", f"{k} {nodes}", goal, 10.0, unit="ms")
            for k in ("submit", "release", "cancel", "retry")}
    t = bench.timeout
    bench.client.config_set("slowlog-log-slower-than", FLOOR_US)
    bench.client.config_set("slowlog-max-len", 1_000_000)

    def phase(fig: Figure, action: Any) -> Any:
        mark = _mark(bench)
        out = action()
        ms, name, seen, longest = _slowest(bench, mark)
        fig.value = ms
        fig.extra = {"command": name, "slowlog_entries": seen, "longest": longest}
        return out

    def submit_cancel(fig: Figure) -> None:
        bench.stop_worker()
        bench.client.flushdb()
        f = independent_flow(bench, nodes, name="bench-slow-submit")
        held: list[Any] = []
        bench.timed(lambda: held.append(phase(fig, lambda: bench.flows.submit(f))),
                    "slowlog submit")

        def cancel(c: Figure) -> None:
            bench.timed(lambda: phase(c, lambda: bench.flows.cancel(held[0].id)) and None,
                        "slowlog cancel")

        bench.guarded(figs["cancel"], cancel)
        bench.client.flushdb()

    def release(fig: Figure) -> None:
        bench.start_worker("default")
        from celery_flows import Flow

        f = Flow("bench-slow-release")
        root = f.add(bench.tasks.nap.si(1.0), id="root")
        for i in range(nodes):
            f.add(bench.tasks.noop.si(), id=f"n{i}", after=[root])

        def run() -> None:
            h = bench.flows.submit(f)
            mark = _mark(bench)  # the root naps for 1 s: nothing released yet
            assert h.wait(timeout=t) is FlowState.SUCCEEDED
            ms, name, seen, longest = _slowest(bench, mark)
            fig.value, fig.extra = ms, {"command": name, "slowlog_entries": seen,
                                        "longest": longest}

        bench.timed(run, "slowlog release")

    def retry(fig: Figure) -> None:
        f = independent_flow(bench, nodes, task=bench.tasks.boom, name="bench-slow-retry")
        h = bench.flows.submit(f)
        bench.timed(lambda: h.wait(timeout=t) and None, "slowlog retry: first failure")
        assert h.state() is FlowState.FAILED, h.state()
        bench.timed(lambda: phase(fig, lambda: bench.flows.retry(h.id)) and None,
                    "slowlog retry")
        bench.flows.cancel(h.id)
        bench.app.control.purge()

    try:
        bench.guarded(figs["submit"], submit_cancel)
        if figs["submit"].error is not None and figs["cancel"].error is None:
            figs["cancel"].error = "not run: the submit before it failed"
        bench.guarded(figs["release"], release)
        bench.guarded(figs["retry"], retry)
    finally:
        bench.client.config_set("slowlog-log-slower-than", 10_000)
        bench.client.slowlog_reset()
    return list(figs.values())


def submit_100k(bench: Bench, nodes: int, rounds: int) -> Figure:
    """Worker stopped: wall time of ``flows.submit`` of a chain of ``nodes`` (built
    beforehand, build time reported apart), and used_memory per node."""

    def body(fig: Figure) -> None:
        build, per_node, submit = [], [], []
        for _ in range(rounds):
            bench.client.flushdb()
            started = time.perf_counter()
            f, _last = chain_flow(bench, nodes, name="bench-100k")
            build.append(time.perf_counter() - started)
            before = _used_memory(bench)
            started = time.perf_counter()
            try:
                submit.append(bench.timed(lambda f=f: bench.flows.submit(f),
                                          "100k submit"))
            except redis.TimeoutError as exc:
                raise RuntimeError(
                    f"submit() gave up after {time.perf_counter() - started:.1f} s: one "
                    "Redis round trip of it ran past redis-py's default 5 s socket "
                    f"timeout ({exc})") from exc
            per_node.append((_used_memory(bench) - before) / nodes)
        bench.client.flushdb()
        fig.sides = {"submit": submit, "build": build}
        fig.value = statistics.median(submit)
        fig.extra = {"bytes_per_node": statistics.median(per_node),
                     "bytes_per_node_rounds": per_node}

    fig = Figure("100k submit", f"chain of {nodes}", "submit() <= 5 s", 5.0, unit="s")
    return bench.guarded(fig, body)
