"""The registry: the only code of celery-flows that talks to Redis.

:class:`Store` puts together the connection (connection.py: client, scripts, Redis
time), the transitions (transitions.py and creation.py: one method per Lua script),
the services' global keys (services.py), the read side (reads.py) and the event
streams (events.py). Keys are built in keys.py, identity formats in ids.py, script
return codes map to exceptions in codes.py, and every reply is typed in replies.py.
"""

from __future__ import annotations

from .concurrency import ConcurrencyStore
from .creation import Creation
from .events import Events
from .reads import Reads
from .services import Services
from .transitions import Transitions

__all__ = ["Store"]


class Store(Transitions, Creation, Services, Reads, Events, ConcurrencyStore):
    """The registry of one app (``flows.store``): built from its configuration and
    codec, connected lazily, safe to share between threads (redis-py pools)."""
