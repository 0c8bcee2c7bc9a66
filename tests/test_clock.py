"""Timing by Redis TIME (SPEC section 7): a worker whose wall clock is far off still
fires sensor pokes, retries and timers at the right moment. The skew is real for that
process: ``CELERY_FLOWS_FAULTS=clock=skew:<s>`` shifts its ``time.time``."""

from __future__ import annotations

import pytest

from celery_flows import Flow, FlowState
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, run_counts


@pytest.mark.parametrize("skew", [-900, 900])
def test_a_worker_with_a_skewed_clock_fires_pokes_and_retries_on_time(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB, skew: int
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS,
                   env={"CELERY_FLOWS_FAULTS": f"clock=skew:{skew}"})
    f = Flow("timed")
    s = f.add_sensor(proj.check_key.s("ready"), id="sensor", poke_interval=0.5, timeout=300)
    f.add(proj.flaky.s(2), id="retried")
    f.add(proj.ident.s(), id="after", after=[s])
    handle = proj.flows.submit(f)
    # a poke is due every 0.5 s by Redis TIME; the skew is 900 s
    wait_until(lambda: run_counts(redis_db, handle.id)["sensor"] >= 3, "three pokes",
               timeout=120)
    redis_db.client.set("ready", "now")
    assert handle.wait(timeout=120) == FlowState.SUCCEEDED
    assert handle.results()["after"] == "now"
    assert handle.results()["retried"] == 2
