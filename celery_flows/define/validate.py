"""The rules a definition is checked against before anything is written: ids, node
options, rates, and what a task signature may carry. Shared by the builder, the
compiler, ``from_canvas`` and ``add_node`` so that each rule exists once."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from celery.canvas import Signature, _chain, _chord, group

from ..config import RATE_RE, FlowsConfig, parse_rate
from ..errors import FlowDefinitionError

__all__ = ["FAILURE_POLICIES", "FORBIDDEN_SIG_OPTIONS", "MAX_ID_LENGTH", "TRIGGER_RULES",
           "check_id", "check_new_id", "check_node_opts", "check_rate", "check_signature",
           "forbidden_options", "new_node_id"]

MAX_ID_LENGTH = 128
ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")

FAILURE_POLICIES = ("fail", "ignore", "remove")
TRIGGER_RULES = (
    "all_success", "all_done", "all_failed", "one_success", "one_failed", "none_failed",
)

#: Signature options no flow node may carry: ordering comes from the graph, task ids
#: from flows.
FORBIDDEN_SIG_OPTIONS = ("countdown", "eta", "link", "link_error", "task_id")


def check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        reserved = isinstance(value, str) and ("[" in value or "]" in value)
        raise FlowDefinitionError(
            f"{what} {value!r} is malformed: use 1-128 letters, digits and _ - . : only"
            + (" ('[' and ']' are reserved for map items such as each[3])" if reserved
               else "")
        )
    return value


#: what a flow of a concurrency group does when its key has no free place (SPEC section 12)
ON_LIMIT = ("queue", "cancel_newest", "cancel_oldest")


def check_concurrency(concurrency: Any, on_limit: Any) -> tuple[str, str] | None:
    """A flow's ``concurrency=(group, key)`` and ``on_limit``; the group's presence in
    ``flows_concurrency_limits`` is checked at compile, where the configuration is."""
    if on_limit not in ON_LIMIT:
        raise FlowDefinitionError(
            f"flow on_limit {on_limit!r}: use one of {', '.join(map(repr, ON_LIMIT))}")
    if concurrency is None:
        return None
    if not isinstance(concurrency, (tuple, list)) or len(concurrency) != 2 \
            or not isinstance(concurrency[0], str) or not concurrency[0]:
        raise FlowDefinitionError(
            f"flow concurrency {concurrency!r}: give (group, key), e.g. ('tenant', 'acme'), "
            "the group named in flows_concurrency_limits")
    check_id(concurrency[0], "flow concurrency group")
    key = concurrency[1]
    if not isinstance(key, str):
        raise FlowDefinitionError(
            f"flow concurrency key {key!r} must be a string (letters, digits and _ - . :)")
    check_id(key, "flow concurrency key")
    return (concurrency[0], key)


def check_new_id(node_id: Any, taken: Collection[str], flow_name: str) -> str:
    """A well-formed node id not yet used in the flow."""
    check_id(node_id, "node id")
    if node_id in taken:
        raise FlowDefinitionError(f"node id {node_id!r} is used twice in flow {flow_name!r}")
    return str(node_id)


def new_node_id(task_name: str, taken: Collection[str], counts: dict[str, int] | None = None
                ) -> str:
    """The id a node gets when none is given: the task's short name, then ``-2``,
    ``-3``... (``counts`` remembers where each name's numbering stands)."""
    short = str(task_name).rsplit(".", 1)[-1] or "node"
    short = "".join(c if c.isalnum() or c in "_-.:" else "_" for c in short)[:120]
    counts = {} if counts is None else counts
    n = counts.get(short, 0)
    while True:
        n += 1
        candidate = short if n == 1 else f"{short}-{n}"
        if candidate not in taken:
            counts[short] = n
            return candidate


def forbidden_options(sig: Signature) -> list[str]:
    """The options of ``sig`` that :data:`FORBIDDEN_SIG_OPTIONS` refuses."""
    return [k for k in FORBIDDEN_SIG_OPTIONS if sig.options.get(k) is not None]


def check_signature(sig: Any, node_id: str | None) -> None:
    """A node's body must be one task signature of a task of the user's own."""
    label = f"node {node_id!r}" if node_id else "a node"
    if isinstance(sig, (_chain, group, _chord)):
        raise FlowDefinitionError(
            f"{label}: add() takes one task signature, not a {type(sig).__name__}; "
            "use Flow.from_canvas() or add a sub-flow"
        )
    if not isinstance(sig, Signature):
        raise FlowDefinitionError(
            f"{label}: expected a Celery signature such as task.s(...), got {sig!r}"
        )
    bad = forbidden_options(sig)
    if bad:
        raise FlowDefinitionError(
            f"{label} ({sig.task}): signature option(s) {', '.join(bad)} are not "
            "allowed in a flow; express ordering with after= and let flows assign ids"
        )
    if not sig.task:
        raise FlowDefinitionError(f"{label}: signature has no task name")
    if str(sig.task).startswith("celery."):
        raise FlowDefinitionError(
            f"{label}: Celery's built-in task {sig.task!r} cannot be a flow node; "
            "wrap the work in a task of your own"
        )


def check_rate(value: Any, config: FlowsConfig | None, what: str) -> None:
    if not isinstance(value, str):
        raise FlowDefinitionError(f"{what} {value!r} must be 'N/s|m|h' or a group name")
    if RATE_RE.match(value):
        try:
            parse_rate(value)
        except ValueError as exc:
            raise FlowDefinitionError(f"{what}: {exc}") from None
        return
    if config is not None and value not in config.rate_limits:
        raise FlowDefinitionError(
            f"{what} {value!r} is neither a rate like '10/s' nor a group defined in "
            "app.conf.flows_rate_limits"
        )


def check_node_opts(
    nid: str,
    *,
    queue: Any = None,
    priority: Any = None,
    rate_limit: Any = None,
    failure_policy: Any = None,
    trigger_rule: Any = None,
    max_recoveries: Any = None,
) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if queue is not None:
        if not isinstance(queue, str) or not queue:
            raise FlowDefinitionError(f"node {nid!r}: queue must be a non-empty string")
        opts["queue"] = queue
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
            raise FlowDefinitionError(f"node {nid!r}: priority must be an int from 0 to 9")
        opts["priority"] = priority
    if rate_limit is not None:
        check_rate(rate_limit, None, f"node {nid!r} rate_limit")
        opts["rate"] = rate_limit
    if failure_policy is not None:
        if failure_policy not in FAILURE_POLICIES:
            raise FlowDefinitionError(
                f"node {nid!r}: failure_policy {failure_policy!r} must be one of "
                f"{', '.join(FAILURE_POLICIES)}"
            )
        opts["policy"] = failure_policy
    if trigger_rule is not None:
        if trigger_rule not in TRIGGER_RULES:
            raise FlowDefinitionError(
                f"node {nid!r}: trigger_rule {trigger_rule!r} must be one of "
                f"{', '.join(TRIGGER_RULES)}"
            )
        opts["rule"] = trigger_rule
    if max_recoveries is not None:
        if (isinstance(max_recoveries, bool) or not isinstance(max_recoveries, int)
                or max_recoveries < 0):
            raise FlowDefinitionError(f"node {nid!r}: max_recoveries must be an int >= 0")
        opts["max_rec"] = max_recoveries
    return opts
