"""A plain Celery app (no celery-flows attached) for checking the process helpers of
``celery_flows.testing`` and the suite's fixtures on their own.

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


# not shared: each test imports this module afresh, and a shared task would be
# registered again on the apps of later tests (DuplicateTaskNameWarning)
@app.task(shared=False)
def add(x: int, y: int) -> int:
    return x + y
