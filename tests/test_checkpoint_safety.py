"""Issue 11 item 1: no input reaches pickle. A crafted ``step-NNNNNNNN`` folder whose pickles
carry a payload (here: one that creates a folder when unpickled) must never run it. The folder is
ignored with a warning and the run resumes from the real checkpoint, or starts afresh; and
``save_folder`` cannot point the job at a folder outside its own checkpoint folder (the attack
used ``save_folder=../input/data/model`` to resume from a crafted base model upload)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from ftstack_train import launch
from ftstack_train.checkpoint import PART_PREFIX, agree_on_resume, load_checkpoint, part_marker, save_checkpoint, step_dir
from ftstack_train.checkpoint_trust import UntrustedCheckpoint, check_metadata
from ftstack_train.config import TrainConfig
from ftstack_train.contract import ROOT_ENV, SageMakerPaths
from ftstack_train.errors import EXIT_USER_ERROR, ConfigError
from ftstack_train.job import checkpoint_dir
from test_checkpoint import sharded, take_a_step

CRAFTED = 99999999


class Payload:
    """Unpickling this runs ``os.mkdir(target)``: the folder's existence proves the code ran."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.fixture
def trained(process_group, tiny_mpt, tmp_path):
    """A model and optimizer after one step, and a real checkpoint of them at step 2."""
    model, optimizer = sharded(tiny_mpt)
    take_a_step(model, optimizer, seed=0)
    folder = tmp_path / "checkpoints"
    real = save_checkpoint(folder, 2, model, optimizer, {"step": 2, "history": []}, keep=2, is_local_main=True)
    return model, optimizer, folder, real


def forge_marker(path: Path) -> None:
    """A part marker as ftstack writes it, digests included: what an attacker who knows the
    format would write next to their own files."""
    files = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(PART_PREFIX)}
    doc = {"step": int(path.name[5:]), "world_size": 1, "parts": 1, "node": 0, "files": files}
    part_marker(path, 0).write_text(json.dumps(doc))


def crafted_folder(folder: Path, target: Path, digests: bool) -> Path:
    """The attack's ``step-99999999``: pickles with the payload in every file that today's code
    unpickled (DCP's .metadata, the RNG file), and a marker listing them."""
    path = step_dir(folder, CRAFTED)
    path.mkdir(parents=True)
    for name in (".metadata", "rng-rank00000.pt", "rng-rank00000.safetensors"):
        (path / name).write_bytes(pickle.dumps(Payload(target)))
    (path / "__0_0.distcp").write_bytes(b"\0" * 64)
    if digests:
        forge_marker(path)
    else:  # the marker format before digests (sizes only), which is all today's code checked
        files = {p.name: p.stat().st_size for p in path.iterdir()}
        part_marker(path, 0).write_text(json.dumps({"step": CRAFTED, "world_size": 1, "parts": 1, "node": 0, "files": files}))
    return path


def resume(folder: Path, model, optimizer) -> Path | None:
    """What the trainer does at the start of a run."""
    path = agree_on_resume(folder, is_local_main=True)
    if path is not None:
        load_checkpoint(path, model, optimizer)
    return path


@pytest.mark.parametrize("digests", [False, True], ids=["marker-of-sizes", "forged-digests"])
def test_a_crafted_checkpoint_is_ignored_and_its_payload_never_runs(trained, tmp_path, capsys, digests):
    model, optimizer, folder, real = trained
    target = tmp_path / "payload-ran"
    crafted_folder(folder, target, digests)

    assert resume(folder, model, optimizer) == real
    assert not target.exists(), "the crafted checkpoint's payload ran"
    out = capsys.readouterr().out
    assert f"warning: {step_dir(folder, CRAFTED)}" in out and "ignored" in out
    assert step_dir(folder, CRAFTED).is_dir(), "a folder ftstack did not write is never deleted on resume"


def test_a_run_with_only_a_crafted_checkpoint_starts_afresh(process_group, tiny_mpt, tmp_path, capsys):
    model, optimizer = sharded(tiny_mpt)
    target = tmp_path / "payload-ran"
    crafted_folder(tmp_path / "checkpoints", target, digests=True)
    assert resume(tmp_path / "checkpoints", model, optimizer) is None
    assert not target.exists() and "ignored, never loaded" in capsys.readouterr().out


