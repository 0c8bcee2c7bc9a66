""":class:`FlowHandle`: a user's view of one stored flow."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import redis

from .errors import FlowTimeoutError
from .models import FlowState, NodeState

if TYPE_CHECKING:
    from .core import Flows

__all__ = ["FlowHandle"]


class FlowHandle:
    def __init__(self, flows: Flows, flow_id: str) -> None:
        self.flows = flows
        self.id = flow_id

    def __repr__(self) -> str:
        return f"<FlowHandle {self.id!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlowHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def state(self) -> FlowState:
        """The flow's state (raises FlowNotFoundError once it expired)."""
        meta = self.flows.store.require_meta(self.id)
        return FlowState(meta["state"])

    def wait(self, timeout: float | None = None, interval: float = 1.0) -> FlowState:
        """Block until the flow is terminal and return its state; never raises for
        failed or cancelled flows. FlowTimeoutError on timeout.

        Wakes on the flow's "done" notification; ``interval`` bounds how long it trusts
        the subscription before reading the state again.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        store = self.flows.store
        pubsub = store.client.pubsub(ignore_subscribe_messages=True)
        subscribed = False
        try:
            while True:
                if not subscribed:
                    subscribed = _subscribe(pubsub, store.keys.channel(self.id))
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
                if subscribed:
                    try:
                        pubsub.get_message(timeout=max(wait_for, 0.001))
                    except redis.RedisError:
                        # the node serving the channel went away (a failover): poll
                        # until a subscription holds again
                        subscribed = False
                        pubsub.reset()
                else:
                    time.sleep(max(wait_for, 0.001))
        finally:
            pubsub.close()

    def results(self) -> dict[str, Any]:
        """{node id: result} of the succeeded nodes."""
        self.flows.store.require_meta(self.id)
        nodes = self.flows.store.nodes(self.id)
        raw = self.flows.store.results(self.id)
        codec = self.flows.codec
        return {
            nid: codec.load_result(raw[nid])
            for nid, rec in nodes.items()
            if rec["state"] == NodeState.SUCCEEDED.value and nid in raw
        }

    def node_states(self) -> dict[str, NodeState]:
        """{node id: node state}."""
        self.flows.store.require_meta(self.id)
        nodes = self.flows.store.nodes(self.id)
        return {nid: NodeState(rec["state"]) for nid, rec in nodes.items()}

    def inspect(self) -> dict[str, Any]:
        """The document ``celery flows inspect --json`` prints."""
        from .inspect import describe

        return describe(self.flows, self.id)


def _subscribe(pubsub: Any, channel: str) -> bool:
    """Subscribe, or report that the notification is unavailable for now (the state is
    polled meanwhile): on Redis Cluster a failover leaves the channel's node unreachable
    until the client's slot map is refreshed."""
    try:
        pubsub.subscribe(channel)
    except redis.RedisError:
        pubsub.reset()
        return False
    return True
