"""The runnable examples of the README run end to end, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_the_crawl_example_maps_over_the_pages_it_finds() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "example_project" / "run.py"), "crawl"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "page[7]" in out.stdout and "words[7]" in out.stdout
    assert "8 pages, 606 words" in out.stdout


def test_the_imports_example_runs_one_import_per_tenant_at_a_time() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "example_project" / "run.py"),
                          "imports"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "import acme 2024-05-02: waiting, waits for a place of tenant 'acme' (number 1 " \
           "in line)" in out.stdout
    assert "import globex 2024-05-01: running, admitted" in out.stdout
    assert "acme's imports ran one at a time, in the order submitted" in out.stdout


def test_the_fair_example_finishes_a_small_flow_beside_a_backlog() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "example_project" / "run.py"), "fair"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "lookup succeeded" in out.stdout and "backfill cancelled" in out.stdout
