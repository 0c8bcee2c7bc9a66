"""A transition whose reply is lost runs once: redis-py re-sends it after a connection
error, and the re-sent call gets the first answer (lua/_request.lua).

The fault is produced for real: :class:`DropProxy` sits between a Flows app's registry
client and the test's redis-server, forwards one EVALSHA of a given script, lets Redis
run it and answer, and closes the client's connection without relaying the answer.
redis-py's own retry then sends the same call again through a fresh connection.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from celery_flows import Flow, FlowState, FlowStateError
from celery_flows.registry.scripts import script_texts
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, run_counts

_INCOMPLETE = object()


class _Error(bytes):
    """An error reply (``-ERR ...``, ``!...``)."""


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One RESP2/RESP3 value at ``pos`` (redis-py 8 speaks RESP3): (value, end), value
    _INCOMPLETE if more bytes are due."""
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        return _INCOMPLETE, pos
    kind, line, after = buf[pos:pos + 1], buf[pos + 1:eol], eol + 2
    if kind == b"-":
        return _Error(line), after
    if kind in b"+:_,#(":
        return line, after
    if kind in b"$!=":
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return _INCOMPLETE, pos
        value = buf[after:after + size]
        return (_Error(value) if kind == b"!" else value), after + size + 2
    if kind in b"*~>%":
        items = []
        for _ in range(max(int(line), 0) * (2 if kind == b"%" else 1)):
            item, after = _parse(buf, after)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, after
    raise ValueError(f"not RESP: {buf[pos:pos + 20]!r}")


def _complete_values(buf: bytes) -> tuple[list[Any], bytes]:
    """The complete values at the start of ``buf``, and the bytes left over."""
    values, pos = [], 0
    while pos < len(buf):
        value, end = _parse(buf, pos)
        if value is _INCOMPLETE:
            break
        values.append(value)
        pos = end
    return values, buf[pos:]


