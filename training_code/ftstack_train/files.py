"""Writing a file so that a reader never sees it half-written. Standard library only."""

from __future__ import annotations

import os
from pathlib import Path


def partial_name(path: Path) -> Path:
    """Where ``write_atomic`` writes ``path`` before moving it into place (a folder's owner may
    find it there after a kill)."""
    return path.with_name(path.name + ".tmp")


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path``: a reader sees the old file or the whole new one."""
    tmp = partial_name(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
