"""Every identity format of the registry, built and parsed here only (beside the key
builder, keys.py, which embeds several of them in key names).

======================  ===============================================  =============
what                    format                                           where
======================  ===============================================  =============
task id                 ``<flow>~<node>~<attempt>~<nonce>``              Celery messages
dirty token             ``<flow>|<12 hex>``                              dispatch index
worker instance         ``<hostname>|<pid>|<8 hex>``                     heartbeats, leases
wait-queue member       ``<order key>|<flow>|<node>|<attempt>``          limiter queues
share unit              ``k|<cgroup>|<ckey>`` or ``f|<flow>``            fair share
order key               ``<9999 - path:04><priority:1><ready ms:015>``   wait-queue sort
limiter id              ``flow:<id>``, ``task:<name>``, ``group:<name>``,  limiter keys
                        ``queue:<name>``
request id              16 url-safe characters (96 random bits)          reply caches
batch id                16 hex                                           add_bulk batches
======================  ===============================================  =============

The task id names the attempt, so every worker (and a ``self.replace()`` replacement,
which keeps the id but not custom headers) can tell which node attempt a message
belongs to without a lookup; the nonce tells a message of an earlier flow that had the
same id. A restarted worker with the same hostname is a new instance, so its
predecessor's leases still expire.
"""

from __future__ import annotations

import os
import secrets
import socket
import uuid
from typing import Any, NamedTuple

__all__ = [
    "TaskRef", "flow_limiter", "group_limiter", "instance_host",
    "is_queue_limiter", "member_for", "new_batch_id", "new_dirty_token", "new_instance_id",
    "new_request_id", "order_key", "parse_member", "parse_task_id", "queue_limiter",
    "share_unit", "task_id_for", "task_limiter", "task_nonce", "token_flow",
]

SEP = "~"
MAX_PATH = 9999


# -- task ids ---------------------------------------------------------------------------

class TaskRef(NamedTuple):
    """The node attempt a flow task id names."""

    flow_id: str
    node_id: str
    attempt: int


def task_id_for(flow_id: str, node_id: str, attempt: int, nonce: str) -> str:
    return SEP.join((flow_id, node_id, str(attempt), nonce))


def parse_task_id(task_id: Any) -> TaskRef | None:
    """The attempt a task id names; None for any other id (a non-flow task)."""
    if not isinstance(task_id, str) or task_id.count(SEP) != 3:
        return None
    fid, nid, attempt, _nonce = task_id.split(SEP)
    if not attempt.isdigit():
        return None
    return TaskRef(fid, nid, int(attempt))


def task_nonce(task_id: str) -> str:
    """The flow nonce a task id was built with ('' if it is not a flow task id)."""
    return task_id.rsplit(SEP, 1)[1] if parse_task_id(task_id) is not None else ""


# -- dirty tokens -----------------------------------------------------------------------

def new_dirty_token(flow_id: str) -> str:
    """A marker in the dispatch index: this flow may have nodes left in its outbox."""
    return f"{flow_id}|{uuid.uuid4().hex[:12]}"


def token_flow(token: str) -> str:
    return token.split("|", 1)[0]


# -- worker instances -------------------------------------------------------------------

def new_instance_id(hostname: str = "") -> str:
    return f"{hostname or socket.gethostname()}|{os.getpid()}|{uuid.uuid4().hex[:8]}"


def instance_host(instance: str) -> str:
    return instance.split("|", 1)[0]


# -- wait queues ------------------------------------------------------------------------

def order_key(path: int, priority: int | None, ready_at: float) -> str:
    """Wait queues sort members lexically: longest path first, then priority (Redis:
    0 first), then the time the node became ready."""
    prio = 0 if priority is None else max(0, min(int(priority), 9))
    return f"{MAX_PATH - min(int(path), MAX_PATH):04d}{prio}{int(ready_at * 1000):015d}"


def member_for(order: str, flow_id: str, node_id: str, attempt: int) -> str:
    return f"{order}|{flow_id}|{node_id}|{attempt}"


def share_unit(flow_id: str, cgroup: str | None = None, ckey: str | None = None) -> str:
    """The fair-share unit of a flow's waiting nodes (SPEC section 12): its concurrency
    key, when its meta has one, else the flow itself. Neither ``|`` nor a space is ever
    in an id or a key (define/validate.ID_RE)."""
    if ckey:
        return f"k|{cgroup or ''}|{ckey}"
    return f"f|{flow_id}"


def parse_member(member: str) -> TaskRef | None:
    """The node attempt a wait-queue member stands for."""
    parts = member.split("|")
    if len(parts) != 4 or not parts[3].isdigit():
        return None
    return TaskRef(parts[1], parts[2], int(parts[3]))


# -- limiters ---------------------------------------------------------------------------

def flow_limiter(flow_id: str) -> str:
    return f"flow:{flow_id}"


def task_limiter(task_name: str) -> str:
    return f"task:{task_name}"


def group_limiter(group: str) -> str:
    return f"group:{group}"


def queue_limiter(queue: str) -> str:
    return f"queue:{queue}"


def is_queue_limiter(limiter_id: str) -> bool:
    return limiter_id.startswith("queue:")


# -- requests and batches ---------------------------------------------------------------

def new_request_id() -> str:
    """A transition call's id: 96 random bits, 16 characters."""
    return secrets.token_urlsafe(12)


def new_batch_id() -> str:
    return secrets.token_hex(8)
