"""Serialising arguments and results the way the app does (never pickle unless the app
itself is configured for it). Stored blobs carry their content type, so a stored flow
stays readable after the app's serializer setting changes."""

from __future__ import annotations

from typing import Any

from kombu.serialization import dumps, loads, prepare_accept_content


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
        if isinstance(data, str):
            data = data.encode(encoding or "utf-8")
        return f"{content_type};{encoding}\n".encode() + data

    @staticmethod
    def _unpack(blob: bytes, accept: set[str]) -> Any:
        head, _, data = blob.partition(b"\n")
        content_type, _, encoding = head.decode().partition(";")
        return loads(data, content_type, encoding, accept=accept)

    def dump_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        return self._pack(self.task_serializer, [list(args), kwargs])

    def load_call(self, blob: bytes | None) -> tuple[list[Any], dict[str, Any]]:
        if not blob:
            return [], {}
        args, kwargs = self._unpack(blob, self.accept)
        return list(args), dict(kwargs)

    def dump_result(self, value: Any) -> bytes:
        return self._pack(self.result_serializer, value)

    def load_result(self, blob: bytes | None) -> Any:
        if blob is None:
            return None
        return self._unpack(blob, self.result_accept)
