"""Log context (SPEC section 11): ``flow_id`` and ``node_id`` on every record, set while
a node runs (real prefork worker, the worker's own log format naming them) and in the
flow services; the root logger gets no handler."""

from __future__ import annotations

import logging
from pathlib import Path

from celery_flows import Flow, FlowState
from celery_flows.engine.logcontext import flow_scope
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS

FORMAT = "LOG flow=%(flow_id)s node=%(node_id)s %(message)s"


def test_records_carry_the_flow_and_node_of_the_running_node(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB
) -> None:
    root_handlers = list(logging.getLogger().handlers)
    proj = import_app("tests.proj")
    assert logging.getLogger().handlers == root_handlers  # Flows(app) added none

    worker = worker_factory("tests.proj", extra_args=FLOWS,
                            env={"FLOWS_TEST_LOG_FORMAT": FORMAT})
    f = Flow("logged", id="lg-1")
    a = f.add(proj.chatty.si("first"), id="talk")
    f.add(proj.chatty.si("second"), id="talk-again", after=[a])
    assert proj.flows.submit(f).wait(timeout=30) == FlowState.SUCCEEDED
    log = Path(worker.log_path).read_text()
    lines = [line for line in log.splitlines() if line.startswith("LOG ")]
    assert "LOG flow=lg-1 node=talk chatty says first" in lines
    assert "LOG flow=lg-1 node=talk-again chatty says second" in lines
    # outside a node, in the same format: None
    assert any(line.startswith("LOG flow=None node=None") and "ready" in line
               for line in lines)

    # a flow service at work on one flow names it; in this process too
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger("tests.logging.probe")
    logger.addHandler(Keep())
    logger.propagate = False
    with flow_scope("lg-1"):
        logger.warning("in a service")
    logger.warning("outside")
    assert [(r.flow_id, r.node_id) for r in seen] == [  # type: ignore[attr-defined]
        ("lg-1", None), (None, None)]
    assert logging.Formatter(FORMAT).format(seen[1]) == "LOG flow=None node=None outside"
