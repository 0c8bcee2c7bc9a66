"""celery-flows: durable, inspectable workflows (DAGs and trees) of Celery tasks."""

from .context import current_flow
from .core import Flows
from .errors import (
    FlowDefinitionError,
    FlowNotFoundError,
    FlowsConfigError,
    FlowsError,
    FlowStateError,
    FlowTimeoutError,
    FlowVersionError,
)
from .flow import Flow, Node
from .handle import FlowHandle
from .models import FlowState, NodeState

__version__ = "0.1.0"

__all__ = [
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
