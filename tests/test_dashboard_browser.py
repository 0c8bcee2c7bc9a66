"""The dashboard in a real browser: Python playwright driving Debian's chromium
(``/usr/bin/chromium``; ``.ci/run`` installs it when missing), with every request
that is not to the dashboard aborted, so the page must work offline. Real worker,
real redis-server, the real served WSGI app."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_flows import Flow, FlowState
from celery_flows.testing import wait_until
from tests.conftest import ImportApp, RedisDB, WorkerFactory
from tests.helpers import FLOWS, ROOT
from tests.test_dashboard import TOKEN, Served

CHROMIUM = os.environ.get("FLOWS_TEST_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _offline_page(browser: Any, served: Served) -> tuple[Any, list[str], list[str]]:
    """A page that reaches the dashboard only, recording console errors and what it
    tried to fetch elsewhere."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    elsewhere: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def route(r: Any) -> None:
        if r.request.url.startswith(served.url + "/"):
            r.continue_()
        else:
            elsewhere.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    return page, errors, elsewhere


def _diamond(proj: Any, fid: str, key: str) -> Flow:
    f = Flow("browsed", id=fid)
    a = f.add(proj.wait_for_key.si(key), id="hold")
    b = f.add(proj.ident.si(1), id="left", after=[a])
    c = f.add(proj.ident.si(2), id="right", after=[a])
    f.add(proj.collect.s(), id="join", after=[b, c])
    return f


def _until(page: Any, script: str, timeout: float = 20.0) -> None:
    """Wait until ``script`` is true in the page. Evaluated over the DevTools protocol:
    playwright's wait_for_function compiles its predicate in the page, which the
    dashboard's CSP (no unsafe-eval) refuses, as it should."""
    wait_until(lambda: page.evaluate(script), timeout=timeout)


def _state_of(page: Any, node: str) -> str:
    cls = page.get_attribute(f'g.node[data-node="{node}"]', "class") or ""
    return next((c[len("state-"):] for c in cls.split() if c.startswith("state-")), "")


def test_the_page_lists_draws_updates_live_and_cancels_offline(
    import_app: ImportApp, worker_factory: WorkerFactory, redis_db: RedisDB,
    monkeypatch: pytest.MonkeyPatch, browser: Any,
) -> None:
    monkeypatch.setenv("FLOWS_TEST_DASHBOARD_TOKEN", TOKEN)
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS)
    served = Served(proj.app)
    try:
        live = proj.flows.submit(_diamond(proj, "b-live", "b-go"))
        wait_until(lambda: live.node_states()["hold"] == "running", timeout=20)
        page, errors, elsewhere = _offline_page(browser, served)

        page.goto(served.url + "/")
        page.wait_for_selector('tr.flow-row[data-flow="b-live"]', timeout=10000)
        assert "running" in page.inner_text('tr.flow-row[data-flow="b-live"]')

        page.click('a[href="/flows/b-live"]')
        _until(page, "document.querySelectorAll('g.node').length === 4")
        drawn = {page.get_attribute(f"g.node >> nth={i}", "data-node") for i in range(4)}
        assert drawn == {"hold", "left", "right", "join"}
        edges = {(e.get_attribute("data-from"), e.get_attribute("data-to"))
                 for e in page.query_selector_all("path.edge")}
        assert edges == {("hold", "left"), ("hold", "right"), ("left", "join"),
                         ("right", "join")}
        assert _state_of(page, "hold") == "running"
        fill = "getComputedStyle(document.querySelector('g.node[data-node=\"hold\"] rect')).fill"
        running_fill = page.evaluate(fill)
        page.evaluate("window.notReloaded = true")
        _until(page, "document.getElementById('live').textContent === '(live)'")
        redis_db.client.set("b-go", 1)
        page.wait_for_selector('g.node[data-node="join"].state-succeeded', timeout=20000)
        assert _state_of(page, "hold") == "succeeded"
        # drawn in the colours of dashboard.css: running blue, succeeded green
        assert (running_fill, page.evaluate(fill)) == ("rgb(144, 202, 249)",
                                                       "rgb(165, 214, 167)")
        assert page.evaluate("window.notReloaded") is True  # colours changed in place
        page.wait_for_selector("#flow-state.state-succeeded")
        page.click('g.node[data-node="join"]')
        assert "tests.proj.collect" in page.inner_text("#panel")
        page.wait_for_selector("#timeline-svg rect")

        # cancel from the page, with the token
        held = proj.flows.submit(_diamond(proj, "b-cancel", "b-never"))
        page.goto(served.url + "/flows/b-cancel")
        _until(page, "document.querySelectorAll('g.node').length === 4")
        page.fill("#token", TOKEN)
        page.click("#action-cancel")
        page.wait_for_selector("#action-result:has-text('cancelled')")
        assert held.state() == FlowState.CANCELLED
        page.wait_for_selector("#flow-state.state-cancelled")
        assert errors == []
        assert elsewhere == []
    finally:
        served.stop()