class _Link:
    """One client connection and its own connection to Redis."""

    def __init__(self, proxy: DropProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.connect(proxy.upstream)
        self.lock = threading.Lock()
        self.sent = 0      # complete commands forwarded to Redis
        self.answered = 0  # complete replies Redis sent back
        self.dropping: str | None = None  # the sha of the call whose reply is dropped
        self.dropped_at = 0  # its position among the commands of this connection
        self.ran = True  # whether Redis ran it (its reply is not an error)
        for pump in (self._up, self._down):
            threading.Thread(target=pump, daemon=True).start()

    def close(self) -> None:
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _up(self) -> None:
        rest = b""
        try:
            while data := self.client.recv(65536):
                commands, rest = _complete_values(rest + data)
                with self.lock:
                    self.sent += len(commands)
                    for i, command in enumerate(commands):
                        if self.dropping is None:
                            self.dropping = self.proxy.take(command)
                            if self.dropping is not None:
                                self.dropped_at = self.sent - len(commands) + i + 1
                self.server.sendall(data)
        except (OSError, ValueError):
            pass
        self.close()

    def _down(self) -> None:
        rest = b""
        try:
            while data := self.server.recv(65536):
                replies, rest = _complete_values(rest + data)
                with self.lock:
                    for reply in replies:
                        self.answered += 1
                        if self.answered == self.dropped_at and isinstance(reply, _Error):
                            self.ran = False
                    dropping, done = self.dropping, self.answered >= self.sent
                if not dropping:
                    self.client.sendall(data)
                elif done:
                    # Redis answered everything sent so far; a batch split over several
                    # reads shows as more commands within the pause
                    time.sleep(0.05)
                    with self.lock:
                        if self.answered < self.sent:
                            continue
                    # a call Redis refused (NOSCRIPT...) did not run: no lost reply
                    self.proxy.note_dropped(dropping if self.ran else f"{dropping} (refused)")
                    break
        except (OSError, ValueError):
            pass
        self.close()


class DropProxy:
    """A unix-socket proxy to redis-server that, for each armed script, forwards its next
    EVALSHA, lets Redis run and answer it, then closes the client's connection without
    relaying the answer (a connection lost between execution and reply)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.dir = Path(tempfile.mkdtemp(prefix="cfp-", dir="/tmp"))
        self.path = str(self.dir / "p.sock")
        self.armed: dict[bytes, int] = {}
        self.dropped: list[str] = []
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(64)
        self._links: list[_Link] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, db: int) -> str:
        return f"unix://{self.path}?db={db}"

    def arm(self, sha: str, times: int = 1) -> None:
        with self._lock:
            self.armed[sha.encode()] = self.armed.get(sha.encode(), 0) + times

    def take(self, command: Any) -> str | None:
        """The script's sha if this command is an armed EVALSHA (disarmed once)."""
        if not (isinstance(command, list) and len(command) > 1
                and isinstance(command[0], bytes) and command[0].upper() == b"EVALSHA"):
            return None
        with self._lock:
            sha = command[1]
            if self.armed.get(sha, 0) <= 0:
                return None
            self.armed[sha] -= 1
            return str(sha.decode())

    def note_dropped(self, sha: str) -> None:
        with self._lock:
            self.dropped.append(sha)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                self._links.append(_Link(self, client))
            except OSError:
                client.close()

    def close(self) -> None:
        self._listener.close()
        for link in self._links:
            link.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def proxy(redis_db: RedisDB) -> Generator[DropProxy, None, None]:
    p = DropProxy(redis_db.server.socket_path)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def proj(import_app: ImportApp, proxy: DropProxy, redis_db: RedisDB,
         monkeypatch: pytest.MonkeyPatch) -> Any:
    """tests.proj with its registry behind the proxy (the broker stays direct), every
    script loaded: an armed call must run, not answer NOSCRIPT."""
    monkeypatch.setenv("FLOWS_TEST_REGISTRY", proxy.url(redis_db.db))
    for text in script_texts().values():
        redis_db.client.script_load(text)
    return import_app("tests.proj")


def request_keys(redis_db: RedisDB) -> list[bytes]:
    return sorted(redis_db.client.scan_iter(match="flows:*:req:*"))


def kept(redis_db: RedisDB, key: bytes) -> Any:
    """A kept reply, unpacked by Redis's own cmsgpack."""
    return redis_db.client.eval("return cmsgpack.unpack(redis.call('GET', KEYS[1]))", 1, key)


def broker_task_ids(redis_db: RedisDB, queue: str = "celery") -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in redis_db.client.lrange(queue, 0, -1)]


def test_pause_resume_cancel_through_a_lost_reply_answer_as_the_first_call(
    proj: Any, proxy: DropProxy, redis_db: RedisDB
) -> None:
    f = Flow("changed")
    f.add(proj.add.si(1, 2), id="a")
    f.add(proj.add.si(3, 4), id="b", after=["a"])
    handle = proj.flows.submit(f)
    sha = proj.flows.store.sha("pause")

    proxy.arm(sha)
    report = proj.flows.pause(handle.id)
    assert proxy.dropped == [sha], "the pause's reply was not dropped"
    assert report["state"] == "paused" and handle.state() == FlowState.PAUSED

    proxy.arm(sha)
    report = proj.flows.resume(handle.id)
    assert proxy.dropped == [sha, sha]
    assert report["state"] == "running" and handle.state() == FlowState.RUNNING

    cancel = proj.flows.store.sha("cancel")
    proxy.arm(cancel)
    report = proj.flows.cancel(handle.id)
    assert proxy.dropped == [sha, sha, cancel]
    assert report["state"] == "cancelled" and sorted(report["cancelled"]) == ["a", "b"]
    assert handle.state() == FlowState.CANCELLED
    assert set(handle.node_states().values()) == {"cancelled"}


