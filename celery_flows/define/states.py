"""Node and flow states (SPEC section 4): the public enums and what counts as terminal."""

from __future__ import annotations

from enum import Enum

__all__ = ["FlowState", "NodeState", "TERMINAL_NODE_STATES"]


class NodeState(str, Enum):
    """The state of one node of a flow (SPEC section 4); a ``str`` enum, so it compares
    equal to its value: ``NodeState.SUCCEEDED == "succeeded"``.

    ``pending`` waits for its dependencies, ``scheduled`` is ready and waits for its
    release (a limit, a pause), ``queued`` is published, ``running`` started on a
    worker, ``retrying`` waits for its next attempt, ``awaiting`` is an external node
    waiting for its signal; ``succeeded``, ``failed``, ``skipped`` and ``cancelled``
    are terminal.
    """

    PENDING = "pending"
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    AWAITING = "awaiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        """Whether the node is finished for good (until a ``retry`` reopens it)."""
        return self in TERMINAL_NODE_STATES


TERMINAL_NODE_STATES = frozenset(
    {NodeState.SUCCEEDED, NodeState.FAILED, NodeState.SKIPPED, NodeState.CANCELLED}
)


class FlowState(str, Enum):
    """The state of a flow (SPEC section 4); a ``str`` enum like :class:`NodeState`.

    A flow is ``running`` (or ``paused``) until every node is terminal; it then ends
    ``succeeded``, ``failed`` or ``cancelled``.
    """

    RUNNING = "running"
    PAUSED = "paused"
    #: stored, waiting for a place in its concurrency group (SPEC section 12)
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        """Whether the flow has ended (``wait()`` returns)."""
        return self in (FlowState.SUCCEEDED, FlowState.FAILED, FlowState.CANCELLED)
