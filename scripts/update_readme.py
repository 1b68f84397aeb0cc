"""Regenerates the configuration reference in README.md from the config's own field docs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ftstack_train.config import reference_table

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = re.compile(r"(<!-- config-reference:[^\n]*-->\n).*?(<!-- /config-reference -->)", re.DOTALL)


def render(text: str) -> str:
    """README text with the reference section replaced by the current table."""
    if not SECTION.search(text):
        sys.exit("README.md has no config-reference markers")
    return SECTION.sub(lambda m: m.group(1) + reference_table() + "\n" + m.group(2), text)


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