def test_dry_runs_keep_no_reply(proj: Any, redis_db: RedisDB) -> None:
    f = Flow("dry")
    f.add(proj.add.si(1, 2), id="a")
    handle = proj.flows.submit(f)
    before = request_keys(redis_db)
    assert before, "a transition call keeps its reply"
    for change in (proj.flows.pause, proj.flows.cancel, proj.flows.retry):
        try:
            change(handle.id, dry_run=True)
        except FlowStateError as exc:  # retry of a running flow without failures
            assert "nothing to retry" in str(exc)
    assert request_keys(redis_db) == before
    proj.flows.pause(handle.id)
    assert len(request_keys(redis_db)) == len(before) + 1
    ttl = redis_db.client.ttl(next(k for k in request_keys(redis_db) if k not in before))
    assert 0 < ttl <= 120


def test_a_lost_submit_reply_publishes_the_roots_once(
    proj: Any, proxy: DropProxy, redis_db: RedisDB
) -> None:
    proxy.arm(proj.flows.store.sha("create"))
    f = Flow("submitted")
    f.add(proj.add.si(1, 2), id="a")
    f.add(proj.add.s(3), id="b", after=["a"])
    handle = proj.flows.submit(f)
    assert proxy.dropped == [proj.flows.store.sha("create")]
    rec = proj.flows.store.node(handle.id, "a")
    # the re-sent create answers "created", its claim the root it claimed the first time
    assert rec["state"] == "queued" and len(rec["task_ids"]) == 1
    assert broker_task_ids(redis_db) == rec["task_ids"]


def test_a_lost_submit_reply_under_eager_mode_still_runs_the_flow(
    proj: Any, proxy: DropProxy
) -> None:
    proj.app.conf.task_always_eager = True
    proxy.arm(proj.flows.store.sha("create"))
    f = Flow("eager")
    f.add(proj.add.si(1, 2), id="a")
    f.add(proj.add.s(3), id="b", after=["a"])
    handle = proj.flows.submit(f)
    assert proxy.dropped == [proj.flows.store.sha("create")]
    # a re-sent create that answered "exists already" would leave it to nobody
    assert handle.state() == FlowState.SUCCEEDED
    assert handle.results() == {"a": 3, "b": 6}


def test_a_lost_completion_reply_releases_the_dependent_once(
    proj: Any, proxy: DropProxy, redis_db: RedisDB, worker_factory: WorkerFactory
) -> None:
    f = Flow("signalled")
    f.add_external("ext")
    f.add(proj.ident.s(), id="next", after=["ext"])
    handle = proj.flows.submit(f)
    wait_until(lambda: handle.node_states()["ext"] == "awaiting", "ext awaiting")
    sha = proj.flows.store.sha("complete")
    proxy.arm(sha)
    # complete, which claims what it released in the same script, re-sent
    assert proj.flows.signal(handle.id, "ext", result=7) == "running"
    assert proxy.dropped == [sha], "the completion's reply was not dropped"
    rec = proj.flows.store.node(handle.id, "next")
    assert rec["state"] == "queued", "the re-sent claim published the dependent"
    assert [t for t in broker_task_ids(redis_db) if "~next~" in t] == rec["task_ids"]
    assert len(rec["task_ids"]) == 1
    # the completion kept the ids of the entries it claimed, not the entries themselves
    replies = [kept(redis_db, k) for k in request_keys(redis_db)]
    assert [r[5] for r in replies if isinstance(r, list) and len(r) == 6] == [[b"next"]]
    # a --flows worker (whose sweeper drains the flow again) runs it, once
    worker_factory("tests.proj", extra_args=FLOWS)
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    assert handle.results() == {"ext": 7, "next": 7}
    assert run_counts(redis_db, handle.id) == {"next": 1}