def test_a_payload_among_dcp_values_is_refused_without_running(trained, tmp_path):
    """Genuine DCP files, digests that match, and a pickled object where the trainer state goes:
    DCP loads such values with ``torch.load(weights_only=False)``; ours refuses them."""
    model, optimizer, folder, _ = trained
    target = tmp_path / "payload-ran"
    path = step_dir(folder, 3)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "trainer": Payload(target)}, checkpoint_id=str(path))
    forge_marker(path)
    assert agree_on_resume(folder, is_local_main=True) == path  # nothing to tell it apart before loading
    with pytest.raises(UntrustedCheckpoint, match=r"step-00000003: trainer holds an object that is not a plain value "
                       r"\(.*GLOBAL posix.mkdir.*\): ftstack did not write this checkpoint; delete"):
        load_checkpoint(path, model, optimizer)
    assert not target.exists(), "the payload in a DCP value ran"


def test_a_changed_file_fails_its_digest_and_the_run_resumes_from_the_one_before(trained, capsys):
    model, optimizer, folder, real = trained
    newer = save_checkpoint(folder, 4, model, optimizer, {"step": 4, "history": []}, keep=2, is_local_main=True)
    shard = next(newer.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1  # same size: the marker's sizes alone would not see it
    shard.write_bytes(bytes(data))
    assert agree_on_resume(folder, is_local_main=True) == real
    assert f"{shard.name} does not match its marker's SHA-256" in capsys.readouterr().out


def test_an_unlisted_file_makes_the_folder_untrusted(trained, capsys):
    _, _, folder, real = trained
    (real / "__9_0.distcp").write_bytes(b"x")
    assert agree_on_resume(folder, is_local_main=True) is None
    assert "__9_0.distcp is listed in no marker" in capsys.readouterr().out


def test_check_metadata_accepts_dcp_metadata_and_refuses_anything_else(trained, tmp_path):
    _, _, _, real = trained
    listed = {p.name for p in real.iterdir()}
    check_metadata(real / ".metadata", listed)
    with pytest.raises(UntrustedCheckpoint, match="points at '__0_0.distcp', which no marker lists"):
        check_metadata(real / ".metadata", listed - {"__0_0.distcp"})
    bad = tmp_path / ".metadata"
    for value, message in ((Payload(tmp_path / "ran"), "refers to posix.mkdir"), ({"a": 1}, "holds a dict"),
                           (b"\x80\x04junk", "not DCP metadata")):
        bad.write_bytes(pickle.dumps(value) if not isinstance(value, bytes) else value)
        with pytest.raises(UntrustedCheckpoint, match=message):
            check_metadata(bad, listed)
    assert not (tmp_path / "ran").exists()


def test_the_rng_state_is_stored_without_pickle(trained):
    from safetensors.torch import load_file

    _, _, _, real = trained
    rng = real / "rng-rank00000.safetensors"
    assert not list(real.glob("*.pt")) and rng.read_bytes()[8:9] == b"{"  # safetensors: a JSON header, no pickle
    state = load_file(str(rng))
    assert set(state) == {"cpu"} and state["cpu"].dtype == torch.uint8  # restoring it is test_checkpoint's round trip


# --- save_folder stays inside the job's checkpoint folder --------------------------------------

@pytest.mark.parametrize("save_folder", ["/opt/ml/input/data/model", "../input/data/model", "run/../../input", "./..", "a/../.."])
def test_save_folder_cannot_leave_the_checkpoint_folder(tmp_path, save_folder):
    with pytest.raises(ConfigError, match=r"^save_folder: .* leads outside the job's checkpoint folder .*relative path"):
        checkpoint_dir(TrainConfig(save_folder=save_folder), SageMakerPaths(tmp_path))


def test_save_folder_cannot_leave_through_a_link(tmp_path):
    paths = SageMakerPaths(tmp_path)
    paths.checkpoints.mkdir(parents=True)
    (paths.checkpoints / "link").symlink_to(tmp_path / "input")
    with pytest.raises(ConfigError, match="save_folder"):
        checkpoint_dir(TrainConfig(save_folder="link/run"), paths)


@pytest.mark.parametrize("save_folder", ["run-1", "runs/run-1", "./run-1"])
def test_save_folder_inside_the_checkpoint_folder_is_fine(tmp_path, save_folder):
    paths = SageMakerPaths(tmp_path)
    assert checkpoint_dir(TrainConfig(save_folder=save_folder), paths) == paths.checkpoints / save_folder


def test_the_launcher_refuses_the_attack_s_save_folder(tmp_path, monkeypatch, capsys):
    """Before: a warning, and the job resumed from the model channel's crafted folder."""
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    monkeypatch.setattr(launch, "supervise", lambda args: pytest.fail("torchrun would have started"))
    paths = SageMakerPaths(tmp_path)
    paths.hyperparameters.parent.mkdir(parents=True)
    paths.hyperparameters.write_text(json.dumps({"save_folder": '"../input/data/model"'}))
    assert launch.main(["train"]) == EXIT_USER_ERROR
    assert "save_folder: '../input/data/model' leads outside" in paths.failure_file.read_text()
    assert "Traceback" not in capsys.readouterr().err
