"""Configuration (SPEC section 1): every spelling Celery reads, unknown keys refused,
the new keys validated, secrets never shown, noeviction on every cluster master."""

from __future__ import annotations

import http.server
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_flows import Flow, FlowDefinitionError, FlowsConfigError, FlowState
from celery_flows.config import FlowsConfig, redact_url, redact_webhook
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, cli


def _app(obj: Any = None, namespace: str | None = None, **conf: Any) -> Celery:
    app = Celery("cfg", broker="redis://localhost:6379/0", set_as_current=False)
    if obj is not None:
        app.config_from_object(obj, namespace=namespace)
    app.conf.update(conf)
    return app


class Namespaced:
    CELERY_FLOWS_RETENTION = 5
    CELERY_FLOWS_QUEUE_LIMITS = {"gpu": 2}
    CELERY_FLOWS_MAX_NODES = 50


def test_settings_are_read_in_every_spelling_celery_reads() -> None:
    cfg = FlowsConfig.from_app(_app(Namespaced, namespace="CELERY"))
    assert (cfg.retention, cfg.queue_limits, cfg.max_nodes) == (5, {"gpu": 2}, 50)
    lower = FlowsConfig.from_app(_app({"celery_flows_retention": 7}, namespace="celery"))
    assert lower.retention == 7
    both = FlowsConfig.from_app(_app(Namespaced, namespace="CELERY", flows_key_prefix="k"))
    assert (both.retention, both.key_prefix) == (5, "k")

    class Django:
        CELERY_FLOWS_RETENTION = 8
        FLOWS_ENABLED = True  # another library's setting: not Celery's under a namespace

    assert FlowsConfig.from_app(_app(Django, namespace="CELERY")).retention == 8

    class Upper:
        FLOWS_RETENTION = 9
        FLOWS_RATE_LIMITS = {"api": "5/s"}

    upper = FlowsConfig.from_app(_app(Upper))
    assert (upper.retention, upper.rate_limits) == (9, {"api": "5/s"})
    plain = FlowsConfig.from_app(_app(flows_retention=11, flows_events_maxlen=10))
    assert (plain.retention, plain.events_maxlen, plain.max_nodes) == (11, 10, 100000)


@pytest.mark.parametrize(("obj", "namespace", "conf", "typo", "closest"), [
    (None, None, {"flows_rate_limit": {"api": "1/s"}}, "flows_rate_limit",
     "flows_rate_limits"),
    ({"CELERY_FLOWS_QUEUE_LIMIT": {"q": 1}}, "CELERY", {}, "CELERY_FLOWS_QUEUE_LIMIT",
     "CELERY_FLOWS_QUEUE_LIMITS"),
    ({"FLOWS_LEASE_TIMOUT": 5}, None, {}, "FLOWS_LEASE_TIMOUT", "FLOWS_LEASE_TIMEOUT"),
    ({"celery_flows_max_node": 5}, "celery", {}, "celery_flows_max_node",
     "celery_flows_max_nodes"),
])
def test_an_unknown_key_names_the_closest_known_one(
    obj: Any, namespace: str | None, conf: dict[str, Any], typo: str, closest: str
) -> None:
    with pytest.raises(FlowsConfigError) as err:
        FlowsConfig.from_app(_app(obj, namespace, **conf))
    assert typo in str(err.value) and f"did you mean {closest}?" in str(err.value)


def test_one_setting_twice_with_different_values_is_refused() -> None:
    with pytest.raises(FlowsConfigError, match="same setting"):
        FlowsConfig.from_app(_app({"FLOWS_RETENTION": 5}, flows_retention=6))


@pytest.mark.parametrize(("key", "value", "why"), [
    ("flows_max_nodes", 0, "int >= 1"),
    ("flows_max_nodes", True, "int >= 1"),
    ("flows_events_maxlen", "10", "int >= 1"),
    ("flows_concurrency_limits", {"tenant": 0}, "int >= 1"),
    ("flows_concurrency_limits", ["tenant"], "dict of group name"),
    ("flows_webhook_allowed_hosts", "hooks.example.com", "list of host names"),
    ("flows_webhook_allowed_hosts", ["https://hooks.example.com/x"], "not a host name"),
    ("flows_dashboard_token", 12345, "non-empty string"),
    ("flows_dashboard_show_args", "yes", "True or False"),
])
def test_new_keys_are_validated(key: str, value: Any, why: str) -> None:
    with pytest.raises(FlowsConfigError) as err:
        FlowsConfig.from_app(_app(**{key: value}))
    assert key in str(err.value) and why in str(err.value)


