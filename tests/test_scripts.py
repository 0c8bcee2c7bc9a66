"""Each flow script carries only the engine parts it uses (registry/scripts.py
engine_for): every engine function or value its code names must be defined in it, or
Redis refuses it at run time as a global, on whatever path first reaches it."""

from __future__ import annotations

import re

from celery_flows.registry.scripts import (
    ENGINE_PARTS,
    LUA_DIR,
    REPLAY_CLAIMED,
    engine_text,
    script_texts,
)

_DEFINED = re.compile(r"^local\s+(?:function\s+([A-Za-z_]\w*)|([A-Za-z_][\w\s,]*?)\s*=)", re.M)


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


def test_scripts_that_need_less_carry_less() -> None:
    texts = script_texts()
    whole = len(texts["complete"])
    assert len(texts["start"]) < whole / 2 and len(texts["published"]) < whole / 2
    # a completion claims what it released: it carries the whole engine
    for part in ENGINE_PARTS:
        if part != "piece":
            head = (LUA_DIR / "engine" / f"{part}.lua").read_text().splitlines()[0]
            assert head in texts["complete"], part
