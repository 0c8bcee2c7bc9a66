"""The engine of one Celery app: its collaborators, built once and lazily (an app's
configuration may change after ``Flows(app)`` until the extension is first used), and
the lookup the signal receivers and the worker step use to find them from an app."""

from __future__ import annotations

import weakref
from functools import cached_property
from typing import Any

from ..config import FlowsConfig
from ..registry import Store
from ..registry.codec import Codec
from .changes import Changes
from .dispatch import Dispatcher
from .groups import Groups
from .limits import Limits
from .outcomes import Outcomes
from .submit import Submitter

__all__ = ["Engine", "attach", "engine_of"]


class Engine:
    """Configuration, codec, store, limits, dispatcher, outcomes, submitter, changes and
    concurrency groups of one app, wired together."""

    def __init__(self, app: Any) -> None:
        self.app = app

    @cached_property
    def config(self) -> FlowsConfig:
        return FlowsConfig.from_app(self.app)

    @cached_property
    def codec(self) -> Codec:
        return Codec(self.app)

    @cached_property
    def store(self) -> Store:
        return Store(self.config, self.codec)

    @cached_property
    def limits(self) -> Limits:
        return Limits(self.store, self.config)

    @cached_property
    def dispatcher(self) -> Dispatcher:
        dispatcher = Dispatcher(self.app, self.store, self.codec, self.limits)
        dispatcher.on_waiting = lambda fid: self.groups.on_waiting(fid)
        return dispatcher

    @cached_property
    def groups(self) -> Groups:
        return Groups(self.store, self.config, self.dispatcher.release,
                      lambda fid: self.changes.cancel(fid))

    @cached_property
    def outcomes(self) -> Outcomes:
        return Outcomes(self.app, self.config, self.store, self.codec, self.dispatcher,
                        self.limits)

    @cached_property
    def submitter(self) -> Submitter:
        return Submitter(self.outcomes)

    @cached_property
    def changes(self) -> Changes:
        return Changes(self.outcomes)

    def close(self) -> None:
        """Close the registry's connections (they reopen on next use)."""
        store = self.__dict__.get("store")
        if store is not None:
            store.close()


_ENGINES: weakref.WeakKeyDictionary[Any, Engine] = weakref.WeakKeyDictionary()


def attach(app: Any) -> Engine:
    """The engine of ``app``; one per app (a second attach is refused)."""
    if app in _ENGINES:
        raise RuntimeError(f"app {app.main!r} already has celery-flows attached")
    engine = _ENGINES[app] = Engine(app)
    return engine


def engine_of(app: Any) -> Engine | None:
    """The engine of an app with celery-flows attached, else None."""
    try:
        return _ENGINES.get(app)
    except TypeError:  # not weak-referenceable: not a Celery app
        return None
