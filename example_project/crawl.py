"""A crawl that maps over the pages it finds: ``python3 example_project/run.py crawl``.

::

    list-pages ──► page[0] page[1] ... page[k-1] ──► words[0] ... words[k-1] ──► index
                   (map "page", at most 3 at once)   (map "words", over "page")

``list_pages`` returns the paths of a (simulated) site; the map ``page`` fetches each
one, three at a time (``max_active=3``) on the ``io`` queue; the map ``words`` counts the
words of each fetched page (a map over a map: its input is the list ``page``
collected); ``index`` receives the list of counts, in the order of the pages. How many
pages there are is known only when ``list_pages`` has run.

``run.py crawl`` runs it as it runs the report: a private redis-server and a ``--flows``
worker of ``example_project.proj`` (whose app includes this module), then the flow's
tree as ``celery -A example_project.proj flows inspect FLOW_ID`` prints it, and the
index.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from celery_flows import Flow
from example_project.proj import flows


@flows.task
def list_pages(site: str, n: int = 8) -> list[str]:
    """The pages a crawl of ``site`` finds (simulated: n paths)."""
    return [f"/{site}/page-{i}" for i in range(n)]


@flows.task(queue="io")
def fetch_page(path: str) -> dict[str, Any]:
    """Fetch one page (simulated: a short wait and words derived from the path)."""
    time.sleep(0.05)
    seed = int(hashlib.sha256(path.encode()).hexdigest()[:6], 16)
    return {"path": path, "text": " ".join(["word"] * (20 + seed % 80))}


@flows.task
def count_words(page: dict[str, Any]) -> dict[str, Any]:
    return {"path": page["path"], "words": len(page["text"].split())}


@flows.task
def index(counts: list[dict[str, Any]]) -> str:
    total = sum(c["words"] for c in counts)
    lines = [f"{c['path']:<24} {c['words']:>4} words" for c in counts]
    return "\n".join([*lines, f"{len(counts)} pages, {total} words"])


def build_crawl(site: str, pages: int = 8) -> Flow:
    f = Flow("crawl", context={"site": site})
    found = f.add(list_pages.s(site, pages), id="list-pages")
    fetched = f.map(fetch_page.s(), over=found, id="page", max_active=3)
    counted = f.map(count_words.s(), over=fetched, id="words")
    f.add(index.s(), id="index", after=[counted])
    return f
