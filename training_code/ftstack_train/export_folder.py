"""Which files in a model folder an export of ftstack wrote, and may therefore replace.

The export leaves a marker in the model folder that names every entry it wrote. The next export
replaces exactly those entries and nothing else: a folder that holds anything else (a user's base
model, notes, another tool's files) is refused, with a message, before anything is written. On
SageMaker ``/opt/ml/model`` starts empty, so the check always passes there; it matters for
``ftstack local``, whose output folder is the user's.

Standard library only: ``ftstack local`` checks its output folder with it before it imports torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import ConfigError
from .files import partial_name, write_atomic

STAGING = ".ftstack-export"
"""The export's own staging folder inside the model folder (same file system: moves are renames)."""

STAGING_MARKER = ".ftstack-staging"
"""Written into the staging folder first thing, so that a leftover one is known to be ftstack's."""

EXPORT_MARKER = ".ftstack-export.json"
"""In the model folder: ``{"files": [...]}``, the entries the last export wrote."""

_MARKER_TMP = partial_name(Path(EXPORT_MARKER)).name


def _names(marker: Path) -> list[str]:
    """The entries an earlier export recorded; a marker that is not ours is an error, since the
    names in it decide what gets deleted."""
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{marker}: not an ftstack export marker ({exc}); move the folder's files away and delete it") from None
    names = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{marker}: not an ftstack export marker (no list of file names); move the folder's files away and delete it")
    for name in names:
        # A path in the marker could point outside the folder; only plain names of our own are accepted.
        if name in (".", "..", STAGING, EXPORT_MARKER, _MARKER_TMP) or Path(name).name != name or "\\" in name:
            raise ConfigError(f"{marker}: names {name!r}, which no export writes; move the folder's files away and delete the marker")
    return names


def _staging_problem(staging: Path) -> str | None:
    """Why a leftover staging folder cannot be cleared, or None when it is ours (or empty)."""
    if not staging.exists() and not staging.is_symlink():
        return None
    if staging.is_symlink() or not staging.is_dir():
        return f"{staging} is not a folder ftstack made"
    if (staging / STAGING_MARKER).is_file() or not any(staging.iterdir()):
        return None
    return f"{staging} holds files ftstack did not write"


def check_model_dir(model_dir: Path) -> list[str]:
    """Returns the entries of an earlier export in ``model_dir``, which the next export replaces.
    Raises ConfigError when the folder holds anything no export of ftstack wrote; writes nothing."""
    if not model_dir.exists() and not model_dir.is_symlink():
        return []
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: not a folder; the export needs a folder of its own there: move the file away")
    marker = model_dir / EXPORT_MARKER
    previous = _names(marker) if marker.is_file() else []
    ours = {*previous, STAGING, EXPORT_MARKER, _MARKER_TMP}
    foreign = sorted(p.name for p in model_dir.iterdir() if p.name not in ours)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ConfigError(
            f"{model_dir}: holds {foreign[0]!r}{more}, which no ftstack export wrote; the export replaces only its own earlier "
            f"export: move these files out of the folder (or export to another folder)")
    problem = _staging_problem(model_dir / STAGING)
    if problem:
        raise ConfigError(f"{problem}; move it out of {model_dir}")
    return previous


def claim_staging(staging: Path) -> None:
    """Clears a leftover staging folder of ours and makes a new, marked one."""
    problem = _staging_problem(staging)
    if problem:
        raise ConfigError(f"{problem}; move it away")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    (staging / STAGING_MARKER).write_bytes(b"")


def _write_marker(model_dir: Path, names: list[str]) -> None:
    write_atomic(model_dir / EXPORT_MARKER, json.dumps({"files": sorted(names)}, indent=2) + "\n")


def replace_export(model_dir: Path, staging: Path, previous: list[str]) -> None:
    """Moves the staged export into ``model_dir`` in place of the earlier export ``previous``.

    The marker is widened to old and new names before anything is deleted, and narrowed to the new
    names at the end: after a crash at any point, every entry in the folder is one the marker names,
    so the next export still recognises all of it as its own."""
    (staging / STAGING_MARKER).unlink(missing_ok=True)
    new = sorted(p.name for p in staging.iterdir())
    _write_marker(model_dir, [*{*previous, *new}])
    for name in previous:
        path = model_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for name in new:
        target = model_dir / name
        if target.exists() or target.is_symlink():
            # Appeared while the export ran: not ours, and a rename would overwrite it.
            raise FileExistsError(f"{target} appeared during the export; it was left as it is")
        (staging / name).rename(target)
    _write_marker(model_dir, new)
    staging.rmdir()
