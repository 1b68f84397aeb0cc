"""The model manifest: the SHA-256 and size of every file an export wrote, in
``model-manifest.json`` beside them. The manifest's own SHA-256 goes into ``final-metrics.json``,
which the workflow registers with the model package; whoever later uses the model (deployment,
``ftstack verify``, ``ftstack generate``) checks the files against the manifest and the manifest
against that digest. A model overwritten after registration, even by a role allowed to write
there, no longer matches.

``final-metrics.json`` itself is outside the manifest (it carries the manifest's digest); its
figures are registered with the package too. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from .contract import FINAL_METRICS_FILE, MANIFEST_FILE
from .errors import ModelLoadError
from .files import sha256_file

UNLISTED = (MANIFEST_FILE, FINAL_METRICS_FILE)
"""Files of an export that the manifest does not list."""
_OWN_PREFIX = ".ftstack"
"""ftstack's own bookkeeping (the export marker, the staging marker): not part of the model."""


class ModelIntegrityError(ModelLoadError):
    """The model's files are not the ones its manifest lists, or the manifest is not the registered one."""


def model_files(folder: Path) -> list[str]:
    """The names of the model's files in ``folder``: every entry but the unlisted ones and ftstack's markers."""
    return sorted(p.name for p in folder.iterdir() if p.name not in UNLISTED and not p.name.startswith(_OWN_PREFIX))


def manifest_bytes(entries: dict[str, dict[str, int | str]]) -> bytes:
    """The manifest's canonical text: sorted keys, no spaces, so that its digest is reproducible."""
    return json.dumps({"algorithm": "sha256", "files": entries}, sort_keys=True, separators=(",", ":")).encode()


def write_manifest(folder: Path) -> str:
    """Hashes every model file in ``folder`` (all regular files: a folder or link there is an
    error), writes the manifest and returns its SHA-256."""
    entries = {}
    for name in model_files(folder):
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise ModelIntegrityError(f"{path}: not a regular file; an export writes files only")
        entries[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    text = manifest_bytes(entries)
    (folder / MANIFEST_FILE).write_bytes(text)
    return hashlib.sha256(text).hexdigest()


def read_manifest(text: bytes, where: str, expected_sha256: str | None) -> dict[str, dict]:
    """The manifest's entries, checked against ``expected_sha256`` (the registered digest) when given."""
    actual = hashlib.sha256(text).hexdigest()
    if expected_sha256 is not None and actual != expected_sha256.lower():
        raise ModelIntegrityError(f"{where}: SHA-256 {actual} is not the registered {expected_sha256}; the model was "
                                  "changed after it was registered: do not use it, and find out who wrote it")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    entries = doc.get("files") if isinstance(doc, dict) and doc.get("algorithm") == "sha256" else None
    if not isinstance(entries, dict) or not all(_valid_entry(n, e) for n, e in entries.items()):
        raise ModelIntegrityError(f"{where}: not a model manifest written by ftstack")
    return entries


def _valid_entry(name: str, entry: object) -> bool:
    """A plain file name (never a path out of the folder) with a hex SHA-256 and a size."""
    return (Path(name).name == name and name not in (".", "..") and isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64
            and isinstance(entry.get("bytes"), int))


def compare(entries: dict[str, dict], found: Iterable[str], where: str) -> None:
    """Raises unless the folder holds exactly the listed files (an extra file could be loaded in their place)."""
    found = set(found)
    missing, extra = sorted(set(entries) - found), sorted(found - set(entries))
    if missing or extra:
        raise ModelIntegrityError(f"{where}: the files differ from the manifest (missing: {', '.join(missing) or 'none'}; "
                                  f"not listed: {', '.join(extra) or 'none'}); do not use this model")


def verify_model(folder: Path, expected_sha256: str | None = None) -> str:
    """Checks every file of the model in ``folder`` against its manifest, and the manifest against
    ``expected_sha256`` when given; returns the manifest's SHA-256. Raises ModelIntegrityError."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ModelIntegrityError(f"{folder}: no {MANIFEST_FILE}; only a model exported by ftstack can be verified")
    text = path.read_bytes()
    entries = read_manifest(text, str(path), expected_sha256)
    compare(entries, model_files(folder), str(folder))
    for name, entry in entries.items():
        file = folder / name
        if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            raise ModelIntegrityError(f"{file}: its content is not what {MANIFEST_FILE} lists; do not use this model")
    return hashlib.sha256(text).hexdigest()
