"""The Flows app of tests/test_userdata.py: tasks that hand back what a node received
(its context, call, headers and dependency results) so a test can compare it exactly.
Broker, backend and registry come from ``FLOWS_TEST_BROKER``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_flows import Flows, current_flow

BROKER_URL = os.environ["FLOWS_TEST_BROKER"]

app = Celery("userdata_app", broker=BROKER_URL, backend=BROKER_URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
    worker_prefetch_multiplier=1,
)
flows = Flows(app)


@flows.task(shared=False)
def echo_context() -> Any:
    return current_flow.context


@flows.task(shared=False)
def echo_call(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


@flows.task(shared=False)
def echo_results(*_args: Any) -> dict[str, Any]:
    return current_flow.results()


@flows.task(bind=True, shared=False)
def echo_header(self: Any, name: str) -> Any:
    # custom message headers, on a worker and under task_always_eager alike
    return (self.request.headers or {}).get(name)


@flows.task(shared=False)
def value(x: Any) -> Any:
    return x
