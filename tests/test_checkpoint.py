"""Tests for ftstack_train.checkpoint: which folders count as complete, which one a run resumes
from and which ones are deleted (fabricated folders), and a real save/load through
torch.distributed.checkpoint in a one-process gloo group with an FSDP2-sharded tiny MPT."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ftstack_train.checkpoint import (
    MARKER, _doomed, is_complete, latest_complete, load_checkpoint, save_checkpoint, step_dir,
)
from ftstack_train.contract import CHECKPOINT_BASE_MODEL

FILES = (".metadata", "__0_0.distcp", "__1_0.distcp", "rng-rank00000.pt", "rng-rank00001.pt")


def fake_checkpoint(folder: Path, step: int, complete: bool = True, missing: tuple[str, ...] = ()) -> Path:
    """A checkpoint folder as save_checkpoint leaves it: the files, then (when complete) the marker."""
    path = step_dir(folder, step)
    path.mkdir(parents=True)
    for name in FILES:
        if name not in missing:
            (path / name).write_bytes(b"x")
    if complete:
        (path / MARKER).write_text(json.dumps({"step": step, "world_size": 2, "files": sorted(FILES)}))
    return path


# --- what counts as complete -------------------------------------------------------------------

def test_step_dir_is_zero_padded_so_names_sort_by_step(tmp_path):
    assert step_dir(tmp_path, 123) == tmp_path / "step-00000123"
    assert sorted(step_dir(tmp_path, s).name for s in (100, 9, 20)) == [step_dir(tmp_path, s).name for s in (9, 20, 100)]


def test_is_complete_with_marker_and_every_listed_file(tmp_path):
    assert is_complete(fake_checkpoint(tmp_path, 1))


def test_is_complete_false_without_marker(tmp_path):
    assert not is_complete(fake_checkpoint(tmp_path, 1, complete=False))


@pytest.mark.parametrize("missing", [".metadata", "__1_0.distcp", "rng-rank00001.pt"])
def test_is_complete_false_when_a_listed_file_is_missing(tmp_path, missing):
    # e.g. another node's files not yet synced down from S3
    assert not is_complete(fake_checkpoint(tmp_path, 1, missing=(missing,)))


def test_is_complete_false_when_a_listed_file_is_a_folder(tmp_path):
    path = fake_checkpoint(tmp_path, 1, missing=("__1_0.distcp",))
    (path / "__1_0.distcp").mkdir()
    assert not is_complete(path)


def test_is_complete_false_for_a_missing_folder(tmp_path):
    assert not is_complete(tmp_path / "step-00000001")


@pytest.mark.parametrize("marker", [
    "", '{"step": 1, "files": [".meta', "not json", '{"step": 1}',
    "[]", '{"step": 1, "files": null}',  # valid JSON of the wrong shape
])
def test_is_complete_false_for_a_corrupt_marker(tmp_path, marker):
    # A corrupt marker must make the folder incomplete (skipped on resume), never crash the resume.
    path = fake_checkpoint(tmp_path, 1)
    (path / MARKER).write_text(marker)
    assert not is_complete(path)


# --- which checkpoint a run resumes from -------------------------------------------------------

def test_latest_complete_picks_the_newest_complete(tmp_path):
    fake_checkpoint(tmp_path, 4)
    newest = fake_checkpoint(tmp_path, 12)
    fake_checkpoint(tmp_path, 8)
    assert latest_complete(tmp_path) == newest


def test_latest_complete_skips_a_newer_incomplete_one(tmp_path):
    complete = fake_checkpoint(tmp_path, 8)
    fake_checkpoint(tmp_path, 12, complete=False)  # killed mid-save
    fake_checkpoint(tmp_path, 16, missing=("__1_0.distcp",))
    assert latest_complete(tmp_path) == complete


def test_latest_complete_ignores_folders_that_are_not_steps(tmp_path):
    complete = fake_checkpoint(tmp_path, 3)
    (tmp_path / CHECKPOINT_BASE_MODEL).mkdir()
    (tmp_path / CHECKPOINT_BASE_MODEL / MARKER).write_text(json.dumps({"files": []}))
    for name in ("step-99", "step-000000099", "step-0000009x", "xstep-00000099"):
        (tmp_path / name).mkdir()
        (tmp_path / name / MARKER).write_text(json.dumps({"files": []}))
    (tmp_path / "step-00000099").write_text("a file, not a folder")
    assert latest_complete(tmp_path) == complete


def test_latest_complete_none_when_nothing_is_complete(tmp_path):
    fake_checkpoint(tmp_path, 5, complete=False)
    (tmp_path / CHECKPOINT_BASE_MODEL).mkdir()
    assert latest_complete(tmp_path) is None


def test_latest_complete_none_for_an_empty_or_missing_folder(tmp_path):
    assert latest_complete(tmp_path) is None
    assert latest_complete(tmp_path / "nope") is None
    (tmp_path / "file").write_text("")
    assert latest_complete(tmp_path / "file") is None


# --- which checkpoints are deleted after a save ------------------------------------------------

def test_doomed_keeps_the_newest_complete_ones(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    assert sorted(_doomed(tmp_path, keep=2, newest=step_dir(tmp_path, 8))) == ["step-00000002", "step-00000004"]
    assert sorted(_doomed(tmp_path, keep=1, newest=step_dir(tmp_path, 8))) == ["step-00000002", "step-00000004", "step-00000006"]
    assert _doomed(tmp_path, keep=4, newest=step_dir(tmp_path, 8)) == []


def test_doomed_deletes_unfinished_older_ones_but_never_a_newer_one(tmp_path):
    fake_checkpoint(tmp_path, 3, complete=False)  # older and unfinished: can never complete
    fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 7, missing=("__1_0.distcp",))  # older, marker but a file lost
    newest = fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 11, complete=False)  # newer than newest: another save may be writing it
    doomed = _doomed(tmp_path, keep=2, newest=newest)
    assert sorted(doomed) == ["step-00000003", "step-00000007"]


def test_doomed_never_deletes_the_base_model_or_other_folders(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    (tmp_path / CHECKPOINT_BASE_MODEL).mkdir()
    (tmp_path / "notes").mkdir()
    doomed = _doomed(tmp_path, keep=1, newest=step_dir(tmp_path, 3))
    assert sorted(doomed) == ["step-00000001", "step-00000002"]


def test_doomed_keeps_newest_even_when_older_ones_are_unfinished(tmp_path):
    fake_checkpoint(tmp_path, 1, complete=False)
    newest = fake_checkpoint(tmp_path, 2)
    assert _doomed(tmp_path, keep=1, newest=newest) == ["step-00000001"]


# --- a real save and load: one process, gloo, FSDP2 --------------------------------------------

@pytest.fixture(scope="module")
def process_group(free_port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sharded(source: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The base model as train.py builds it: fp32, sharded per block, with AdamW."""
    from ftstack_train.distributed import apply_fsdp
    from ftstack_train.model import load_model

    model = apply_fsdp(load_model(str(source), True, 0), torch.device("cpu"), "fp32", activation_checkpointing=False)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))


