"""Where a node's message goes: its queue and priority, from the node's options, its
task's ``@flows.task`` defaults, then Celery's own routing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..define.records import NodeRecord
from ..define.validate import check_node_opts, check_rate

__all__ = ["node_defaults", "route_queue", "task_defaults", "with_call_defaults"]


def route_queue(app: Any, rec: NodeRecord, task_name: str, args: Any, kwargs: Any) -> str:
    """Node option, else task option, else Celery's own routing."""
    if rec.get("queue"):
        return str(rec["queue"])
    defaults = task_defaults(app, task_name)
    if defaults.get("queue"):
        return str(defaults["queue"])
    route = app.amqp.router.route({}, task_name, args, kwargs)
    queue = route.get("queue")
    return str(getattr(queue, "name", queue) or app.conf.task_default_queue)


def task_defaults(app: Any, task_name: str) -> dict[str, Any]:
    """The node defaults ``@flows.task(...)`` gave a task ({} for a plain task)."""
    task = app.tasks.get(task_name)
    return dict(getattr(task, "flows_defaults", None) or {})


def node_defaults(queue: str | None, priority: int | None, failure_policy: str | None,
                  trigger_rule: str | None, max_recoveries: int | None,
                  rate_limit: str | None) -> dict[str, Any]:
    """Validated ``@flows.task`` node defaults."""
    defaults = check_node_opts(
        "<task defaults>", queue=queue, priority=priority, failure_policy=failure_policy,
        trigger_rule=trigger_rule, max_recoveries=max_recoveries,
    )
    if rate_limit is not None:
        check_rate(rate_limit, None, "flow_rate_limit")
        defaults["rate"] = rate_limit
    return defaults


def with_call_defaults(task: Any, queue: str | None, priority: int | None) -> None:
    """Default queue/priority for ordinary calls of a decorated task (explicit call
    options still win)."""
    original: Callable[..., Any] = task.apply_async

    def apply_async(args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        if queue is not None:
            options.setdefault("queue", queue)
        if priority is not None:
            options.setdefault("priority", priority)
        return original(args, kwargs, **options)

    task.apply_async = apply_async
