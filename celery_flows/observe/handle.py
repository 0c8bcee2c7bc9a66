""":class:`FlowHandle`: a user's view of one stored flow."""

from __future__ import annotations

import time
from typing import Any

from ..define.states import FlowState, NodeState
from ..errors import FlowTimeoutError
from ..registry import Store
from ..registry.codec import Codec
from .inspect import describe

__all__ = ["FlowHandle"]

#: the terminal flow states, as a "done" notification carries them
_TERMINAL = frozenset(state.value for state in FlowState if state.terminal)


class FlowHandle:
    """A user's view of one stored flow: what ``flows.submit()``, ``flows.get()`` and
    ``flows.add_bulk()`` return. ``id`` is the flow id; every method reads the
    registry afresh. Equal handles name the same flow."""

    def __init__(self, store: Store, codec: Codec, flow_id: str) -> None:
        self.store = store
        self.codec = codec
        self.id = flow_id

    def __repr__(self) -> str:
        return f"<FlowHandle {self.id!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlowHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def state(self) -> FlowState:
        """The flow's state (raises FlowNotFoundError once it expired)."""
        return FlowState(self.store.state_of(self.id))

    def wait(self, timeout: float | None = None, interval: float = 1.0) -> FlowState:
        """Block until the flow is terminal and return its state; never raises for
        failed or cancelled flows. FlowTimeoutError on timeout.

        Wakes on the flow's "done" notification; ``interval`` bounds how long it trusts
        the subscription before reading the state again.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        listener = self.store.listen_done(self.id)
        try:
            while True:
                listener.subscribe()
                state = self.state()
                if state.terminal:
                    return state
                wait_for = interval
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise FlowTimeoutError(
                            f"flow {self.id!r} is still {state.value} after {timeout} s"
                        )
                    wait_for = min(wait_for, remaining)
                if not listener.wait(wait_for):
                    # not subscribed (a failover on Redis Cluster): poll meanwhile
                    time.sleep(max(wait_for, 0.001))
                elif listener.notified in _TERMINAL:
                    # the notification carries the state the flow ended in
                    return FlowState(listener.notified)
        finally:
            listener.close()

    def results(self) -> dict[str, Any]:
        """{node id: result} of the succeeded nodes."""
        nodes, raw = self.store.outcomes(self.id)
        return {
            nid: self.codec.load_result(raw[nid])
            for nid, rec in nodes.items()
            if rec["state"] == NodeState.SUCCEEDED.value and nid in raw
        }

    def node_states(self) -> dict[str, NodeState]:
        """{node id: node state}."""
        self.store.require_meta(self.id)
        nodes = self.store.nodes(self.id)
        return {nid: NodeState(rec["state"]) for nid, rec in nodes.items()}

    def inspect(self) -> dict[str, Any]:
        """The document ``celery flows inspect --json`` prints."""
        return describe(self.store, self.id)

