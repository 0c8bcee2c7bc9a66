"""The core engine and the reliability guarantees on RabbitMQ and on the threads and solo
pools.

Most tests here are the suite's own tests run again under other setups (see
``flows_setup`` in ``conftest.py``): ``rabbitmq/prefork`` puts the broker on a private
RabbitMQ node while results and the registry stay on Redis; ``redis/threads`` and
``redis/solo`` run the workers with ``-P threads`` / ``-P solo``. A pool-child kill does
not apply to the threads and solo pools (there is no child); a whole-worker kill does.
The tests written here cover what only another broker or pool can show.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest

from celery_flows import Flow, FlowState
from celery_flows.testing import wait_until
from tests import test_engine as engine
from tests import test_guarantees as guarantees
from tests import test_limits as limits
from tests import test_reliability as reliability
from tests.conftest import FlowsSetup, ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, node_doc, one_outcome_per_attempt, runs

RABBIT, RABBIT_THREADS = "rabbitmq/prefork", "rabbitmq/threads"
THREADS, SOLO = "redis/threads", "redis/solo"
LEASE = 3.0


def again(test: Callable[..., None], *setups: str) -> Callable[..., None]:
    """``test`` once more under each of ``setups`` (its fixtures, its assertions)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        test(*args, **kwargs)

    return pytest.mark.setups(*setups)(run)


# -- the core engine ----------------------------------------------------------------

test_diamond = again(engine.test_diamond_runs_each_node_once_with_results_passed,
                     RABBIT, THREADS, SOLO)
test_fan_out_fan_in = again(
    engine.test_wide_fan_out_fan_in_on_two_workers_runs_every_body_exactly_once,
    RABBIT, THREADS)
test_duplicates_acked = again(
    engine.test_duplicate_and_superseded_messages_are_acked_without_running,
    RABBIT, THREADS, SOLO)
test_queues_context = again(engine.test_plain_tasks_queues_context_and_current_flow,
                            RABBIT, THREADS, SOLO)
test_failure = again(engine.test_failure_skips_dependents_and_fails_the_flow,
                     RABBIT, THREADS, SOLO)
test_sub_flows = again(engine.test_sub_flows_and_trees, RABBIT)
test_published_after_recorder_died = again(
    guarantees.test_crash_between_record_and_publish, RABBIT)
test_rate_limits = again(limits.test_flow_and_task_rate_limits, RABBIT)
test_queue_cap = again(limits.test_queue_cap_bounds_concurrency_across_workers, RABBIT)

# -- reliability --------------------------------------------------------------------

test_worker_kill9 = again(
    reliability.test_worker_killed_with_running_nodes_is_recovered_within_the_lease,
    RABBIT, THREADS)
test_pool_child_kill = again(
    reliability.test_pool_child_killed_mid_task_is_recovered_as_a_new_attempt, RABBIT)
test_pool_child_kill_before_record = again(
    reliability.test_pool_child_killed_between_the_body_and_its_record, RABBIT)
test_success_from_backend = again(
    reliability.test_success_the_registry_missed_is_taken_from_the_result_backend, RABBIT)
test_max_recoveries = again(reliability.test_recoveries_are_bounded_by_max_recoveries,
                            RABBIT)
test_acks_late_exactly_once = again(
    reliability.test_acks_late_thousands_of_nodes_run_exactly_once, RABBIT, THREADS)


@pytest.mark.setups(SOLO, RABBIT_THREADS, "rabbitmq/solo")
def test_whole_worker_killed_mid_node_runs_it_again_as_a_new_attempt(
    flows_setup: FlowsSetup, import_app: ImportApp, worker_factory: WorkerFactory,
    redis_db: RedisDB, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One node at a time (the solo pool runs no more): kill -9 the worker that runs it;
    a new worker recovers it within the lease as attempt 2 and the flow completes."""
    env = {"FLOWS_TEST_LEASE": str(LEASE)}
    monkeypatch.setenv("FLOWS_TEST_LEASE", str(LEASE))
    proj = import_app("tests.proj")
    doomed = worker_factory("tests.proj", extra_args=FLOWS, env=env)
    f = Flow("killed-" + flows_setup.pool)
    a = f.add(proj.wait_for_key.si("go", 60), id="a")
    f.add(proj.ident.s(), id="b", after=[a])
    handle = proj.flows.submit(f)
    # its body runs (it logged its run), not only its start recorded
    wait_until(lambda: f"{handle.id}|a|1" in runs(redis_db), "a running its body")
    doomed.kill9()
    redis_db.client.set("go", 1)  # attempt 2 returns at once
    worker_factory("tests.proj", extra_args=FLOWS, env=env)
    assert handle.wait(timeout=LEASE + 40) == FlowState.SUCCEEDED
    assert handle.results() == {"a": "go", "b": "go"}
    doc = node_doc(handle, "a")
    assert doc["attempts"] == 2 and doc["recoveries"] == 1
    attempts = [r.split("|")[2] for r in runs(redis_db) if r.split("|")[1] == "a"]
    assert attempts == ["1", "2"]
    one_outcome_per_attempt(handle)


@pytest.mark.setups(RABBIT, RABBIT_THREADS)
def test_acks_late_redelivery_after_kill9_is_not_run_as_the_same_attempt(
    flows_setup: FlowsSetup, import_app: ImportApp, worker_factory: WorkerFactory,
    redis_db: RedisDB, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With acks_late, RabbitMQ hands a killed worker's unacked message to another worker
    at once. That redelivery is acked without running (attempt 1's body already started
    on the lost worker); the node runs again only as attempt 2, after the lease expired."""
    env = {"FLOWS_TEST_ACKS_LATE": "1", "FLOWS_TEST_LEASE": str(LEASE)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proj = import_app("tests.proj")
    doomed = worker_factory("tests.proj", extra_args=FLOWS, env=env)
    f = Flow("redelivered")
    a = f.add(proj.sleepy.si(4, "a"), id="a")
    f.add(proj.ident.s(), id="b", after=[a])
    handle = proj.flows.submit(f)
    # its body runs (it logged its run), not only its start recorded
    wait_until(lambda: f"{handle.id}|a|1" in runs(redis_db), "a running its body")
    if flows_setup.pool == "prefork":
        os.killpg(doomed.pid, signal.SIGKILL)  # main process and pool children at once
    doomed.kill9()
    survivor = worker_factory("tests.proj", extra_args=FLOWS, env=env)
    survivor.wait_for_log(r"not running .*~a~1~", timeout=20)
    assert handle.wait(timeout=LEASE + 40) == FlowState.SUCCEEDED
    assert handle.results() == {"a": "a", "b": "a"}
    attempts = [r.split("|")[2] for r in runs(redis_db) if r.split("|")[1] == "a"]
    assert attempts == ["1", "2"]
    doc = node_doc(handle, "a")
    assert doc["attempts"] == 2 and doc["recoveries"] == 1
    one_outcome_per_attempt(handle)
