"""The registry: keys, identity formats, codec, Lua scripts and the store, which is the
only code that talks to Redis (see :mod:`celery_flows.registry.store`)."""

from .store import Store

__all__ = ["Store"]
