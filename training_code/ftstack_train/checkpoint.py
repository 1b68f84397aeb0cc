"""Sharded checkpoints that survive interruption, on one node or many.

Each checkpoint is a folder ``step-00000123`` holding torch.distributed.checkpoint files (model,
optimizer, trainer state) and one RNG file per rank. On SageMaker every node writes only its own
ranks' files to its own ``/opt/ml/checkpoints``; SageMaker uploads each node's folder to the same
S3 prefix while training runs, mirrors local deletions there, and at the start of the next
attempt downloads the merged prefix to every node. So no node ever sees a whole checkpoint
during the attempt that writes it.

Hence one *part marker* per node, ``ftstack-part-00001.json``, written by the node's first process
once every rank has finished, listing that node's files with their sizes and SHA-256 digests
(hashed by the node's processes in parallel, each a share of the files) and the number of parts.
A checkpoint is complete where all of its parts' markers and listed files are present: on one
node's disk after an S3 download, or across the nodes' disks during the attempt. Decisions are
taken collectively from every node's view and come out the same on every rank:

- resume from the newest checkpoint that is complete on *every* node's disk (each rank reads
  shards of other ranks when the world size changes, and the ``.metadata`` file always), once
  every node has checked every file against its digest and the metadata against what DCP writes
  (``checkpoint_trust``); a folder that fails is ignored with a warning and never loaded;
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
from torch.distributed.checkpoint.api import CheckpointException
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .files import sha256_file, write_atomic
from .checkpoint_trust import NoPickleLoadPlanner, UntrustedCheckpoint, check_metadata

PART_PREFIX = "ftstack-part-"
_PART = re.compile(rf"^{PART_PREFIX}(\d{{5}})\.json$")
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_FILE_NAME = re.compile(r"^(?!\.\.?$)[\w.-]+$")  # a plain name in the folder: no separator, not . or ..
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
METADATA = ".metadata"  # DCP's metadata file (pickled by torch)

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
    return f"rng-rank{rank:05d}.safetensors"


def _read_marker(marker: Path) -> dict[str, Any] | None:
    """The marker's content when it is well formed, else None (a corrupt marker never counts)."""
    try:
        doc = json.loads(marker.read_text())
        files, parts, world = doc["files"], doc["parts"], doc["world_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (isinstance(files, dict) and isinstance(parts, int) and parts >= 1 and isinstance(world, int)):
        return None
    if not all(_valid_entry(name, entry) for name, entry in files.items()):
        return None
    return doc


def _valid_entry(name: Any, entry: Any) -> bool:
    return (
        isinstance(name, str) and bool(_FILE_NAME.match(name)) and not name.startswith(PART_PREFIX)
        and isinstance(entry, dict) and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str) and bool(_SHA256.match(entry["sha256"]))
    )


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
        if node < n_parts and all(_has_size(path / name, entry["size"]) for name, entry in doc["files"].items())
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


def _place(is_local_main: bool) -> tuple[list[int], int, int, int]:
    """Collective: (every node's first rank, this rank's node, its index on the node, the node's
    process count). torchrun numbers the ranks of a node consecutively."""
    mains = [r for r, main in enumerate(_gather(is_local_main)) if main]
    rank = dist.get_rank()
    node = max(i for i, r in enumerate(mains) if r <= rank)
    end = mains[node + 1] if node + 1 < len(mains) else dist.get_world_size()
    return mains, node, rank - mains[node], end - mains[node]


def _warn(line: str) -> None:
    if dist.get_rank() == 0:
        print(f"warning: {line}", flush=True)


def agree_on_resume(folder: Path, is_local_main: bool) -> Path | None:
    """Collective: the checkpoint to resume from, the same on every rank (None: start afresh).
    The newest complete one whose files every node has checked against their digests; any
    other step folder that is unmarked or fails the check gets a warning and is left alone."""
    _, _, local, size = _place(is_local_main)
    view = local_view(folder)
    gathered = _gather((view, [p.name for p in _step_dirs(folder) if p.name not in view]))
    for name in sorted(set().union(*(unmarked for _, unmarked in gathered))):
        _warn(f"{folder / name} has no valid ftstack marker (a save that was cut off, or a folder ftstack did not "
              "write): ignored")
    views = [view for view, _ in gathered]
    while (name := resume_choice(views)) is not None:
        problems = [p for p in _gather(verify_files(folder / name, local, size)) if p]
        if not problems:
            return folder / name
        _warn(f"{folder / name} was not written by ftstack or changed since ({problems[0]}): ignored, never loaded")
        views = [{k: v for k, v in view.items() if k != name} for view in views]
    return None


