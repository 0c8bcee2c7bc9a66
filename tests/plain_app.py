"""A plain Celery app (no celery_flows) for checking the test harness itself.

Broker and result backend come from ``FLOWS_TEST_BROKER``, as in every test app module.
"""

from __future__ import annotations

import os

from celery import Celery

BROKER_URL = os.environ["FLOWS_TEST_BROKER"]

app = Celery("plain_app", broker=BROKER_URL, backend=BROKER_URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
)


@app.task
def add(x: int, y: int) -> int:
    return x + y
