"""Sharded checkpoints that survive interruption, on one node or many.

Each checkpoint is a folder ``step-00000123`` holding torch.distributed.checkpoint files (model,
optimizer, trainer state) and one RNG file per rank. On SageMaker every node writes only its own
ranks' files to its own ``/opt/ml/checkpoints``; SageMaker uploads each node's folder to the same
S3 prefix while training runs, mirrors local deletions there, and at the start of the next
attempt downloads the merged prefix to every node. So no node ever sees a whole checkpoint
during the attempt that writes it.

Hence one *part marker* per node, ``ftstack-part-00001.json``, written by the node's first process
once every rank has finished, listing that node's files with their sizes and the number of parts.
A checkpoint is complete where all of its parts' markers and listed files are present: on one
node's disk after an S3 download, or across the nodes' disks during the attempt. Decisions are
taken collectively from every node's view and come out the same on every rank:

- resume from the newest checkpoint that is complete on *every* node's disk (each rank reads
  shards of other ranks when the world size changes, and the ``.metadata`` file always);
- after a periodic save, delete complete checkpoints beyond the newest ``keep`` and unfinished
  ones older than the new one. The newest complete checkpoint is never deleted, and a stop save
  (SIGTERM) deletes nothing: its own upload may not finish, so the previous ones must stay.
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

PART_PREFIX = "ftstack-part-"
_PART = re.compile(rf"^{PART_PREFIX}(\d{{5}})\.json$")
_STEP_DIR = re.compile(r"^step-(\d{8})$")

View = dict[str, tuple[int, list[int]]]
"""One node's view of its checkpoint folder: for each step folder, (the number of parts the
checkpoint has, the parts complete on this node's disk). Folders with no valid part are absent."""