def test_screenshot_of_the_example_project_flow(
    worker_factory: WorkerFactory, redis_db: RedisDB, monkeypatch: pytest.MonkeyPatch,
    browser: Any,
) -> None:
    """The README's picture (docs/dashboard.png): the example project's report flow."""
    import importlib
    import sys

    monkeypatch.setenv("EXAMPLE_REDIS_URL", redis_db.celery_url)
    for name in [m for m in sys.modules if m.startswith("example_project")]:
        monkeypatch.delitem(sys.modules, name)
    example = importlib.import_module("example_project.proj")
    worker_factory("example_project.proj", extra_args=FLOWS, queues=("celery", "io"),
                   env={"EXAMPLE_REDIS_URL": redis_db.celery_url})
    handle = example.flows.submit(example.build_flow("acme", "2026-12-01"))
    assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    served = Served(example.app)
    try:
        page, errors, _ = _offline_page(browser, served)
        page.goto(f"{served.url}/flows/{handle.id}")
        count = len(handle.node_states())
        _until(page, f"document.querySelectorAll('g.node').length === {count}")
        page.wait_for_selector("#timeline-svg rect")
        page.click('g.node[data-node="aggregate"]')
        out = Path(ROOT) / "docs" / "dashboard.png"
        page.screenshot(path=str(out), full_page=True)
        assert out.stat().st_size > 10000 and errors == []
    finally:
        served.stop()
        example.app.close()


def test_big_graphs_collapse_sub_flows_and_cap_the_drawing_with_a_banner(
    import_app: ImportApp, redis_db: RedisDB, browser: Any,
) -> None:
    proj = import_app("tests.proj")  # no worker: the flows just wait
    f = Flow("big", id="b-big")
    start = f.add(proj.add.si(0, 0), id="start")
    for s in range(3):
        sub = Flow("part")
        prev = sub.add(proj.add.si(s, 0), id="n0")
        for i in range(1, 80):
            prev = sub.add(proj.add.si(s, i), id=f"n{i}", after=[prev])
        f.add(sub, id=f"part{s}", after=[start])
    proj.flows.submit(f)
    wide = Flow("wide", id="b-wide")
    for i in range(1600):
        wide.add(proj.add.si(i, i), id=f"w{i}")
    proj.flows.submit(wide)
    served = Served(proj.app)
    try:
        page, errors, elsewhere = _offline_page(browser, served)
        page.goto(served.url + "/flows/b-big")
        # 241 nodes: each sub-flow is one dashed box, its edges drawn once
        _until(page, "document.querySelectorAll('g.node').length === 4")
        assert "collapsed" in page.inner_text("#banner")
        boxes = {page.get_attribute(f"g.node >> nth={i}", "data-node") for i in range(4)}
        assert boxes == {"start", "part0:*", "part1:*", "part2:*"}
        assert len(page.query_selector_all("path.edge")) == 3
        page.click('g.node[data-node="part1:*"]')  # expand one
        _until(page, "document.querySelectorAll('g.node').length === 83")
        assert len(page.query_selector_all("path.edge")) == 2 + 1 + 79

        page.goto(served.url + "/flows/b-wide")
        _until(page, "document.querySelectorAll('g.node').length === 1500", timeout=60)
        assert "showing the first 1500 of 1600" in page.inner_text("#banner")
        assert errors == [] and elsewhere == []
    finally:
        served.stop()


def test_a_map_draws_its_items_under_it_collapsed_past_a_few_dozen(
    import_app: ImportApp, worker_factory: WorkerFactory, browser: Any,
) -> None:
    proj = import_app("tests.proj")
    worker_factory("tests.proj", extra_args=FLOWS, concurrency=2)
    handles = {}
    for n in (3, 50):
        f = Flow("mapped", id=f"map-{n}")
        src = f.add(proj.numbers.s(n), id="src")
        each = f.map(proj.double.s(), over=src, id="each")
        f.add(proj.tsum.s(), id="total", after=[each])
        handles[n] = proj.flows.submit(f)
    for handle in handles.values():
        assert handle.wait(timeout=60) == FlowState.SUCCEEDED
    served = Served(proj.app)
    try:
        page, errors, elsewhere = _offline_page(browser, served)
        page.goto(served.url + "/flows/map-3")
        # a few items: each one drawn, under its map
        _until(page, "document.querySelectorAll('g.node').length === 6")
        assert _state_of(page, "each[2]") == "succeeded"
        page.goto(served.url + "/flows/map-50")
        # 50 items: one dashed box, which a click expands
        _until(page, "document.querySelectorAll('g.node').length === 4")
        assert "collapsed" in page.inner_text("#banner")
        page.click('g.node[data-node="each[*]"]')
        _until(page, "document.querySelectorAll('g.node').length === 53")
        assert errors == [] and elsewhere == []
    finally:
        served.stop()