def test_new_keys_are_read() -> None:
    cfg = FlowsConfig.from_app(_app(
        flows_webhook_allowed_hosts=["Hooks.Example.com"], flows_concurrency_limits={"t": 2},
        flows_dashboard_token="tok", flows_dashboard_show_args=True,
        flows_webhook_url="https://HOOKS.example.com/in"))
    assert cfg.webhook_allowed_hosts == ("hooks.example.com",)
    assert (cfg.concurrency_limits, cfg.dashboard_token, cfg.dashboard_show_args) == (
        {"t": 2}, "tok", True)


def test_a_webhook_url_to_a_host_not_allowed_is_refused() -> None:
    with pytest.raises(FlowsConfigError) as err:
        FlowsConfig.from_app(_app(flows_webhook_allowed_hosts=["hooks.example.com"],
                                  flows_webhook_url="https://evil.example.org/x?t=SECRET"))
    assert "flows_webhook_url" in str(err.value) and "evil.example.org" in str(err.value)
    assert "SECRET" not in str(err.value)


def test_a_bad_value_stops_the_worker_at_start(worker_factory: WorkerFactory) -> None:
    worker = worker_factory("tests.proj", ready_timeout=None,
                            env={"FLOWS_TEST_QUEUE_LIMITS": json.dumps({"gpu": 0})})
    assert worker.process is not None
    worker.process.wait(timeout=60)
    assert worker.process.returncode != 0
    assert "app.conf.flows_queue_limits: queue 'gpu': 0 must be an int >= 1" in worker.log()


def test_a_flow_webhook_to_a_host_not_allowed_is_refused_at_submit(
    import_app: ImportApp, redis_db: RedisDB
) -> None:
    proj = import_app("tests.proj")
    proj.app.conf.flows_webhook_allowed_hosts = ["hooks.example.com"]
    f = Flow("hooked", id="hook-refused", webhook="https://evil.example.org/in?t=SECRET")
    f.add(proj.add.si(1, 2), id="a")
    with pytest.raises(FlowDefinitionError) as err:
        proj.flows.submit(f)
    assert "evil.example.org" in str(err.value) and "SECRET" not in str(err.value)
    assert redis_db.client.exists(proj.flows.store.keys.meta("hook-refused")) == 0
    ok = Flow("hooked", id="hook-ok", webhook="https://HOOKS.example.com/in")
    ok.add(proj.add.si(1, 2), id="a")
    proj.flows.submit(ok)
    assert redis_db.client.exists(proj.flows.store.keys.meta("hook-ok")) == 1


# -- secrets ------------------------------------------------------------------------------


def test_redaction_helpers() -> None:
    assert redact_url("redis://:s3cret@host/0") == "redis://:***@host/0"
    assert redact_url("redis://user:s3cret@host:6380/1") == "redis://user:***@host:6380/1"
    assert redact_url("unix:///tmp/x.sock?db=2") == "unix:///tmp/x.sock?db=2"
    assert redact_webhook("https://u:pw@hooks.example.com/p/TOKEN?sig=abc") == \
        "https://hooks.example.com:443"
    assert redact_webhook("http://hooks.example.com:8080/x") == "http://hooks.example.com:8080"


@pytest.mark.parametrize("url", ["http://user:s3cret@host/0", "redis//:s3cret@host/0"])
def test_config_errors_do_not_show_the_password(url: str) -> None:
    with pytest.raises(FlowsConfigError) as err:
        FlowsConfig.from_app(_app(flows_redis_url=url))
    assert "flows_redis_url" in str(err.value) and "s3cret" not in str(err.value)


def test_the_config_repr_shows_no_secret() -> None:
    cfg = FlowsConfig.from_app(_app(flows_redis_url="redis://user:s3cret@host/0",
                                    flows_webhook_secret="WHSECRET",
                                    flows_dashboard_token="DASHTOKEN"))
    shown = repr(cfg)
    assert "host" in shown
    for secret in ("s3cret", "WHSECRET", "DASHTOKEN"):
        assert secret not in shown


