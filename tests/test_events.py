"""The event stream (SPEC section 11): every node and flow transition appended in the
same script as the transition, followed by ``celery flows events``. Real redis-server,
real worker subprocesses, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from typing import Any

from celery_flows import Flow, FlowState
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import BROKER_ENV, FLOWS, ROOT, cli

FIELDS = {"id", "time", "flow", "name", "node", "state", "attempt", "error", "progress"}
NODE_LIFE = ["scheduled", "running", "succeeded"]


def _events(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _by_node(events: list[dict[str, Any]]) -> dict[Any, list[str]]:
    """Each node's states in event order, without ``queued``: a dependent's publisher
    acknowledges it (published.lua) up to 50 ms later (engine/acks.py), and a worker
    that starts it before then takes it from ``scheduled`` to ``running`` directly, so
    its ``queued`` is never stored. When it is, it comes right after ``scheduled``."""
    seen: dict[Any, list[str]] = defaultdict(list)
    for e in events:
        seen[e["node"]].append(e["state"])
    for states in seen.values():
        if "queued" in states:
            assert states.count("queued") == 1 and states.index("queued") == 1, states
            states.remove("queued")
    return dict(seen)


def _popen(*args: str, broker: str) -> subprocess.Popen[str]:
    env = {**os.environ, BROKER_ENV: broker, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.proj", "flows", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def test_events_of_a_running_flow_print_each_transition_once_in_order_and_since_resumes(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f = Flow("evented", id="ev-1")
    hold = f.add(proj.wait_for_key.si("ev-go"), id="hold")
    b = f.add(proj.reporter.si(2), id="report", after=[hold])
    f.add(proj.boom.si("bad"), id="bad", after=[hold], failure_policy="ignore")
    f.add(proj.ident.si("x"), id="last", after=[b])
    handle = proj.flows.submit(f)
    wait_until(lambda: handle.node_states()["hold"] == "running", timeout=20)
    follower = _popen("events", handle.id, "--json", broker=redis_db.celery_url)
    redis_db.client.set("ev-go", 1)  # the rest happens while the follower follows
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    events = _events(out)
    assert all(set(e) == FIELDS for e in events)
    assert all(e["flow"] == "ev-1" for e in events)
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, key=_order) and len(set(ids)) == len(ids)
    states = _by_node(events)
    # each transition once, in order; the flow's own events carry node null
    assert states == {None: ["running", "succeeded"],
                      "hold": NODE_LIFE, "last": NODE_LIFE, "bad":
                      ["scheduled", "running", "failed"],
                      # two milestones while running, each an event of its own
                      "report": ["scheduled", "running", "running", "running", "succeeded"]}
    assert events[-1]["node"] is None and events[-1]["state"] == "succeeded"
    assert events[-1]["name"] == "evented"
    bad = [e for e in events if e["node"] == "bad"][-1]
    assert "bad" in bad["error"]
    assert bad["name"] == "tests.proj.boom" and bad["attempt"] == 1
    milestones = [e["progress"] for e in events if e["node"] == "report" and e["progress"]]
    assert [m["msg"] for m in milestones][:2] == ["step 1", "step 2"]
    assert all(isinstance(e["time"], float) for e in events)
    assert handle.state() == FlowState.SUCCEEDED

    # --since replays exactly what came after that id, then exits (the flow finished)
    again = cli("events", handle.id, "--json", "--since", ids[3], broker=redis_db.celery_url)
    assert again.returncode == 0, again.stderr
    assert _events(again.stdout) == events[4:]
    assert again.stderr == ""
    # the human form: one line an event
    plain = cli("events", handle.id, broker=redis_db.celery_url)
    assert plain.returncode == 0 and len(plain.stdout.splitlines()) == len(events)
    assert "hold  succeeded  attempt 1" in plain.stdout


def test_events_of_every_flow_follow_from_now_and_unknown_flows_exit_1(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    before = proj.flows.submit(_one(proj, "ev-before"))
    assert before.wait(timeout=30) == FlowState.SUCCEEDED
    follower = _popen("events", "--json", broker=redis_db.celery_url)
    try:
        # the follower is up once it has read the stream's end: submit after that
        wait_until(lambda: _reading(redis_db), timeout=20)
        after = proj.flows.submit(_one(proj, "ev-after"))
        assert after.wait(timeout=30) == FlowState.SUCCEEDED
        lines: list[dict[str, Any]] = []
        assert follower.stdout is not None
        while not (lines and lines[-1]["node"] is None and lines[-1]["state"] == "succeeded"):
            lines.append(json.loads(follower.stdout.readline()))
    finally:
        follower.kill()
        follower.communicate()
    assert {e["flow"] for e in lines} == {"ev-after"}
    assert _by_node(lines) == {None: ["running", "succeeded"], "only": NODE_LIFE}

    missing = cli("events", "no-such-flow", broker=redis_db.celery_url)
    assert missing.returncode == 1 and "no-such-flow" in missing.stderr
    bad = cli("events", "ev-after", "--since", "yesterday", broker=redis_db.celery_url)
    assert bad.returncode == 2


def _one(proj: Any, fid: str) -> Flow:
    f = Flow("one", id=fid)
    f.add(proj.add.si(1, 1), id="only")
    return f


def _reading(redis_db: RedisDB) -> bool:
    """Whether some client of this test's database is blocked in XREAD (the follower,
    waiting for events). CLIENT LIST names every database's clients: a dashboard's
    Server-Sent Events thread left blocked by an earlier test (test_dashboard_browser)
    on its own database must not pass for the follower."""
    clients = redis_db.client.client_list()
    return any(c.get("cmd") == "xread" and c.get("flags", "").find("b") >= 0
               and c.get("db") == str(redis_db.db) for c in clients)


def test_a_trimmed_since_warns_and_starts_at_the_oldest_kept(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: Any,
) -> None:
    monkeypatch.setenv("FLOWS_TEST_EVENTS_MAXLEN", "10")
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, env={"FLOWS_TEST_EVENTS_MAXLEN": "10"})
    f = Flow("wide", id="ev-wide")
    for i in range(60):
        f.add(proj.add.si(i, i), id=f"n{i}")
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    key = proj.flows.store.keys.flow_events(handle.id)
    kept = redis_db.client.xlen(key)
    assert 10 <= kept < 60 * 4 + 2  # trimmed, approximately
    oldest = redis_db.client.xrange(key, count=1)[0][0].decode()
    out = cli("events", handle.id, "--json", "--since", "1-0", broker=redis_db.celery_url,
              env={"FLOWS_TEST_EVENTS_MAXLEN": "10"})
    assert out.returncode == 0
    assert "trimmed" in out.stderr and oldest in out.stderr
    events = _events(out.stdout)
    assert events[0]["id"] == oldest and len(events) == kept
    assert events[-1]["node"] is None and events[-1]["state"] == "succeeded"


def test_inspect_watch_redraws_from_the_stream_until_the_flow_ends(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    f = Flow("watched", id="ev-watch")
    hold = f.add(proj.wait_for_key.si("ev-watch-go"), id="hold")
    f.add(proj.ident.si("x"), id="after", after=[hold])
    handle = proj.flows.submit(f)
    wait_until(lambda: handle.node_states()["hold"] == "running", timeout=20)
    watcher = _popen("inspect", handle.id, "--watch", broker=redis_db.celery_url)
    try:
        # the first drawing is up once the watcher waits on the flow's stream
        wait_until(lambda: _reading(redis_db), timeout=20)
        redis_db.client.set("ev-watch-go", 1)
        out, err = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, err
    # click drops the clear-screen codes off a terminal: each drawing opens with its title
    frames = ["flow watched" + frame for frame in out.split("flow watched")[1:]]
    assert len(frames) >= 2  # redrawn on events, not only once
    assert "running" in frames[0] and "succeeded" in frames[-1]
    assert handle.state() == FlowState.SUCCEEDED
