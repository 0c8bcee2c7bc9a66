"""Serialising user data the way the app does (never pickle unless the app itself is
configured for it): arguments, signature options and contexts with its
``task_serializer``, results with its ``result_serializer``.

Stored blobs carry their content type, so a stored flow stays readable after the app's
serializer setting changes. The Lua transitions only ever copy these blobs: Lua's cjson
would change the data (14 significant digits, ``[]`` read back as ``{}``, key order).
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any, NamedTuple

from kombu.serialization import dumps, loads, prepare_accept_content


class Call(NamedTuple):
    """A node's stored call: what its signature carried."""

    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]  # Celery options sent with the message as given (headers, ...)


class Codec:
    def __init__(self, app: Any) -> None:
        conf = app.conf
        self.task_serializer: str = conf.task_serializer
        self.result_serializer: str = conf.result_serializer
        self.accept = prepare_accept_content(conf.accept_content or ["json"])
        self.result_accept = prepare_accept_content(
            conf.result_accept_content or conf.accept_content or ["json"]
        )

    @staticmethod
    def _pack(serializer: str, value: Any) -> bytes:
        content_type, encoding, data = dumps(value, serializer=serializer)
        raw: bytes = data.encode(encoding or "utf-8") if isinstance(data, str) else data
        return f"{content_type};{encoding}\n".encode() + raw

    @staticmethod
    def _unpack(blob: bytes, accept: set[str]) -> Any:
        head, _, data = blob.partition(b"\n")
        content_type, _, encoding = head.decode().partition(";")
        return loads(data, content_type, encoding, accept=accept)

    @cached_property
    def empty_call(self) -> bytes:
        """The blob of a call without arguments or options: a submit stores none for
        it (a missing args entry loads as this call), saving a blob per node."""
        return self._pack(self.task_serializer, [[], {}])

    def dump_call(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                  options: dict[str, Any] | None = None) -> bytes:
        if not args and not kwargs and not options:
            return self.empty_call
        call: list[Any] = [list(args), kwargs]
        if options:
            call.append(options)
        return self._pack(self.task_serializer, call)

    def load_node_call(self, blob: bytes | None) -> Call:
        if not blob:
            return Call([], {}, {})
        call = self._unpack(blob, self.accept)
        options = call[2] if len(call) > 2 else {}
        return Call(list(call[0]), dict(call[1]), dict(options))


    def dump_context(self, context: dict[str, Any]) -> bytes:
        return self._pack(self.task_serializer, context)

    def load_context(self, blob: bytes | str | None) -> dict[str, Any]:
        if not blob:
            return {}
        if isinstance(blob, str):
            blob = blob.encode()
        if blob.startswith(b"{"):
            # a flow stored before contexts were blobs: plain JSON
            return dict(json.loads(blob))
        return dict(self._unpack(blob, self.accept))

    def dump_result(self, value: Any) -> bytes:
        return self._pack(self.result_serializer, value)

    def load_result(self, blob: bytes | None) -> Any:
        if blob is None:
            return None
        return self._unpack(blob, self.result_accept)
