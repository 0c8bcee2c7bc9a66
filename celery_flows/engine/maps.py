"""Maps (SPEC section 12): splitting the list a map expands over into its items, and
collecting the items' results as the map's own.

Lua cannot read a result serialised with the app's serializer, so the split happens
here: each element is serialised on its own (the result serializer, as the list it
came from), staged in the flow's args hash under a fresh token, and the expansion
that names the token is applied in the same step as the completion of the node the
map expands over (complete.lua, code 7 then ARGV[14]), or by the dispatcher that claims
a map that became ready another way (lua/expand.lua). Staged elements nobody names
are never read, and go with the flow's keys.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from .. import faults
from ..config import FlowsConfig
from ..registry import Store
from ..registry.codec import Codec

__all__ = ["expansion", "expansions"]


def expansion(store: Store, codec: Codec, config: FlowsConfig, fid: str, map_id: str,
              value: Any, max_length: int) -> Any:
    """How map ``map_id`` expands over ``value``: ``[k, token, flows_max_nodes]`` with
    the k elements staged, or the error text that fails the map."""
    if not isinstance(value, (list, tuple)):
        return (f"TypeError: map {map_id!r} expands over a list or tuple; its input was "
                f"{type(value).__name__}")
    if len(value) > max_length:
        return (f"MapTooLong: map {map_id!r} got {len(value)} items, more than its "
                f"max_length={max_length}; raise max_length or split the input")
    try:
        blobs = [codec.dump_result(item) for item in value]
    except Exception as exc:
        return f"EncodeError: an item of map {map_id!r} cannot be serialised: {exc}"
    token = uuid.uuid4().hex[:12]
    store.stage_items(fid, token, blobs)
    faults.point("map-staged")
    # the flow's size is checked against flows_max_nodes where it is known (expand_map)
    return [len(blobs), token, config.max_nodes]


def expansions(store: Store, codec: Codec, config: FlowsConfig, fid: str, value: Any,
               lengths: dict[str, int]) -> str:
    """complete.lua's ARGV[14]: the expansion of every map over one node's result."""
    return json.dumps({mid: expansion(store, codec, config, fid, mid, value, int(n))
                       for mid, n in lengths.items()})
