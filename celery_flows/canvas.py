"""Flow.from_canvas: placeholder until the converter lands."""

from __future__ import annotations

from typing import Any

from .errors import FlowDefinitionError


def flow_from_canvas(flow: Any, canvas: Any) -> Any:
    raise FlowDefinitionError("Flow.from_canvas is not implemented yet")
