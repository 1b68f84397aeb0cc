"""Sharded checkpoints that survive interruption.

Each checkpoint is a folder ``step-00000123`` holding torch.distributed.checkpoint files (model,
optimizer, trainer state), one RNG file per rank, and, written last by rank 0 once every rank has
finished, ``ftstack-complete.json`` listing all files. Only a folder whose marker exists and whose
listed files all exist counts: a run killed mid-save resumes from the one before. On SageMaker
every node writes its own ranks' files to its local checkpoint folder and SageMaker merges them
in S3, so the marker lists the files of all nodes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

MARKER = "ftstack-complete.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _step_dirs(folder: Path) -> list[Path]:
    """The checkpoint folders under ``folder``, oldest first (names sort by step)."""
    return sorted(p for p in folder.iterdir() if _STEP_DIR.match(p.name) and p.is_dir())


def step_dir(folder: Path, step: int) -> Path:
    return folder / f"step-{step:08d}"


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def is_complete(path: Path) -> bool:
    """True when the marker exists and every file it lists is present."""
    try:
        listed = json.loads((path / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        return False
    return all((path / name).is_file() for name in listed)


def latest_complete(folder: Path) -> Path | None:
    """The newest complete checkpoint under ``folder``, or None."""
    if not folder.is_dir():
        return None
    for path in reversed(_step_dirs(folder)):
        if is_complete(path):
            return path
    return None


def save_checkpoint(folder: Path, step: int, model, optimizer, trainer_state: dict[str, Any], keep: int, is_local_main: bool) -> Path:
    """Saves a checkpoint collectively (every rank calls it), marks it complete, then deletes
    older checkpoints beyond ``keep`` and unfinished ones."""
    path = step_dir(folder, step)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # The trainer state goes in as one JSON string: DCP flattens nested containers into keys, and
    # a list that grows (the eval history) would then not match on load.
    dcp.save({"model": model_sd, "optim": optim_sd, "trainer": json.dumps(trainer_state)}, checkpoint_id=str(path))
    rank = dist.get_rank()
    torch.save(_rng_state(), path / _rng_file(rank))
    dist.barrier()
    if rank == 0:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
        files = {info.relative_path for info in metadata.storage_data.values()}
        files |= {".metadata"} | {_rng_file(r) for r in range(dist.get_world_size())}
        _write_atomic(path / MARKER, json.dumps({"step": step, "world_size": dist.get_world_size(), "files": sorted(files)}))
    # Rank 0 alone sees every marker; it decides what goes and each node deletes its own copies.
    doomed = [_doomed(folder, keep, newest=path) if rank == 0 else None]
    dist.broadcast_object_list(doomed, src=0)
    if is_local_main:
        for name in doomed[0]:
            shutil.rmtree(folder / name, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model, optimizer) -> dict[str, Any]:
    """Loads a checkpoint into the (already sharded) model and optimizer; returns the trainer
    state. Works with a different world size (DCP reshards); the RNG state is restored only when
    the world size is unchanged."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "trainer": ""}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / _rng_file(dist.get_rank())
    saved_world = json.loads((path / MARKER).read_text())["world_size"]
    if saved_world == dist.get_world_size() and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads(state["trainer"])


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _doomed(folder: Path, keep: int, newest: Path) -> list[str]:
    """Checkpoint folders to delete: complete ones beyond the newest ``keep``, and unfinished ones
    older than ``newest`` (they can never complete any more)."""
    steps = _step_dirs(folder)
    complete = [p for p in steps if is_complete(p)]
    kept = set(complete[-keep:])
    return [p.name for p in steps if p not in kept and (p in complete or p.name < newest.name)]