def take_a_step(model, optimizer, seed: int) -> None:
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def full(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def assert_same_training_state(a, a_opt, b, b_opt) -> None:
    a_params, b_params = dict(a.named_parameters()), dict(b.named_parameters())
    assert a_params.keys() == b_params.keys()
    for name in a_params:
        torch.testing.assert_close(full(a_params[name]), full(b_params[name]), rtol=0, atol=0, msg=name)
        a_state, b_state = a_opt.state[a_params[name]], b_opt.state[b_params[name]]
        assert a_state.keys() == b_state.keys() == {"step", "exp_avg", "exp_avg_sq"}, name
        for key in a_state:
            torch.testing.assert_close(full(a_state[key]), full(b_state[key]), rtol=0, atol=0, msg=f"{name} {key}")


def test_save_and_load_restore_weights_optimizer_trainer_state_and_rng(process_group, tiny_mpt, tmp_path):
    model, optimizer = sharded(tiny_mpt)
    take_a_step(model, optimizer, seed=0)
    take_a_step(model, optimizer, seed=1)
    trainer_state = {"step": 3, "epoch": 0, "history": [{"step": 0, "cross_entropy": 1.5, "perplexity": 4.48}],
                     "final_train": {"cross_entropy": 1.25}}
    rng_at_save = torch.get_rng_state()
    path = save_checkpoint(tmp_path, 3, model, optimizer, trainer_state, keep=2, is_local_main=True)

    assert path == step_dir(tmp_path, 3) and is_complete(path) and latest_complete(tmp_path) == path
    marker = json.loads((path / MARKER).read_text())
    assert marker["step"] == 3 and marker["world_size"] == 1
    assert set(marker["files"]) == {p.name for p in path.iterdir()} - {MARKER}

    fresh, fresh_optimizer = sharded(tiny_mpt)  # the base weights, no optimizer state yet
    with pytest.raises(AssertionError):
        torch.testing.assert_close(full(next(fresh.parameters())), full(next(model.parameters())))
    torch.rand(5)  # moves the RNG on; the load must put it back
    assert load_checkpoint(path, fresh, fresh_optimizer) == trainer_state
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    assert_same_training_state(model, optimizer, fresh, fresh_optimizer)

    # Both continue identically from there: the learning rate and step count came back too.
    take_a_step(model, optimizer, seed=2)
    take_a_step(fresh, fresh_optimizer, seed=2)
    assert_same_training_state(model, optimizer, fresh, fresh_optimizer)


def test_save_deletes_checkpoints_beyond_keep_and_unfinished_older_ones(process_group, tiny_mpt, tmp_path):
    model, optimizer = sharded(tiny_mpt)
    take_a_step(model, optimizer, seed=0)
    fake_checkpoint(tmp_path, 1, complete=False)  # a save killed mid-way in an earlier attempt
    (tmp_path / CHECKPOINT_BASE_MODEL).mkdir()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model, optimizer, {"step": step, "history": []}, keep=2, is_local_main=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_BASE_MODEL, "step-00000004", "step-00000006"]
    assert latest_complete(tmp_path) == step_dir(tmp_path, 6)
