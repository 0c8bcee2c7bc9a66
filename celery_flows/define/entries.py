"""What a flow definition holds before it is compiled: its entries, and the shape the
compiler and ``from_canvas`` rely on (so that neither imports the builder)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .records import Ref

__all__ = ["Builder", "Definition", "Entry"]


@dataclass
class Entry:
    """One node of a definition, as :class:`~celery_flows.Flow` collected it."""

    id: str
    kind: str  # task | subflow | external | sensor | map
    body: Any  # Signature | Flow (a Definition) | None
    after: list[str]
    children: list[str] | None = None
    opts: dict[str, Any] = field(default_factory=dict)


class Definition(Protocol):
    """A flow definition as the compiler reads it (:class:`~celery_flows.Flow`)."""

    name: str
    id: str | None
    context: dict[str, Any]
    rate_limit: str | None
    webhook: str | None
    webhook_events: tuple[str, ...]
    fail_fast: bool
    _entries: dict[str, Entry]


class Builder(Protocol):
    """What ``from_canvas`` adds nodes to (:class:`~celery_flows.Flow`)."""

    name: str

    def __len__(self) -> int: ...

    def _add_shaped(self, sig: Any, *, after: Sequence[str], input: Ref,
                    id: str | None = None) -> Any: ...
