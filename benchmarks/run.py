"""celery-flows against plain Celery, same Redis, same worker: ``python benchmarks/run.py``.

Starts a private redis-server and ONE prefork worker (``-c 2 --flows``) on
:mod:`benchmarks.bench_app`, then times three scenarios, each as a plain Celery canvas
and as the equivalent flow:

- ``linear``: N ``inc`` tasks, each getting the previous result (``chain``);
- ``fan-in``: W parallel ``inc`` tasks and one ``tsum`` getting their list (``chord``);
- ``many``: M independent one-task flows vs M ``inc.delay()`` calls.

A measurement runs from building the canvas or flow to holding the checked final value:
``AsyncResult.get()`` (the result backend) for Celery, ``FlowHandle.wait()`` then
``results()`` for flows. After one warm-up round per scenario, the two sides alternate
for ``--rounds`` rounds; the table shows medians and the ratio flows/celery.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from celery_flows.testing import RedisServer, Worker  # noqa: E402

APP = "benchmarks.bench_app"
TIMEOUT = 300.0  # seconds one measurement may take before the run is declared stuck


@dataclass
class Result:
    scenario: str
    size: str
    tasks: int
    celery_s: list[float] = field(default_factory=list)
    flows_s: list[float] = field(default_factory=list)

    @property
    def celery_median(self) -> float:
        return statistics.median(self.celery_s)

    @property
    def flows_median(self) -> float:
        return statistics.median(self.flows_s)

    @property
    def ratio(self) -> float:
        return self.flows_median / self.celery_median


class Scenarios:
    """The measured bodies. Each returns nothing and asserts the final value."""

    def __init__(self, n: int, w: int, m: int) -> None:
        from celery import chain, chord

        from benchmarks import bench_app
        from celery_flows import Flow, FlowState

        self.n, self.w, self.m = n, w, m
        self.app = bench_app.app
        self.flows = bench_app.flows
        self.inc = bench_app.inc
        self.tsum = bench_app.tsum
        self._chain = chain
        self._chord = chord
        self._flow = Flow
        self._succeeded = FlowState.SUCCEEDED

    # -- linear -----------------------------------------------------------------------

    def linear_celery(self) -> None:
        sig = self._chain(self.inc.s(0), *(self.inc.s() for _ in range(self.n - 1)))
        value = sig.apply_async().get(timeout=TIMEOUT)
        assert value == self.n, value

    def linear_flows(self) -> None:
        f = self._flow("bench-linear")
        prev = f.add(self.inc.s(0), id="n0")
        for i in range(1, self.n):
            prev = f.add(self.inc.s(), id=f"n{i}", after=[prev])
        value = self._finish(self.flows.submit(f))[prev.id]
        assert value == self.n, value

    # -- fan-in -------------------------------------------------------------------------

    def fanin_celery(self) -> None:
        header = [self.inc.s(i) for i in range(self.w)]
        value = self._chord(header)(self.tsum.s()).get(timeout=TIMEOUT)
        assert value == self.w * (self.w + 1) // 2, value

    def fanin_flows(self) -> None:
        f = self._flow("bench-fanin")
        parts = [f.add(self.inc.s(i), id=f"p{i}") for i in range(self.w)]
        f.add(self.tsum.s(), id="sum", after=list(parts))
        value = self._finish(self.flows.submit(f))["sum"]
        assert value == self.w * (self.w + 1) // 2, value

    # -- many small ---------------------------------------------------------------------

    def many_celery(self) -> None:
        pending = [self.inc.delay(i) for i in range(self.m)]
        values = [r.get(timeout=TIMEOUT) for r in pending]
        assert values == list(range(1, self.m + 1)), values

    def many_flows(self) -> None:
        handles = []
        for i in range(self.m):
            f = self._flow("bench-one")
            f.add(self.inc.s(i), id="inc")
            handles.append(self.flows.submit(f))
        values = [self._finish(h)["inc"] for h in handles]
        assert values == list(range(1, self.m + 1)), values

    def _finish(self, handle: Any) -> dict[str, Any]:
        state = handle.wait(timeout=TIMEOUT)
        assert state is self._succeeded, f"flow {handle.id} ended {state.value}"
        results: dict[str, Any] = handle.results()
        return results


def measure(fn: Callable[[], None], worker: Worker) -> float:
    started = time.perf_counter()
    try:
        fn()
    except BaseException:
        worker.check_alive()  # a dead worker is the better explanation
        raise
    return time.perf_counter() - started


def run_scenario(result: Result, celery_fn: Callable[[], None], flows_fn: Callable[[], None],
                 rounds: int, worker: Worker) -> None:
    print(f"  {result.scenario} {result.size}: warm-up", end="", flush=True)
    measure(celery_fn, worker)
    measure(flows_fn, worker)
    for i in range(rounds):
        result.celery_s.append(measure(celery_fn, worker))
        result.flows_s.append(measure(flows_fn, worker))
        print(f", round {i + 1}", end="", flush=True)
    print(flush=True)


def table(results: list[Result], header: str) -> str:
    rows = [header, ""]
    rows.append(f"{'scenario':<26} {'tasks':>6} {'celery (median)':>16} "
                f"{'flows (median)':>16} {'flows/celery':>13}")
    rows.append("-" * len(rows[-1]))
    for r in results:
        rows.append(
            f"{r.scenario + ' ' + r.size:<26} {r.tasks:>6} {r.celery_median * 1e3:>13.1f} ms "
            f"{r.flows_median * 1e3:>13.1f} ms {r.ratio:>12.2f}x"
        )
    return "\n".join(rows)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time celery-flows against plain Celery on one worker and one Redis."
    )
    parser.add_argument("-n", "--length", type=int, default=None,
                        help="linear: nodes in the chain (default 50, --quick 10)")
    parser.add_argument("-w", "--width", type=int, default=None,
                        help="fan-in: parallel nodes before the collector (default 200, "
                             "--quick 20)")
    parser.add_argument("-m", "--many", type=int, default=None,
                        help="many: one-node flows / delay() calls (default 200, --quick 20)")
    parser.add_argument("-r", "--rounds", type=int, default=None,
                        help="measured rounds per side after the warm-up (default 5, "
                             "--quick 3)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and 3 rounds: a smoke run of a few seconds")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write every timing and the medians to PATH as JSON")
    args = parser.parse_args(argv)
    n = args.length or (10 if args.quick else 50)
    w = args.width or (20 if args.quick else 200)
    m = args.many or (20 if args.quick else 200)
    rounds = args.rounds or (3 if args.quick else 5)
    if min(n, w, m) < 1:
        parser.error("--length, --width and --many must be >= 1")
    if rounds < 3:
        parser.error("--rounds must be >= 3 (a median of fewer says little)")

    signal.signal(signal.SIGTERM, _interrupt)
    server = RedisServer()
    log_dir = Path(tempfile.mkdtemp(prefix="cfb-log-"))
    worker: Worker | None = None
    try:
        server.start()
        os.environ["BENCH_REDIS_URL"] = server.celery_url()
        worker = Worker(APP, loglevel="warning", log_path=log_dir / "worker.log",
                        env={"BENCH_REDIS_URL": server.celery_url()}, pythonpath=[ROOT])
        worker.start()
        scenarios = Scenarios(n, w, m)
        worker.wait_ready(60, app=scenarios.app)

        import celery

        import celery_flows

        with server.client() as client:
            redis_version = client.info("server").get("redis_version", "?")
        header = (
            f"celery-flows {celery_flows.__version__} vs Celery {celery.__version__}, "
            f"Python {platform.python_version()}, {os.cpu_count()} CPUs\n"
            f"redis-server {redis_version} on a unix socket, one prefork worker -c 2 --flows;"
            f" median of {rounds} alternating rounds after 1 warm-up"
        )
        print(header, flush=True)
        results = [
            Result("linear", f"N={n}", n),
            Result("fan-in", f"W={w}", w + 1),
            Result("many", f"M={m}", m),
        ]
        bodies = [
            (scenarios.linear_celery, scenarios.linear_flows),
            (scenarios.fanin_celery, scenarios.fanin_flows),
            (scenarios.many_celery, scenarios.many_flows),
        ]
        for result, (celery_fn, flows_fn) in zip(results, bodies, strict=True):
            run_scenario(result, celery_fn, flows_fn, rounds, worker)
        print()
        print(table(results, header), flush=True)
        if args.json:
            doc = {
                "params": {"length": n, "width": w, "many": m, "rounds": rounds},
                "env": {
                    "celery_flows": celery_flows.__version__,
                    "celery": celery.__version__,
                    "redis_server": redis_version,
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "worker": "prefork -c 2 --flows",
                },
                "scenarios": [
                    {**asdict(r), "celery_median_s": r.celery_median,
                     "flows_median_s": r.flows_median, "ratio": r.ratio}
                    for r in results
                ],
            }
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"\nwrote {args.json}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"\nbenchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if worker is not None:
            print(f"worker log tail:\n{worker.log_tail()}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if worker is not None:
            worker.stop(timeout=20)
        server.cleanup()
        shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
