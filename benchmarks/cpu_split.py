"""Where the cost-per-node row's time goes, process by process:
``python benchmarks/cpu_split.py [N] [ROUNDS]`` (default 20,000 nodes, 2 rounds).

Runs the sides of ``run.py``'s "big vs small" / "cost per node" rows (one flow of N
independent ``noop`` nodes, N/10 flows of 10, N ``noop.apply_async``, and the floor: N
``apply_async`` of a task making a flow node's two round trips) against its own
redis-server and one ``-c 2 --flows`` worker, like ``run.py``, and prints for each run:

- the CPU time per node of each process: redis-server, this producer, the worker's main
  process and its pool processes (``/proc/<pid>/stat``, user + system);
- the cores those processes kept busy on average (their CPU time over the wall time);
- the machine's idle share (``/proc/stat``) second by second, and its mean while the
  producer was still submitting and after (the worker draining what was queued).

A side's wall time is its CPU time over the cores it kept busy, so its ratio to
Celery's is the CPU ratio times Celery's cores busy over its own: a side can lose on
either. Linux only.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import Bench  # noqa: E402
from benchmarks.timing import cost_sides  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def machine_idle() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of the whole machine."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return values[3] + values[4], sum(values)


class Sampler(threading.Thread):
    """The machine's idle share, once a second, marked at the end of submitting."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.idle: list[float] = []
        self.submitted_at: int | None = None

    def run(self) -> None:
        i0, a0 = machine_idle()
        while not self.done.wait(1.0):
            i1, a1 = machine_idle()
            self.idle.append(100.0 * (i1 - i0) / max(1, a1 - a0))
            i0, a0 = i1, a1

    def submitted(self) -> None:
        self.submitted_at = len(self.idle)


def measure(bench: Bench, name: str, nodes: int) -> None:
    assert bench.worker is not None and bench.worker.process is not None
    main = bench.worker.process.pid
    assert bench.server.pid is not None
    procs = {"redis": [bench.server.pid], "producer": [os.getpid()], "main": [main],
             "pool": children(main)}
    before = {k: sum(cpu_seconds(p) for p in pids) for k, pids in procs.items()}
    sampler = Sampler()
    sampler.start()
    started = time.perf_counter()
    cost_sides(bench, nodes, sampler.submitted)[name]()
    wall = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    used = {k: sum(cpu_seconds(p) for p in pids) - before[k] for k, pids in procs.items()}
    per_node = " ".join(f"{k} {1e6 * v / nodes:.0f}" for k, v in used.items())
    cut = sampler.submitted_at or 0
    submitting, draining = sampler.idle[:cut], sampler.idle[cut:-1]  # last: the tail
    print(f"{name:10s} {wall:6.2f} s  CPU us/node: {per_node}, total "
          f"{1e6 * sum(used.values()) / nodes:.0f}; cores busy "
          f"{sum(used.values()) / wall:.2f}", flush=True)
    print(f"{'':10s} idle % while submitting "
          f"{statistics.fmean(submitting) if submitting else float('nan'):.0f}, after "
          f"{statistics.fmean(draining) if draining else float('nan'):.0f}; by second: "
          f"{' '.join(f'{v:.0f}' for v in sampler.idle)}", flush=True)


def main(argv: list[str]) -> int:
    nodes = int(argv[0]) if argv else 20_000
    rounds = int(argv[1]) if len(argv) > 1 else 2
    log_dir = Path(tempfile.mkdtemp(prefix="cfb-cpu-"))
    bench = Bench(log_dir, 900.0)
    try:
        bench.start()
        bench.start_worker()
        for fn in cost_sides(bench, max(10, nodes // 10)).values():  # warm-up
            fn()
        for _ in range(rounds):
            for name in cost_sides(bench, nodes):
                measure(bench, name, nodes)
    finally:
        bench.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
