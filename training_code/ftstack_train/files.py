"""Writing a file so that a reader never sees it half-written, and hashing one that may be
gigabytes. Standard library only."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 8 << 20


def partial_name(path: Path) -> Path:
    """Where ``write_atomic`` writes ``path`` before moving it into place (a folder's owner may
    find it there after a kill)."""
    return path.with_name(path.name + ".tmp")


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path``: a reader sees the old file or the whole new one."""
    tmp = partial_name(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    """The file's SHA-256 as hex, read in chunks (checkpoint shards and model weights are gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
