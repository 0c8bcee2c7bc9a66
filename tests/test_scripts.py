"""Each flow script carries only the engine definitions it uses (registry/scripts.py
engine_for): every engine function or value its code names must be defined in it, or
Redis refuses it at run time as a global, on whatever path first reaches it."""

from __future__ import annotations

import re

from celery_flows.registry.scripts import (
    LUA_DIR,
    REPLAY_CLAIMED,
    engine_text,
    script_texts,
)

_DEFINED = re.compile(
    r"^local[ \t]+(?:function[ \t]+([A-Za-z_]\w*)|([A-Za-z_][\w \t,]*?)[ \t]*=)", re.M)


def _definitions(text: str) -> set[str]:
    out = set()
    for m in _DEFINED.finditer(text):
        names = [m.group(1)] if m.group(1) else m.group(2).split(",")
        out |= {n.strip() for n in names}
    return out


def _code(text: str) -> str:
    text = re.sub(r"--\[\[.*?\]\]", "", text, flags=re.S)
    return "\n".join(line.split("--")[0] for line in text.splitlines())


def test_every_engine_name_a_script_uses_is_defined_in_it() -> None:
    engine_names = _definitions(engine_text())
    assert {"flush", "claim_entries", "scan_more", "evaluate"} <= engine_names
    # the request wrapper's branch for a replayed completion (lua/_request.lua) runs in
    # complete.lua only: REPLAY_CLAIMED is false in every other script
    replay = (LUA_DIR / "_request.lua").read_text().split("if REPLAY_CLAIMED then")[1]
    replay = replay.split("if not REPLAY_ENTRIES then")[0]
    for name, text in script_texts().items():
        code = text if name in REPLAY_CLAIMED else text.replace(replay, "")
        used = set(re.findall(r"[A-Za-z_]\w*", _code(code))) & engine_names
        missing = used - _definitions(text)
        assert not missing, f"{name}.lua uses {sorted(missing)} without their engine part"


def test_scripts_carry_only_the_definitions_they_reach() -> None:
    """engine_for picks single definitions, not whole engine parts: a start carries
    the record cache but none of the settling, scanning or claiming a completion
    needs."""
    texts = script_texts()
    whole = len(texts["complete"])
    assert len(texts["start"]) < whole / 2 and len(texts["published"]) < whole / 2
    for name in ("settle_all", "scan_step", "claim_entries", "expand_map"):
        assert f"local function {name}(" in texts["complete"], name
        assert f"local function {name}(" not in texts["start"], name
    for name in ("load", "save", "flush", "with_defaults"):
        assert f"local function {name}(" in texts["start"], name
    # the engine's comments stay in lua/engine/, out of what Redis compiles
    assert "engine/cache.lua: the write-back cache" not in texts["complete"]
