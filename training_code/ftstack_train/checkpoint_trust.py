"""What keeps a checkpoint folder from running code when it is loaded.

torch.distributed.checkpoint (DCP) stores its ``.metadata`` with ``pickle`` and loads every
non-tensor value (the optimizer's hyperparameters, the trainer state) with
``torch.load(weights_only=False)``: a crafted checkpoint would run arbitrary code in the training
job. Three things stand between a checkpoint folder and that code:

- each node's part marker lists the SHA-256 of every file it covers, and every file is checked
  against it before anything is read (``checkpoint.py``): the files loaded are the ones the
  marker vouches for;
- ``.metadata`` is first read with an unpickler that resolves only DCP's own metadata classes
  and a few plain torch values (``check_metadata``), so a payload is refused before DCP's own
  ``pickle.load`` ever sees the file;
- non-tensor values are loaded with ``torch.load(weights_only=True)`` (``NoPickleLoadPlanner``),
  which refuses arbitrary objects.

The digest alone proves integrity, not authorship: someone able to write the job's checkpoint
folder could compute digests of their own files. The two restricted readers close that gap.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import io
import pathlib
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.planner import ReadItem

from .errors import ConfigError


_PLAIN = {
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # a lookup of torch.layout by name
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class UntrustedCheckpoint(ConfigError):
    """A checkpoint folder that ftstack did not write, or whose files changed since; the message
    says which file and why. A ConfigError, so that the job shows the message, not a traceback,
    when a loaded checkpoint is refused."""


def _allowed(module: str, name: str) -> object | None:
    """The object that ``module.name`` may resolve to in DCP metadata, or None. Allowed: DCP's
    own dataclasses and enums (whatever the torch version names them), torch.Size, dtypes and
    memory formats, the layout lookup torch registers for pickling, and paths."""
    if (module, name) in _PLAIN:
        return _PLAIN[module, name]
    if module == "torch":
        value = getattr(torch, name, None)
        return value if value is torch.Size or isinstance(value, (torch.dtype, torch.memory_format)) else None
    if module.startswith("torch.distributed.checkpoint."):
        value = getattr(__import__(module, fromlist=[name]), name, None)
        if isinstance(value, type) and (dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)):
            return value
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        value = _allowed(module, name)
        if value is None:
            raise UntrustedCheckpoint(f"refers to {module}.{name}, which DCP metadata never holds")
        return value


def check_metadata(path: Path, listed: set[str]) -> None:
    """Raises UntrustedCheckpoint when DCP's ``.metadata`` at ``path`` is not plain DCP
    metadata, or points at a file that is not among ``listed`` (the marker's). Nothing but the
    allowed classes is ever resolved, so a payload cannot run."""
    try:
        with path.open("rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except UntrustedCheckpoint as exc:
        raise UntrustedCheckpoint(f"{path.name} {exc}") from None
    except Exception as exc:  # any malformed pickle: the folder is not ours, whatever the cause
        raise UntrustedCheckpoint(f"{path.name} is not DCP metadata ({type(exc).__name__}: {exc})") from None
    if type(metadata).__name__ != "Metadata":
        raise UntrustedCheckpoint(f"{path.name} holds a {type(metadata).__name__}, not DCP metadata")
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        if getattr(info, "relative_path", None) not in listed:
            raise UntrustedCheckpoint(f"{path.name} points at {getattr(info, 'relative_path', info)!r}, which no marker lists")


class NoPickleLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor values are read with
    ``weights_only=True``: plain values (numbers, strings, tuples) load, objects are refused."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's message is a paragraph; the line naming the refused global is the news.
            detail = next((line for line in str(exc).splitlines() if "GLOBAL" in line), "not a plain value")
            raise UntrustedCheckpoint(f"{read_item.dest_index.fqn} holds an object that is not a plain value ({detail})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
