"""The process helpers of ``celery_flows.testing`` and the suite's fixtures on them, checked
with plain Celery: redis-server, db isolation, workers."""

from __future__ import annotations

from celery_flows.testing import RedisServer
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import pid_alive, wait_until_gone


def test_redis_db_is_fresh_and_isolated(redis_server: RedisServer, redis_db: RedisDB) -> None:
    assert redis_db.client.dbsize() == 0
    redis_db.client.set(b"k", b"v")
    assert redis_db.client.get(b"k") == b"v"
    assert redis_db.redis_url == f"unix://{redis_server.socket_path}?db={redis_db.db}"
    assert len(redis_server.socket_path.encode()) < 100
    # redis-py decodes CONFIG GET replies even with decode_responses=False.
    assert redis_db.client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    other = redis_server.client((redis_db.db % 63) + 1)
    try:
        assert other.get(b"k") is None
    finally:
        other.close()


def test_redis_server_restart_keeps_aof_data() -> None:
    with RedisServer(["--appendonly", "yes", "--appendfsync", "always"]) as server:
        client = server.client(5)
        client.set(b"survives", b"1")
        client.close()
        server.kill()
        server.start()
        client = server.client(5)
        try:
            assert client.get(b"survives") == b"1"
        finally:
            client.close()
        pid = server.pid
        assert pid is not None
        server.restart()
        assert not pid_alive(pid)
        assert server.pid != pid


def test_prefork_worker_runs_task_and_dies_on_kill9(
    worker_factory: WorkerFactory, import_app: ImportApp
) -> None:
    plain_app = import_app("tests.plain_app")
    worker = worker_factory("tests.plain_app", concurrency=2)
    children = worker.wait_children(2)
    assert len(children) == 2

    assert plain_app.add.delay(2, 3).get(timeout=20) == 5
    assert " ready." in worker.log()

    main_pid = worker.pid
    worker.kill9()
    assert wait_until_gone(main_pid, 5)
    for pid in children:
        assert wait_until_gone(pid, 5), f"pool child {pid} outlived kill9"
    assert worker.group_pids() == []