def test_a_batch_sent_again_after_noscript_answers_from_what_already_ran(
    import_app: ImportApp, redis_db: RedisDB
) -> None:
    # a Redis that lost part of its script cache (a restart or failover racing the
    # loading): complete runs, claim answers NOSCRIPT, and the store re-sends the batch
    proj = import_app("tests.proj")
    f = Flow("reloaded")
    f.add_external("ext")
    f.add(proj.ident.s(), id="next", after=["ext"])
    handle = proj.flows.submit(f)
    redis_db.client.script_flush()
    redis_db.client.script_load(script_texts()["complete"])
    assert proj.flows.signal(handle.id, "ext", result=7) == "running"
    rec = proj.flows.store.node(handle.id, "next")
    assert rec["state"] == "queued" and broker_task_ids(redis_db) == rec["task_ids"]
    assert [h["outcome"] for h in proj.flows.store.node(handle.id, "ext")["history"]] \
        == ["succeeded"]


def test_a_lost_admit_reply_takes_one_rate_slot(
    proj: Any, proxy: DropProxy, redis_db: RedisDB
) -> None:
    proxy.arm(proj.flows.store.sha("admit"))
    f = Flow("limited", rate_limit="1/m")
    f.add(proj.add.si(1, 2), id="a")
    f.add(proj.add.si(3, 4), id="b")
    handle = proj.flows.submit(f)
    assert proxy.dropped == [proj.flows.store.sha("admit")]
    nodes = {nid: proj.flows.store.node(handle.id, nid) for nid in ("a", "b")}
    queued = [nid for nid, rec in nodes.items() if rec["state"] == "queued"]
    assert len(queued) == 1, f"the admitted node was published: {nodes}"
    held = nodes["b" if queued == ["a"] else "a"]
    assert held["state"] == "scheduled" and held["held"]["by"] == f"flow:{handle.id}"
    # one slot: the limiter's next free time is one interval after the release
    raw: Any = redis_db.client.get(proj.flows.store.keys.limiter_state(f"flow:{handle.id}"))
    tat = float(raw)
    released = float(nodes[queued[0]]["released_at"])
    assert tat - released == pytest.approx(60.0, abs=0.01)
    assert len(broker_task_ids(redis_db)) == 1


def test_a_worker_through_lost_replies_starts_once_and_counts_a_retry_once(
    proj: Any, proxy: DropProxy, redis_db: RedisDB, worker_factory: WorkerFactory
) -> None:
    store = proj.flows.store
    worker_factory("tests.proj", extra_args=FLOWS,
                   env={"FLOWS_TEST_REGISTRY": proxy.url(redis_db.db)})

    # a start whose reply is lost: re-sent, it must not look like a duplicate delivery
    proxy.arm(store.sha("start"))
    f = Flow("started")
    f.add(proj.add.si(1, 2), id="a")
    f.add(proj.add.s(10), id="b", after=["a"])
    started = proj.flows.submit(f)
    assert started.wait(timeout=60) == FlowState.SUCCEEDED
    assert proxy.dropped == [store.sha("start")]
    node = started.inspect()["nodes"]["a"]
    assert (node["attempts"], node["recoveries"]) == (1, 0), node
    assert started.results() == {"a": 3, "b": 13}
    assert run_counts(redis_db, started.id) == {"a": 1, "b": 1}

    # a Celery retry whose recorded outcome's reply is lost: counted once. The rate
    # limit holds the retry 10 s, so the re-sent outcome arrives while it is retrying
    # (not late, after the retry already succeeded)
    proxy.arm(store.sha("complete"))
    g = Flow("retried")
    g.add(proj.flaky.s(1), id="flaky", rate_limit="6/m")
    g.add(proj.add.s(10), id="then", after=["flaky"])
    retried = proj.flows.submit(g)
    assert retried.wait(timeout=60) == FlowState.SUCCEEDED
    assert proxy.dropped == [store.sha("start"), store.sha("complete")]
    node = retried.inspect()["nodes"]["flaky"]
    assert (node["retries"], node["attempts"], node["recoveries"]) == (1, 1, 0), node
    # the body sees Celery's retry count: one retry, not two
    assert retried.results() == {"flaky": 1, "then": 11}
    assert run_counts(redis_db, retried.id) == {"flaky": 2, "then": 1}
