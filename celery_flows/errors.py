"""Every exception celery-flows raises; the root is :class:`FlowsError`."""

from __future__ import annotations

__all__ = [
    "FlowsError",
    "FlowsConfigError",
    "FlowDefinitionError",
    "FlowStateError",
    "FlowNotFoundError",
    "FlowTimeoutError",
    "FlowVersionError",
]


class FlowsError(Exception):
    """Root of every celery-flows error."""


class FlowsConfigError(FlowsError, ValueError):
    """A ``flows_*`` setting in ``app.conf`` is invalid; the message names the key.

    Raised on first use of the extension and at worker start.
    """


class FlowDefinitionError(FlowsError, ValueError):
    """A flow definition is invalid (cycle, unknown or duplicate id, bad option...).

    Raised by :class:`~celery_flows.Flow` builders and by ``submit`` before anything
    is written to Redis; the message names the offending node.
    """


class FlowStateError(FlowsError):
    """A change is not allowed in the flow's current state, or a submit reused a
    flow id with a different definition. Nothing was changed."""


class FlowNotFoundError(FlowsError, LookupError):
    """No flow with that id exists in the registry (never created, or expired)."""


class FlowTimeoutError(FlowsError, TimeoutError):
    """:meth:`FlowHandle.wait` timed out before the flow reached a terminal state."""


class FlowVersionError(FlowsError):
    """A flow record has a format major version this code does not understand."""
