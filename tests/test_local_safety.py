"""``ftstack local`` never deletes or overwrites a file it did not create (issue 11, item 3).

Each attack is run as a user would type it, through the CLI's ``main``: the command is refused with
one line that names the input and the fix (exit 2, no traceback), and every file that was there
before is still there, byte for byte. A folder of an earlier run, recognised by its marker, is
reused, and only the files that run wrote are replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftstack.cli import main
from ftstack.local import LocalRun, lay_out
from ftstack.run_folder import MARKER
from ftstack_train.errors import ConfigError
from ftstack_train.export_folder import EXPORT_MARKER, STAGING, STAGING_MARKER


def jsonl(n: int) -> bytes:
    return "".join(json.dumps({"prompt": f"What is {i}?", "response": f"It is {i}."}) + "\n" for i in range(n)).encode()


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every file (its bytes) and link (its target) under ``folder``, links not followed."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            found[rel] = f"-> {path.readlink()}"
        elif path.is_file():
            found[rel] = path.read_bytes()
        else:
            found[rel] = "dir"
    return found


@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test instead of starting torchrun, should a refused input get through lay_out."""
    from ftstack_train import launch

    monkeypatch.setattr(launch, "main", lambda argv: pytest.fail("lay_out accepted the input and the run started"))


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A user's working folder, the current folder: a base model in ./model and notes; the data
    lies outside it (../data), so that the data check does not hide the others."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_bytes(jsonl(40))
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "mpt"}')
    (model / "model.safetensors").write_bytes(b"the user's only copy of the weights")
    (model / "tokenizer.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(capsys, *args: str) -> str:
    """Runs ``ftstack local ARGS``; checks it was refused with one line and returns the message."""
    assert main(["local", *args]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert captured.err.startswith("ftstack: error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err.removeprefix("ftstack: error: ").strip()


def test_output_dot_with_the_base_model_in_model_is_refused(project, capsys, no_launch):
    """The issue's case: the export would empty ./model, the user's base model."""
    before = tree(project)
    message = refused(capsys, "--model", "./model", "--output", ".", "--train", "../data/train.jsonl")
    assert message.startswith("--model model: lies inside --output .") and "give an --output folder outside" in message
    assert tree(project) == before


def test_output_dot_is_refused_whatever_the_model(project, capsys, no_launch):
    """With a tiny model the folder still holds the user's ./model, which the export would replace."""
    before = tree(project)
    message = refused(capsys, "--model", "tiny-mpt", "--output", ".", "--train", "../data/train.jsonl")
    assert message == ("--output .: holds files ftstack did not write (model, notes.txt); give a new or empty "
                       "--output folder, or the folder of an earlier ftstack local run")
    assert tree(project) == before


def test_output_inside_the_base_model_is_refused(project, capsys, no_launch):
    before = tree(project)
    message = refused(capsys, "--model", "model", "--output", "model/run", "--train", "../data/train.jsonl")
    assert message.startswith("--output model/run: lies inside --model model")
    assert tree(project) == before


@pytest.mark.parametrize("flag", ["--train", "--test", "--config"])
def test_an_input_inside_the_output_folder_is_refused(project, capsys, no_launch, flag):
    """The issue's case: the channel set-up deleted a --train/--test/--config under
    <output>/input/data/ and the run then crashed with a bare FileNotFoundError."""
    test = project.parent / "data" / "test.jsonl"
    test.write_bytes(jsonl(5))
    config = project.parent / "data" / "config.yaml"
    config.write_text("optimizer:\n  lr: 1.0e-4\n")
    lay_out(local_run(project, test=test, config=config))  # an earlier run in runs/a
    inside = {"--train": "runs/a/input/data/train/train.jsonl", "--test": "runs/a/input/data/test/test.jsonl",
              "--config": "runs/a/input/data/config/config.yaml"}
    args = {"--train": "../data/train.jsonl", "--test": str(test), "--config": str(config), flag: inside[flag]}
    assert Path(inside[flag]).is_file()
    before = tree(project)
    message = refused(capsys, *[x for pair in args.items() for x in pair], "--output", "runs/a")
    assert message == (f"{flag} {inside[flag]}: lies inside --output runs/a, which ftstack local rewrites; "
                       "move the file out of runs/a or give another --output")
    assert tree(project) == before


def test_an_input_anywhere_inside_the_output_folder_is_refused(project, capsys, no_launch):
    (project / "runs").mkdir()
    (project / "runs" / "train.jsonl").write_bytes(jsonl(40))
    before = tree(project)
    message = refused(capsys, "--train", "runs/train.jsonl", "--output", "runs")
    assert message.startswith("--train runs/train.jsonl: lies inside --output runs")
    assert tree(project) == before


def test_a_file_as_output_is_refused(project, capsys, no_launch):
    message = refused(capsys, "--train", "../data/train.jsonl", "--output", "notes.txt")
    assert message.startswith("--output notes.txt: is a file;")
    assert (project / "notes.txt").read_text() == "mine"


# --- a folder of an earlier run: reused, and only what that run wrote is replaced --------------

def local_run(project: Path, **changes) -> LocalRun:
    values = dict(train=project.parent / "data" / "train.jsonl", test=None, model=None, nproc=1, config=None,
                  output=project / "runs" / "a", overrides=())
    values.update(changes)
    return LocalRun(**values)


def test_the_marker_lists_exactly_the_files_the_lay_out_wrote(project):
    paths = lay_out(local_run(project, model=str(project / "model")))
    marker = json.loads((paths.root / MARKER).read_text())
    written = sorted(rel for rel, kind in tree(paths.root).items() if kind != "dir" and rel != MARKER)
    assert marker == {"ftstack": "local run", "inputs": written}
    assert written == ["input/config/hyperparameters.json", "input/config/resourceconfig.json", "input/data/model",
                       "input/data/test/train.jsonl", "input/data/train/train.jsonl"]


def test_a_run_folder_is_reused_and_files_next_to_it_are_left_alone(project):
    run = local_run(project, model=str(project / "model"))
    paths = lay_out(run)
    (paths.root / "run.log").write_text("the user's log of the first run")
    (paths.model_dir).mkdir()
    (paths.model_dir / "config.json").write_text("{}")  # an earlier export of ftstack
    (paths.model_dir / EXPORT_MARKER).write_text(json.dumps({"files": ["config.json"]}))
    model_before = tree(project / "model")

    lay_out(local_run(project, model="tiny-mpt", overrides=("max_duration=1ep",)))
    assert (paths.root / "run.log").read_text() == "the user's log of the first run"
    assert not paths.channel("model").is_symlink() and tree(project / "model") == model_before
    assert (paths.model_dir / "config.json").is_file()  # the export, not lay_out, replaces it


@pytest.mark.parametrize("where", ["input/data/train/extra.jsonl", "input/data/model/weights.bin", "input/config/mine.json",
                                   "model/my-notes.txt"])
def test_a_foreign_file_where_the_run_writes_is_refused(project, where):
    paths = lay_out(local_run(project))
    target = paths.root / where
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("not ftstack's")
    before = tree(project)
    with pytest.raises(ConfigError) as info:
        lay_out(local_run(project))
    name = where if not where.startswith("model/") else "'my-notes.txt'"
    assert name in str(info.value) and "move" in str(info.value)
    assert tree(project) == before


def test_a_marker_naming_paths_outside_the_inputs_is_refused(project):
    paths = lay_out(local_run(project))
    victim = project / "notes.txt"
    (paths.root / MARKER).write_text(json.dumps({"ftstack": "local run", "inputs": ["input/../../../notes.txt"]}))
    with pytest.raises(ConfigError, match=r"lists 'input/\.\./\.\./\.\./notes\.txt', which ftstack local never writes"):
        lay_out(local_run(project))
    assert victim.read_text() == "mine"


def test_a_first_lay_out_cut_off_while_claiming_the_folder_can_be_run_again(project):
    output = project / "runs" / "a"
    output.mkdir(parents=True)
    (output / (MARKER + ".tmp")).write_text("{")
    paths = lay_out(local_run(project))
    assert (paths.channel("train") / "train.jsonl").is_file()


# --- the export: replaces only its own earlier export ------------------------------------------

@pytest.fixture(scope="module")
def sharded(tiny_mpt, process_group):
    """The tiny MPT sharded as train.py shards it, in the module's one-process gloo group."""
    import torch

    from ftstack_train.distributed import apply_fsdp
    from ftstack_train.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_mpt))
    return apply_fsdp(load_model(str(tiny_mpt), True, len(tokenizer)), torch.device("cpu"), "fp32", activation_checkpointing=False), tokenizer


def export(sharded, model_dir: Path, *overrides: str) -> None:
    from ftstack_train.config import parse_config
    from ftstack_train.export import export_hf_model

    cfg, _ = parse_config(None, dict(item.split("=", 1) for item in overrides))
    export_hf_model(*sharded, cfg, model_dir, {"final": {}, "history": []}, {"base_model": "tiny-mpt", "run_name": "safety"})


@pytest.mark.parametrize(("foreign", "named"), [
    ("config.json", "'config.json'"), ("notes.txt", "'notes.txt'"), ("old-folder/x", "'old-folder'"),
    (f"{STAGING}/mine.bin", f"{STAGING} holds files"),
])
def test_export_refuses_a_model_folder_with_files_it_did_not_write(sharded, tmp_path, foreign, named):
    """A user's base model (or anything else) in the model folder is never deleted or overwritten:
    the export stops before gathering the weights, on every rank, and names the file."""
    model_dir = tmp_path / "model"
    (model_dir / foreign).parent.mkdir(parents=True)
    (model_dir / foreign).write_bytes(b"the user's")
    before = tree(model_dir)
    with pytest.raises(ConfigError) as info:
        export(sharded, model_dir)
    assert named in str(info.value)
    assert "move" in str(info.value)
    assert tree(model_dir) == before


def test_export_next_to_its_own_earlier_export_refuses_a_foreign_file(sharded, tmp_path):
    model_dir = tmp_path / "model"
    export(sharded, model_dir, "export.dtype=fp32")
    (model_dir / "model-00001-of-00002.safetensors").write_bytes(b"a shard ftstack did not write")
    before = tree(model_dir)
    with pytest.raises(ConfigError, match=r"holds 'model-00001-of-00002.safetensors', which no ftstack export wrote"):
        export(sharded, model_dir)
    assert tree(model_dir) == before


def test_export_finishes_what_an_interrupted_export_left(sharded, tmp_path):
    """Killed mid-replace, an export leaves files the widened marker names, and its staging
    folder: the next export recognises both as its own and replaces them."""
    model_dir = tmp_path / "model"
    export(sharded, model_dir, "export.dtype=fp32", "export.max_shard_size=50KB")
    first = json.loads((model_dir / EXPORT_MARKER).read_text())["files"]
    (model_dir / "model.safetensors").write_bytes(b"moved in before the kill")
    (model_dir / EXPORT_MARKER).write_text(json.dumps({"files": [*first, "model.safetensors"]}))
    (model_dir / STAGING).mkdir()
    (model_dir / STAGING / STAGING_MARKER).write_bytes(b"")
    (model_dir / STAGING / "part-00000.safetensors").write_bytes(b"half written")

    export(sharded, model_dir)
    files = sorted(p.name for p in model_dir.iterdir())
    assert [f for f in files if "safetensors" in f] == ["model.safetensors"] and STAGING not in files
    assert json.loads((model_dir / EXPORT_MARKER).read_text()) == {"files": [f for f in files if f != EXPORT_MARKER]}
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        assert "transformer.wte.weight" in handle.keys()


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/passwd", "sub/x", ".."])
def test_export_refuses_a_marker_that_names_paths_outside_the_folder(sharded, tmp_path, name):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (model_dir / EXPORT_MARKER).write_text(json.dumps({"files": [name]}))
    with pytest.raises(ConfigError, match="which no export writes"):
        export(sharded, model_dir)
    assert outside.read_text() == "keep"