def test_the_cli_shows_no_password(redis_db: RedisDB) -> None:
    out = cli("list", broker=redis_db.celery_url,
              env={"FLOWS_TEST_REGISTRY": "http://user:s3cret@127.0.0.1:1/0"})
    assert out.returncode == 1
    assert "flows_redis_url" in out.stderr and "s3cret" not in out.stderr + out.stdout
    # a registry that does not answer: one line naming the failure, no password
    out = cli("list", broker=redis_db.celery_url,
              env={"FLOWS_TEST_REGISTRY": "redis://user:s3cret@127.0.0.1:1/0"})
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "registry Redis failed" in out.stderr and "s3cret" not in out.stderr + out.stdout


class _Refuse(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def refusing_hook() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_delivery_logs_show_only_scheme_host_and_port(
    import_app: ImportApp, redis_db: RedisDB, refusing_hook: int,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery_flows.worker import webhooks

    monkeypatch.setenv("FLOWS_TEST_WEBHOOK_SECRET", "WHSECRET")
    proj = import_app("tests.proj")
    proj.app.conf.task_always_eager = True
    urls = [f"http://hookuser:HOOKPASS@127.0.0.1:{refusing_hook}/in/PATHTOKEN?sig=QTOKEN",
            f"http://127.0.0.1:{refusing_hook}/in/PATHTOKEN?sig=QTOKEN x"]
    ids = []
    for i, url in enumerate(urls):
        f = Flow("hooked", id=f"hooked-{i}", webhook=url)
        f.add(proj.add.si(1, 2), id="a")
        assert proj.flows.submit(f).state() == FlowState.SUCCEEDED
        ids.append(f"hooked-{i}")
    store = proj.flows.store
    store.client.zadd(store.keys.webhooks, {fid: 0 for fid in ids})
    with caplog.at_level(logging.WARNING, logger="celery_flows.worker.webhooks"):
        webhooks.deliver_due(proj.flows.store, proj.flows.config)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert text.count(f"http://127.0.0.1:{refusing_hook}") == 2, text
    for secret in ("HOOKPASS", "hookuser", "PATHTOKEN", "QTOKEN", "WHSECRET"):
        assert secret not in text, text


# -- maxmemory-policy on every master ---------------------------------------------------


def test_noeviction_is_checked_on_every_cluster_master(
    cluster: str, worker_factory: WorkerFactory, redis_db: RedisDB,  # noqa: F811
) -> None:
    rc = redis.RedisCluster.from_url(cluster)
    masters = rc.get_primaries()
    # not the node the registry URL names: a check of that node alone would pass
    node = next(n for n in masters if not cluster.endswith(f":{n.port}/0"))
    where = f"{node.host}:{node.port}"
    direct = redis.Redis(host=node.host, port=node.port)
    direct.config_set("maxmemory-policy", "allkeys-lru")
    try:
        env = {"FLOWS_TEST_REGISTRY": cluster, "FLOWS_TEST_REGISTRY_CLUSTER": "1"}
        worker = worker_factory("tests.proj", extra_args=FLOWS, env=env, ready_timeout=None)
        assert worker.process is not None
        worker.process.wait(timeout=60)
        log = worker.log()
        assert worker.process.returncode != 0, log[-2000:]
        assert f"node {where}" in log and "maxmemory-policy=allkeys-lru" in log, log[-2000:]
    finally:
        direct.config_set("maxmemory-policy", "noeviction")
        direct.close()
        rc.close()


def test_a_noeviction_cluster_is_accepted(
    cluster: str, worker_factory: WorkerFactory, redis_db: RedisDB,  # noqa: F811
    import_app: ImportApp, monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"FLOWS_TEST_REGISTRY": cluster, "FLOWS_TEST_REGISTRY_CLUSTER": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proj = import_app("tests.proj")
    worker = worker_factory("tests.proj", extra_args=FLOWS, env=env)
    assert "maxmemory-policy checked on 3 node(s)" in worker.log()
    f = Flow("ok-cluster")
    f.add(proj.add.si(1, 2), id="a")
    handle = proj.flows.submit(f)
    assert handle.wait(timeout=30) == FlowState.SUCCEEDED
    # the index's paged reads and pruning work across slots too
    rows, _more = proj.flows.store.flow_summaries(0, 10)
    assert (handle.id, "succeeded") in [(fid, (m or {}).get("state")) for fid, m in rows]
    assert proj.flows.store.prune_index(0)[0] == 0