def verify_files(path: Path, share: int = 0, shares: int = 1) -> str | None:
    """What is wrong with the complete checkpoint at ``path`` on this disk, or None. Checks this
    process's share of the files (every ``shares``-th from ``share``) against the markers'
    SHA-256, and with share 0 that no file is unlisted and that the metadata is DCP's."""
    listed: dict[str, str] = {}
    for marker in sorted(path.glob(f"{PART_PREFIX}*.json")):
        for name, entry in (_read_marker(marker) or {"files": {}})["files"].items():
            if listed.setdefault(name, entry["sha256"]) != entry["sha256"]:
                return f"two markers list {name} with different digests"
    names = sorted(listed)
    if share == 0:
        unlisted = sorted(set(_data_files(path)) - set(listed))
        if unlisted or METADATA not in listed:
            return f"{unlisted[0]} is listed in no marker" if unlisted else f"no marker lists {METADATA}"
    for name in names[share::shares]:
        if sha256_file(path / name) != listed[name]:
            return f"{name} does not match its marker's SHA-256"
    if share == 0:
        try:
            check_metadata(path / METADATA, set(listed))
        except UntrustedCheckpoint as exc:
            return str(exc)
    return None


def _data_files(path: Path) -> list[str]:
    """The checkpoint's files on this disk, markers (and their temporary files) aside."""
    return sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(PART_PREFIX))


def save_checkpoint(
    folder: Path, step: int, model, optimizer, trainer_state: dict[str, Any], keep: int, is_local_main: bool, prune: bool = True,
) -> Path:
    """Saves a checkpoint collectively (every rank calls it) and marks each node's part complete,
    with the SHA-256 of its files; with ``prune``, then deletes what ``doomed`` names on every
    node."""
    path = step_dir(folder, step)
    mains, node, local, size = _place(is_local_main)
    if is_local_main and path.exists():
        # Left by an earlier attempt that did not finish it (a complete one would have been
        # resumed from): clear it, so that no stale file or marker mixes into the new one.
        shutil.rmtree(path)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # The trainer state goes in as one JSON string: DCP flattens nested containers into keys, and
    # a list that grows (the eval history) would then not match on load.
    dcp.save({"model": model_sd, "optim": optim_sd, "trainer": json.dumps(trainer_state)}, checkpoint_id=str(path))
    save_file(_rng_state(), str(path / _rng_file(dist.get_rank())))
    dist.barrier()  # every rank's files are on its node's disk
    # The node's processes hash its files in parallel, each a share (see the README for the cost).
    names = _data_files(path)
    digests = _gather({name: sha256_file(path / name) for name in names[local::size]})
    if is_local_main:
        sums = {k: v for part in digests[mains[node]:mains[node] + size] for k, v in part.items()}
        files = {name: {"size": (path / name).stat().st_size, "sha256": sums[name]} for name in names}
        doc = {"step": step, "world_size": dist.get_world_size(), "parts": len(mains), "node": node, "files": files}
        write_atomic(part_marker(path, node), json.dumps(doc))
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
    """Loads a checkpoint that ``agree_on_resume`` chose (so verified) into the (already sharded)
    model and optimizer; returns the trainer state. Works with a different world size (DCP
    reshards); the RNG state is restored only when the world size is unchanged."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "trainer": ""}
    try:
        dcp.load(state, checkpoint_id=str(path), planner=NoPickleLoadPlanner())
    except CheckpointException as exc:  # DCP gathers every rank's failure into one exception
        refused = [e for e, _ in exc.failures.values() if isinstance(e, UntrustedCheckpoint)]
        if refused:
            raise UntrustedCheckpoint(
                f"{path}: {refused[0]}: ftstack did not write this checkpoint; delete the folder from the job's "
                "checkpoints (the execution's checkpoint prefix in S3) and start again"
            ) from None
        raise
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / _rng_file(dist.get_rank())
    saved_world = _read_marker(part_marker(path, 0))["world_size"]
    if saved_world == dist.get_world_size() and rng.is_file():
        _set_rng_state(load_file(str(rng)))
    return json.loads(state["trainer"])


def _rng_state() -> dict[str, torch.Tensor]:
    # Plain byte tensors, stored as safetensors: loading them never unpickles anything.
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
