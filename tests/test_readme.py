"""The README documents what the code does: its reference sections are generated from the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reference_sections_are_current():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (ROOT / "README.md").read_text()
    assert module.render(text) == text, "run: make docs"


def test_readme_shows_the_two_set_up_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
