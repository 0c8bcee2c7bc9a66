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
