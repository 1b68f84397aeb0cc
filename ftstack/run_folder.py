"""The output folder of ``ftstack local``, and what ftstack may delete or overwrite in it.

ftstack takes a folder only when it is new, empty, or the folder of an earlier ``ftstack local``
run, recognised by a marker file at its top. The marker lists every file ftstack put under
``input/``: laying out a run again removes exactly those, and a file there that the marker does not
list is refused. The exported model follows the same rule with its own marker (see
``ftstack_train.export_folder``). ftstack writes nothing else at the top of the folder than the
marker and ``input/``, ``model/``, ``checkpoints/``, ``output/``; anything else there (a log the
user keeps next to the run) is never touched.

Standard library only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from ftstack_train.errors import ConfigError
from ftstack_train.export_folder import check_model_dir
from ftstack_train.files import partial_name, write_atomic

MARKER = ".ftstack-run.json"
"""At the top of a run folder: ``{"ftstack": "local run", "inputs": [...]}``, the files ftstack put
under ``input/``, as paths relative to the folder."""

_KIND = "local run"
_FIX = "give a new or empty --output folder, or the folder of an earlier ftstack local run"


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both resolved)."""
    return path == folder or folder in path.parents


def check_inputs(output: Path, files: dict[str, Path | None], model: Path | None) -> None:
    """Refuses inputs that lie inside the output folder (laying out the run would replace them, and
    the export could replace a base model), or a base model folder that holds the output folder."""
    root = output.resolve()
    for flag, path in files.items():
        if path is not None and _inside(path.resolve(), root):
            raise ConfigError(f"{flag} {path}: lies inside --output {output}, which ftstack local rewrites; "
                              f"move the file out of {output} or give another --output")
    if model is not None:
        resolved = model.resolve()
        if _inside(resolved, root):
            raise ConfigError(f"--model {model}: lies inside --output {output}, where the run writes its own model; "
                              f"give an --output folder outside {model}, e.g. --output runs/local")
        if _inside(root, resolved):
            raise ConfigError(f"--output {output}: lies inside --model {model}; the run must not write into the base model's "
                              f"folder: give an --output outside it, e.g. --output runs/local")


def _read_marker(marker: Path) -> set[str]:
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{marker}: not an ftstack run marker ({exc}); {_FIX}") from None
    inputs = doc.get("inputs") if isinstance(doc, dict) and doc.get("ftstack") == _KIND else None
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise ConfigError(f"{marker}: not an ftstack run marker; {_FIX}")
    for rel in inputs:
        # The names decide what gets deleted: only paths under input/, without a way out, count.
        parts = PurePosixPath(rel).parts
        if len(parts) < 2 or parts[0] != "input" or ".." in parts or PurePosixPath(rel).is_absolute() or "\\" in rel:
            raise ConfigError(f"{marker}: lists {rel!r}, which ftstack local never writes; {_FIX}")
    return set(inputs)


def _files_under(folder: Path, root: Path) -> list[str]:
    """Every file and link under ``folder`` (links not followed), relative to ``root``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        links = [d for d in dirnames if (here / d).is_symlink()]
        found += [(here / name).relative_to(root).as_posix() for name in (*filenames, *links)]
    return sorted(found)


class RunFolder:
    """An output folder that ``ftstack local`` may use, with the input files it wrote there."""

    def __init__(self, output: Path) -> None:
        """Checks ``output`` and writes nothing: raises ConfigError, naming what is in the way, when
        it is a file, holds files of someone else, or holds unknown files where ftstack writes."""
        self.root = output.resolve()
        self.inputs: set[str] = set()
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--output {output}: is a file; {_FIX}")
        if not self.root.is_dir():
            return
        marker = self.root / MARKER
        if not marker.is_file():
            # A marker's temporary copy alone: the first lay-out was cut off while claiming the folder.
            entries = sorted(p.name for p in self.root.iterdir() if p != partial_name(marker))
            if entries:
                shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
                raise ConfigError(f"--output {output}: holds files ftstack did not write ({shown}); {_FIX}")
            return
        self.inputs = _read_marker(marker)
        foreign = [rel for rel in _files_under(self.root / "input", self.root) if rel not in self.inputs]
        if foreign:
            raise ConfigError(f"--output {output}: {foreign[0]} was not written by ftstack local; move it out of the folder")
        try:
            check_model_dir(self.root / "model")
        except ConfigError as exc:
            raise ConfigError(f"--output {output}: {exc}") from None

    def _save(self) -> None:
        write_atomic(self.root / MARKER, json.dumps({"ftstack": _KIND, "inputs": sorted(self.inputs)}, indent=2) + "\n")

    def clear_inputs(self) -> None:
        """Claims the folder (creates it and its marker) and removes the input files an earlier run
        put there, with the channel folders they leave empty: a channel that exists is read."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._save()
        for rel in sorted(self.inputs):
            path = self.root / rel
            if path.is_symlink() or path.is_file():
                path.unlink()
        data = self.root / "input" / "data"
        for dirpath in sorted((walk[0] for walk in os.walk(data)), reverse=True):  # deepest first
            if not any(Path(dirpath).iterdir()) and Path(dirpath) != data:
                Path(dirpath).rmdir()
        self.inputs = set()
        self._save()

    def claim(self, path: Path) -> Path:
        """Records ``path`` (under ``input/``) in the marker before it is written, so that even an
        interrupted lay-out leaves only files the marker names; returns it, its folder made."""
        self.inputs.add(path.relative_to(self.root).as_posix())
        self._save()
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
