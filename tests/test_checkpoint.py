"""Tests for ftstack_train.checkpoint: which folders count as complete on one disk and across the
nodes' disks, which one a run resumes from and which ones are deleted (fabricated folders laid out
as each SageMaker node holds them), and a real save/load through torch.distributed.checkpoint in a
one-process gloo group with an FSDP2-sharded tiny MPT. The whole multi-node path, with SageMaker's
S3 sync emulated between two nodes, is in test_multinode.py."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from ftstack_train.checkpoint import (
    PART_PREFIX, agree_on_resume, complete_somewhere, doomed, is_complete, load_checkpoint, local_view, part_marker,
    parts_present, resume_choice, save_checkpoint, step_dir,
)
from ftstack_train.config import parse_config
from ftstack_train.contract import CHECKPOINT_BASE_MODEL
from ftstack_train.errors import ConfigError

# What each of two nodes (one process each) writes: rank 0 also writes DCP's .metadata.
NODE_FILES = ((".metadata", "__0_0.distcp", "rng-rank00000.safetensors"), ("__1_0.distcp", "rng-rank00001.safetensors"))


def fake_checkpoint(folder: Path, step: int, parts=(0, 1), marked=None, missing: tuple[str, ...] = ()) -> Path:
    """A checkpoint folder as save_checkpoint leaves it on a disk that holds ``parts`` (after an S3
    download: both; during an attempt: the node's own): the files, then the markers of ``marked``
    (default: every part held)."""
    path = step_dir(folder, step)
    path.mkdir(parents=True, exist_ok=True)
    for node in parts:
        files = {name: {"size": 1, "sha256": hashlib.sha256(b"x").hexdigest()} for name in NODE_FILES[node]}
        for name in files:
            if name not in missing:
                (path / name).write_bytes(b"x")
        if node in (parts if marked is None else marked):
            doc = {"step": step, "world_size": 2, "parts": len(NODE_FILES), "node": node, "files": files}
            part_marker(path, node).write_text(json.dumps(doc))
    return path


def two_nodes(tmp_path: Path) -> tuple[Path, Path]:
    """Each node's /opt/ml/checkpoints."""
    return tmp_path / "node0", tmp_path / "node1"


# --- what counts as complete -------------------------------------------------------------------

def test_step_dir_is_zero_padded_so_names_sort_by_step(tmp_path):
    assert step_dir(tmp_path, 123) == tmp_path / "step-00000123"
    assert sorted(step_dir(tmp_path, s).name for s in (100, 9, 20)) == [step_dir(tmp_path, s).name for s in (9, 20, 100)]


def test_is_complete_with_every_part_and_every_listed_file(tmp_path):
    path = fake_checkpoint(tmp_path, 1)
    assert is_complete(path) and parts_present(path) == (2, [0, 1])


def test_a_node_alone_holds_only_its_part(tmp_path):
    # During an attempt: the bug of issue 6 item 13 was to call this incomplete and delete it.
    node0, node1 = two_nodes(tmp_path)
    assert parts_present(fake_checkpoint(node0, 1, parts=(0,))) == (2, [0])
    assert parts_present(fake_checkpoint(node1, 1, parts=(1,))) == (2, [1])
    assert not is_complete(step_dir(node0, 1)) and not is_complete(step_dir(node1, 1))


@pytest.mark.parametrize("marked", [(), (0,), (1,)])
def test_is_complete_false_without_every_part_marker(tmp_path, marked):
    # e.g. a node killed before its marker, or its marker not uploaded before the interruption
    assert not is_complete(fake_checkpoint(tmp_path, 1, marked=marked))


@pytest.mark.parametrize("missing", [".metadata", "__1_0.distcp", "rng-rank00001.safetensors"])
def test_is_complete_false_when_a_listed_file_is_missing(tmp_path, missing):
    # e.g. another node's files not uploaded to S3 before the interruption
    assert not is_complete(fake_checkpoint(tmp_path, 1, missing=(missing,)))


def test_is_complete_false_when_a_file_has_another_size(tmp_path):
    path = fake_checkpoint(tmp_path, 1)
    (path / "__1_0.distcp").write_bytes(b"")  # truncated
    assert not is_complete(path)


def test_is_complete_false_when_a_listed_file_is_a_folder(tmp_path):
    path = fake_checkpoint(tmp_path, 1, missing=("__1_0.distcp",))
    (path / "__1_0.distcp").mkdir()
    assert not is_complete(path)


def test_is_complete_false_for_a_missing_folder(tmp_path):
    assert not is_complete(tmp_path / "step-00000001")


@pytest.mark.parametrize("marker", [
    "", '{"parts": 2, "files": {".meta', "not json", '{"parts": 2}', "[]",
    '{"parts": 2, "world_size": 2, "files": null}', '{"parts": 0, "world_size": 2, "files": {}}',
    '{"parts": 2, "world_size": 2, "files": {"__1_0.distcp": 1}}',  # the format before digests
    # valid JSON of the wrong shape
    '{"parts": 2, "world_size": 2, "files": {"../escape": {"size": 1, "sha256": "%s"}}}' % ("0" * 64),
    '{"parts": 2, "world_size": 2, "files": {"..": {"size": 1, "sha256": "%s"}}}' % ("0" * 64),
    '{"parts": 2, "world_size": 2, "files": {"__1_0.distcp": {"size": 1, "sha256": "not hex"}}}',
    '{"parts": 2, "world_size": 2, "files": {"__1_0.distcp": {"size": "1", "sha256": "%s"}}}' % ("0" * 64),
])
def test_is_complete_false_for_a_corrupt_marker(tmp_path, marker):
    # A corrupt marker must make the folder incomplete (skipped on resume), never crash the resume.
    path = fake_checkpoint(tmp_path, 1)
    part_marker(path, 1).write_text(marker)
    assert not is_complete(path)


def test_markers_that_disagree_on_the_layout_never_count(tmp_path):
    # A part of a run with another node count cannot complete this one.
    path = fake_checkpoint(tmp_path, 1)
    doc = json.loads(part_marker(path, 1).read_text())
    part_marker(path, 1).write_text(json.dumps(dict(doc, parts=3)))
    assert parts_present(path) is None and not is_complete(path)


# --- which checkpoint a run resumes from -------------------------------------------------------

def latest_complete(folder: Path) -> Path | None:
    """The checkpoint a single node resumes from: what agree_on_resume picks from its one view."""
    name = resume_choice([local_view(folder)])
    return None if name is None else folder / name


def test_latest_complete_picks_the_newest_complete(tmp_path):
    fake_checkpoint(tmp_path, 4)
    newest = fake_checkpoint(tmp_path, 12)
    fake_checkpoint(tmp_path, 8)
    assert latest_complete(tmp_path) == newest


def test_latest_complete_skips_a_newer_incomplete_one(tmp_path):
    complete = fake_checkpoint(tmp_path, 8)
    fake_checkpoint(tmp_path, 12, marked=(0,))  # node 1 killed mid-save
    fake_checkpoint(tmp_path, 16, missing=("__1_0.distcp",))
    assert latest_complete(tmp_path) == complete


def test_latest_complete_ignores_folders_that_are_not_steps(tmp_path):
    complete = fake_checkpoint(tmp_path, 3)
    for name in ("step-99", "step-000000099", "step-0000009x", "xstep-00000099", CHECKPOINT_BASE_MODEL):
        fake_checkpoint(tmp_path, 99).rename(tmp_path / name)  # complete, but not a step folder
    (tmp_path / "step-00000099").write_text("a file, not a folder")
    assert latest_complete(tmp_path) == complete


def test_latest_complete_none_for_an_empty_or_missing_folder(tmp_path):
    assert latest_complete(tmp_path) is None
    assert latest_complete(tmp_path / "nope") is None
    (tmp_path / "file").write_text("")
    assert latest_complete(tmp_path / "file") is None


def test_resume_choice_is_the_newest_complete_on_every_node(tmp_path):
    node0, node1 = two_nodes(tmp_path)
    for node in (node0, node1):  # what the S3 download gave both
        fake_checkpoint(node, 4)
        fake_checkpoint(node, 8)
    fake_checkpoint(node0, 12)  # complete on node 0 only: node 1 could not load it
    fake_checkpoint(node1, 12, missing=("__1_0.distcp",))
    assert resume_choice([local_view(node0), local_view(node1)]) == "step-00000008"
    assert resume_choice([local_view(node0)]) == "step-00000012"


def test_resume_choice_none_when_nothing_is_complete_everywhere(tmp_path):
    node0, node1 = two_nodes(tmp_path)
    fake_checkpoint(node0, 4, parts=(0,))  # parts split over the nodes: not loadable anywhere
    fake_checkpoint(node1, 4, parts=(1,))
    assert resume_choice([local_view(node0), local_view(node1)]) is None
    assert resume_choice([local_view(node0), {}]) is None
    assert resume_choice([]) is None


# --- which checkpoints are deleted after a save ------------------------------------------------

def views_of(*folders: Path) -> tuple[list, list[str]]:
    return [local_view(f) for f in folders], sorted({p.name for f in folders if f.is_dir() for p in f.glob("step-*")})


def test_a_checkpoint_split_over_the_nodes_is_complete_and_kept(tmp_path):
    """Issue 6 item 13: during an attempt each node holds only its own part of each checkpoint.
    Judged from one node's disk every checkpoint was incomplete, so every save deleted the one
    before it while SageMaker was still uploading the new one."""
    node0, node1 = two_nodes(tmp_path)
    for step in (4, 8, 12):
        fake_checkpoint(node0, step, parts=(0,))
        fake_checkpoint(node1, step, parts=(1,))
    views, existing = views_of(node0, node1)
    assert complete_somewhere(views) == ["step-00000004", "step-00000008", "step-00000012"]
    assert doomed(views, existing, keep=2, newest="step-00000012") == ["step-00000004"]
    # One node's view alone would have doomed both older ones: that is what every node used to do.
    assert doomed(views[:1], existing, keep=2, newest="step-00000012") == ["step-00000004", "step-00000008"]


def test_doomed_keeps_the_newest_complete_ones(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    views, existing = views_of(tmp_path)
    assert doomed(views, existing, keep=2, newest="step-00000008") == ["step-00000002", "step-00000004"]
    assert doomed(views, existing, keep=1, newest="step-00000008") == ["step-00000002", "step-00000004", "step-00000006"]
    assert doomed(views, existing, keep=4, newest="step-00000008") == []


def test_doomed_never_deletes_the_newest_complete_one(tmp_path):
    # The new save failed to complete (a part is missing): the previous complete one stays
    # whatever keep says, and nothing newer than the new save is touched.
    node0, node1 = two_nodes(tmp_path)
    for step in (2, 4):
        fake_checkpoint(node0, step, parts=(0,))
        fake_checkpoint(node1, step, parts=(1,))
    fake_checkpoint(node0, 6, parts=(0,))
    views, existing = views_of(node0, node1)
    for keep in (0, 1):
        assert doomed(views, existing, keep=keep, newest="step-00000006") == ["step-00000002"]


def test_doomed_deletes_unfinished_older_ones_but_never_a_newer_one(tmp_path):
    fake_checkpoint(tmp_path, 3, marked=())  # older and unfinished: can never complete
    fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 7, missing=("__1_0.distcp",))  # older, markers but a file lost in S3
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 11, marked=(0,))  # newer: a stop save of an earlier attempt that did not finish uploading
    views, existing = views_of(tmp_path)
    assert doomed(views, existing, keep=2, newest="step-00000010") == ["step-00000003", "step-00000007"]


