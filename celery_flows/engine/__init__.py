"""The engine: what happens between a definition and its tasks. Submitting, outcomes,
dispatch of ready nodes, limits and caps, changes at run time, and eager mode, all on
top of the registry (:mod:`celery_flows.registry`)."""

from .runtime import Engine, attach, engine_of

__all__ = ["Engine", "attach", "engine_of"]
