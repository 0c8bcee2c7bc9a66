"""The registry on a real Redis Cluster (three masters on loopback), with a real worker.

Every flow script touches one flow's hash tag, every scheduling script the {sched}
tag, the heartbeat the {workers} tag: nothing crosses a slot.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_flows import Flow, FlowState
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.harness import find_redis_server
from tests.test_engine import FLOWS, run_counts


def _free_port() -> int:
    # the cluster bus listens on port + 10000: both must be free
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    server = find_redis_server()
    cli = str(Path(server).with_name("redis-cli"))
    if not Path(cli).exists():
        cli = shutil.which("redis-cli") or cli
    base = Path(tempfile.mkdtemp(prefix="cfc-", dir="/tmp"))
    procs, ports = [], []
    try:
        for i in range(3):
            port = _free_port()
            ports.append(port)
            node_dir = base / str(i)
            node_dir.mkdir()
            procs.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no",
                 "--maxmemory-policy", "noeviction", "--dir", str(node_dir)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        for port in ports:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if redis.Redis(port=port).ping():
                        break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 15
        while b"cluster_state:ok" not in redis.Redis(port=ports[0]).execute_command(
                "CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not become ready")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


def test_flows_run_on_redis_cluster(
    cluster: str, import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"FLOWS_TEST_REGISTRY": cluster, "FLOWS_TEST_REGISTRY_CLUSTER": "1",
           "FLOWS_TEST_RATE_LIMITS": json.dumps({"api": "20/s"}),
           "FLOWS_TEST_QUEUE_LIMITS": json.dumps({"single": 1})}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, env=env, queues=("celery", "single"))
    f = Flow("clustered")
    a = f.add(proj.add.s(1, 2), id="a")
    b = f.add(proj.mul.s(10), id="b", after=[a], queue="single")
    c = f.add(proj.add.s(5), id="c", after=[a], rate_limit="api")
    f.add(proj.tsum.s(), id="d", after=[b, c])
    f.add(proj.flaky.s(1), id="flaky")
    handles = [proj.flows.submit(f)]
    bulk = []
    for i in range(3):
        fb = Flow("bulk", id=f"cl-bulk-{i}")
        fb.add(proj.add.si(i, i), id="only")
        bulk.append(fb)
    handles += proj.flows.add_bulk(bulk)
    g = Flow("changed")
    hold = g.add(proj.wait_for_key.si("cl-go"), id="hold")
    g.add(proj.ident.si("x"), id="next", after=[hold])
    hg = proj.flows.submit(g)
    assert handles[0].wait(timeout=30) == FlowState.SUCCEEDED
    assert handles[0].results()["d"] == 38
    assert handles[0].inspect()["nodes"]["flaky"]["retries"] == 1
    proj.flows.pause(hg.id)
    redis_db.client.set("cl-go", 1)
    time.sleep(1)
    assert hg.state() == FlowState.PAUSED
    proj.flows.resume(hg.id)
    assert hg.wait(timeout=30) == FlowState.SUCCEEDED
    # the retry is the second run of "flaky"; every other body ran once
    assert run_counts(redis_db, handles[0].id) == {"a": 1, "b": 1, "c": 1, "d": 1, "flaky": 2}
    for i, h in enumerate(handles[1:]):
        assert h.wait(timeout=30) == FlowState.SUCCEEDED and h.results() == {"only": 2 * i}
