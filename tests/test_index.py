"""The flow index (``flows list``): expired flows leave it, and listing reads it in
bounded pages, never whole."""

from __future__ import annotations

import re
import threading
from typing import Any

from celery_flows import Flow, FlowState
from celery_flows.registry.reads import INDEX_GRACE
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, cli


def test_expired_flows_are_pruned_from_the_index(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    proj.app.conf.flows_retention = 1  # read by the producer at submit
    worker_factory("tests.proj", extra_args=FLOWS)
    short = []
    for i in range(3):
        f = Flow("short", id=f"short-{i}")
        f.add(proj.add.si(i, i), id="a")
        short.append(proj.flows.submit(f))
    g = Flow("long")
    g.add_external("gate", timeout=3600)  # stays awaiting: never expires
    live = proj.flows.submit(g)
    for h in short:
        assert h.wait(timeout=30) == FlowState.SUCCEEDED
    index = proj.flows.store.keys.index
    meta = proj.flows.store.keys.meta
    wait_until(lambda: not any(redis_db.client.exists(meta(h.id)) for h in short),
               "the finished flows to expire")
    assert redis_db.client.zcard(index) == 4
    wait_until(lambda: redis_db.client.zcard(index) == 1, "the manager to prune the index",
               timeout=INDEX_GRACE + 60)
    assert redis_db.client.zrange(index, 0, -1) == [live.id.encode()]


class _Monitor:
    """Every command Redis receives while it runs (MONITOR), for one db."""

    def __init__(self, redis_db: RedisDB) -> None:
        self.client = redis_db.server.client(redis_db.db)
        self.commands: list[str] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        with self.client.monitor() as monitor:
            self._ready.set()
            for entry in monitor.listen():
                command = str(entry.get("command", ""))
                if command == "ECHO monitor-stop":
                    return
                self.commands.append(command)

    def stop(self) -> list[str]:
        self.client.echo("monitor-stop")
        self._thread.join(10)
        self.client.close()
        return self.commands


def _index_reads(commands: list[str], index: str) -> list[int]:
    """How many entries each range read over the index asked for (-1: all of it)."""
    sizes = []
    for command in commands:
        m = re.match(rf"Z(?:REV)?RANGE(?:BYSCORE)? {re.escape(index)} (-?\d+) (-?\d+)", command)
        if m:
            start, stop = int(m.group(1)), int(m.group(2))
            sizes.append(-1 if stop < 0 else stop - start + 1)
    return sizes


def test_list_with_a_limit_reads_the_index_in_bounded_pages(
    import_app: ImportApp, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    flows: list[Any] = []
    for i in range(700):
        f = Flow("listed" if i % 2 else "other", id=f"listed-{i:04d}")
        f.add(proj.add.si(i, i), id="a")
        flows.append(f)
    proj.flows.add_bulk(flows)
    index = proj.flows.store.keys.index
    monitor = _Monitor(redis_db)
    out = cli("list", "--limit", "5", "--name", "listed", broker=redis_db.celery_url)
    none = cli("list", "--state", "succeeded", broker=redis_db.celery_url)
    commands = monitor.stop()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 5 and all("\tlisted\t" in line for line in lines)
    assert none.returncode == 0 and none.stdout == ""
    reads = _index_reads(commands, index)
    assert reads, commands[:20]
    # never the whole index in one read; the first listing stops after one page
    assert -1 not in reads and max(reads) < 700, reads
    assert reads[0] < 700
