"""celery-flows: durable, inspectable workflows (DAGs and trees) of Celery tasks."""

from ._version import __version__
from .core import Flows
from .define.flow import Flow, Node
from .define.states import FlowState, NodeState
from .engine.context import current_flow
from .errors import (
    FlowDefinitionError,
    FlowNotFoundError,
    FlowsConfigError,
    FlowsError,
    FlowStateError,
    FlowTimeoutError,
    FlowVersionError,
)
from .observe.handle import FlowHandle

__all__ = [
    "__version__",
    # setup
    "Flows",
    # defining flows
    "Flow",
    "Node",
    # running flows
    "FlowHandle",
    "FlowState",
    "NodeState",
    "current_flow",
    # errors
    "FlowsError",
    "FlowsConfigError",
    "FlowDefinitionError",
    "FlowStateError",
    "FlowNotFoundError",
    "FlowTimeoutError",
    "FlowVersionError",
]