def test_doomed_never_deletes_the_base_model_or_other_folders(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    (tmp_path / CHECKPOINT_BASE_MODEL).mkdir()
    (tmp_path / "notes").mkdir()
    views, existing = views_of(tmp_path)
    assert doomed(views, existing, keep=1, newest="step-00000003") == ["step-00000001", "step-00000002"]


@pytest.mark.parametrize("keep", ["0", "1"])
def test_config_keeps_at_least_two_checkpoints(keep):
    """With one, the only complete checkpoint would be deleted while SageMaker is still uploading
    its successor; an interruption then leaves nothing complete in S3."""
    with pytest.raises(ConfigError, match="save_num_checkpoints_to_keep.*at least 2"):
        parse_config(None, {"save_num_checkpoints_to_keep": keep})
    assert parse_config(None, {"save_num_checkpoints_to_keep": "2"})[0].save_num_checkpoints_to_keep == 2


# --- a real save and load: one process, gloo, FSDP2 --------------------------------------------

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
    marker = json.loads(part_marker(path, 0).read_text())
    assert (marker["step"], marker["world_size"], marker["parts"], marker["node"]) == (3, 1, 1, 0)
    assert marker["files"] == {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in path.iterdir() if not p.name.startswith(PART_PREFIX)
    }

    fresh, fresh_optimizer = sharded(tiny_mpt)  # the base weights, no optimizer state yet
    with pytest.raises(AssertionError):
        torch.testing.assert_close(full(next(fresh.parameters())), full(next(model.parameters())))
    torch.rand(5)  # moves the RNG on; the load must put it back
    assert agree_on_resume(tmp_path, is_local_main=True) == path  # its files match their digests
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
    fake_checkpoint(tmp_path, 1, marked=())  # a save killed mid-way in an earlier attempt
    (tmp_path / CHECKPOINT_BASE_MODEL).mkdir()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model, optimizer, {"step": step, "history": []}, keep=2, is_local_main=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_BASE_MODEL, "step-00000004", "step-00000006"]
    assert latest_complete(tmp_path) == step_dir(tmp_path, 6)


def test_a_stop_save_deletes_nothing_and_a_stale_folder_is_replaced(process_group, tiny_mpt, tmp_path):
    model, optimizer = sharded(tiny_mpt)
    for step in (2, 4):
        save_checkpoint(tmp_path, step, model, optimizer, {"step": step, "history": []}, keep=2, is_local_main=True)
    # An earlier attempt's unfinished save at step 5 (its upload cut off by the interruption),
    # with a file this save will not write: the new save must not mix it in.
    stale = fake_checkpoint(tmp_path, 5, marked=(0,))
    save_checkpoint(tmp_path, 5, model, optimizer, {"step": 5, "history": []}, keep=2, is_local_main=True, prune=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000004", "step-00000005"]
    assert is_complete(stale) and not (stale / "__1_0.distcp").exists()
    assert json.loads(part_marker(stale, 0).read_text())["parts"] == 1