def _step_dirs(folder: Path) -> list[Path]:
    """The checkpoint folders under ``folder``, oldest first (names sort by step)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _STEP_DIR.match(p.name) and p.is_dir())


def step_dir(folder: Path, step: int) -> Path:
    """The folder of the checkpoint at ``step`` (zero-padded, so names sort by step)."""
    return folder / f"step-{step:08d}"


def part_marker(path: Path, node: int) -> Path:
    """The marker of node ``node``'s part of the checkpoint at ``path``."""
    return path / f"{PART_PREFIX}{node:05d}.json"


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def _read_marker(marker: Path) -> dict[str, Any] | None:
    """The marker's content when it is well formed, else None (a corrupt marker never counts)."""
    try:
        doc = json.loads(marker.read_text())
        files, parts, world = doc["files"], doc["parts"], doc["world_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (isinstance(files, dict) and isinstance(parts, int) and parts >= 1 and isinstance(world, int)):
        return None
    if not all(isinstance(k, str) and "/" not in k and isinstance(v, int) for k, v in files.items()):
        return None
    return doc


def parts_present(path: Path) -> tuple[int, list[int]] | None:
    """(parts the checkpoint has, the parts whose marker and listed files, at the listed sizes,
    are all on this disk), or None when no valid marker is there or the markers disagree."""
    docs = {}
    for marker in sorted(path.glob(f"{PART_PREFIX}*.json")) if path.is_dir() else ():
        match = _PART.match(marker.name)
        doc = _read_marker(marker) if match else None
        if doc is not None:
            docs[int(match.group(1))] = doc
    if not docs or len({(d["parts"], d["world_size"]) for d in docs.values()}) != 1:
        return None
    n_parts = next(iter(docs.values()))["parts"]
    present = [
        node for node, doc in sorted(docs.items())
        if node < n_parts and all(_has_size(path / name, size) for name, size in doc["files"].items())
    ]
    return n_parts, present


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.is_file() and path.stat().st_size == size
    except OSError:
        return False


def is_complete(path: Path) -> bool:
    """True when every part of the checkpoint is on this disk (after an S3 download, or on a
    single node)."""
    found = parts_present(path)
    return found is not None and found[1] == list(range(found[0]))


def latest_complete(folder: Path) -> Path | None:
    """The newest checkpoint complete on this disk, or None."""
    for path in reversed(_step_dirs(folder)):
        if is_complete(path):
            return path
    return None


def local_view(folder: Path) -> View:
    """This node's view of ``folder``, to be combined with the other nodes' views."""
    view = {}
    for path in _step_dirs(folder):
        found = parts_present(path)
        if found is not None:
            view[path.name] = found
    return view


def resume_choice(views: list[View]) -> str | None:
    """The step folder every node can load: the newest complete on every node's own disk."""
    names = set.intersection(*(set(v) for v in views)) if views else set()
    loadable = [n for n in names if all(v[n][1] == list(range(v[n][0])) for v in views)]
    return max(loadable, default=None)


def complete_somewhere(views: list[View]) -> list[str]:
    """Step folders whose parts are all present, counting every node's disk (during an attempt
    each node holds only its own part), oldest first."""
    done = []
    for name in sorted(set().union(*views)):
        counts = {v[name][0] for v in views if name in v}
        parts = set().union(*(v[name][1] for v in views if name in v))
        if len(counts) == 1 and parts == set(range(counts.pop())):
            done.append(name)
    return done


def doomed(views: list[View], existing: list[str], keep: int, newest: str) -> list[str]:
    """Step folders to delete after the save of ``newest``: complete ones beyond the newest
    ``keep`` (at least 1, so the newest complete one always stays), and unfinished ones older
    than ``newest`` (no process writes them any more). ``existing`` is every step folder any
    node holds."""
    complete = complete_somewhere(views)
    kept = set(complete[-max(keep, 1):])
    return [n for n in sorted(existing) if n not in kept and (n in complete or n < newest)]


def _gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree_on_resume(folder: Path) -> Path | None:
    """Collective: the checkpoint to resume from, the same on every rank (None: start afresh)."""
    name = resume_choice(_gather(local_view(folder)))
    return folder / name if name else None


def save_checkpoint(
    folder: Path, step: int, model, optimizer, trainer_state: dict[str, Any], keep: int, is_local_main: bool, prune: bool = True,
) -> Path:
    """Saves a checkpoint collectively (every rank calls it) and marks each node's part complete;
    with ``prune``, then deletes what ``doomed`` names on every node."""
    path = step_dir(folder, step)
    mains = [r for r, main in enumerate(_gather(is_local_main)) if main]
    if is_local_main and path.exists():
        # Left by an earlier attempt that did not finish it (a complete one would have been
        # resumed from): clear it, so that no stale file or marker mixes into the new one.
        shutil.rmtree(path)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # The trainer state goes in as one JSON string: DCP flattens nested containers into keys, and
    # a list that grows (the eval history) would then not match on load.
    dcp.save({"model": model_sd, "optim": optim_sd, "trainer": json.dumps(trainer_state)}, checkpoint_id=str(path))
    rank = dist.get_rank()
    torch.save(_rng_state(), path / _rng_file(rank))
    dist.barrier()  # every rank's files are on its node's disk
    if is_local_main:
        node = max(i for i, r in enumerate(mains) if r <= rank)
        files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(PART_PREFIX)}
        doc = {"step": step, "world_size": dist.get_world_size(), "parts": len(mains), "node": node, "files": files}
        _write_atomic(part_marker(path, node), json.dumps(doc))
    # Every node's view, gathered after its marker is written (so this is the barrier too).
    gathered = _gather((local_view(folder), [p.name for p in _step_dirs(folder)]))
    if prune:
        existing = sorted(set().union(*(names for _, names in gathered)))
        names = doomed([view for view, _ in gathered], existing, keep, path.name)
        if is_local_main:
            for name in names:
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
    saved_world = _read_marker(part_marker(path, 0))["world_size"]
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
