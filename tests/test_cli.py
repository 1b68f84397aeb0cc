"""Tests for the operator's command line (ftstack/cli.py) and local mode's set-up (ftstack/local.py):
exit codes and messages as a user sees them, no traceback for a user's mistake, and the SageMaker
tree that ``ftstack local`` lays out before it starts anything."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftstack.cli import main
from ftstack.local import HOLD_OUT_EVERY, LocalRun, hold_out, lay_out
from ftstack_train.contract import SageMakerPaths
from ftstack_train.errors import ConfigError
from ftstack_train.validation import DataError


def record(i: int) -> dict:
    return {"prompt": f"What is {i} + {i}?", "response": f"It is {2 * i}."}


def jsonl(*records: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def good_file(tmp_path: Path, name: str = "train.jsonl", n: int = 40) -> Path:
    return write(tmp_path / name, jsonl(*(record(i) for i in range(n))))


def cli(*args: str) -> subprocess.CompletedProcess:
    """``ftstack ...`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "ftstack.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test instead of starting torchrun, should an input the test expects to be
    rejected get through lay_out."""
    from ftstack_train import launch

    monkeypatch.setattr(launch, "main", lambda argv: pytest.fail("lay_out accepted the input and the run started"))


# --- validate ----------------------------------------------------------------------------------

def test_validate_a_good_file_prints_counts_and_stats(tmp_path):
    path = write(tmp_path / "train.jsonl", jsonl({"prompt": "ab", "response": "abcd"}, {"prompt": "abcdef", "response": "ab"}))
    result = cli("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: OK"
    assert "  records: 2" in lines
    assert any(line.startswith("  prompt chars:") and "min 2" in line and "max 6" in line for line in lines)
    assert any(line.startswith("  response chars:") and "min 2" in line and "max 4" in line for line in lines)


def test_validate_a_bad_file_lists_problems_by_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", jsonl(record(1)) + b'{"prompt": "p"}\n\nnot json\n' + jsonl(record(2)) + b"[1]\n")
    result = cli("validate", str(path))
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert f"{path}: 3 problems" in result.stdout
    assert f"{path}:2: field 'response': is missing" in result.stdout
    assert f"{path}:4: is not valid JSON" in result.stdout
    assert f"{path}:6: is an array, not a JSON object" in result.stdout
    assert "  records: 2" in result.stdout


def test_validate_several_files_counts_them_together(tmp_path, capsys):
    first, second = good_file(tmp_path, "a.jsonl", 3), good_file(tmp_path, "b.jsonl", 4)
    bad = write(tmp_path / "c.jsonl", b'{"prompt": 1, "response": "r"}\n')
    assert main(["validate", str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{first}, {second}: OK") and "  records: 7" in out
    assert main(["validate", str(first), str(second), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "1 problem\n" in out and "  records: 7" in out and f"{bad}:1: field 'prompt': is a number" in out


def test_validate_a_missing_file_is_a_problem_not_a_traceback(tmp_path, capsys):
    good = good_file(tmp_path, n=2)
    missing = tmp_path / "nope.jsonl"
    assert main(["validate", str(good), str(missing), str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert f"{missing}: does not exist; check the path" in captured.out
    assert f"{tmp_path}: is a directory" in captured.out
    assert "Traceback" not in captured.out + captured.err


def test_validate_max_problems_lists_that_many_and_says_more_exist(tmp_path, capsys):
    path = write(tmp_path / "bad.jsonl", b"".join(b'{"prompt": "p", "response": ""}\n' for _ in range(5)))
    assert main(["validate", "--max-problems", "2", str(path)]) == 1
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line.startswith(f"{path}:") and "field 'response'" in line]
    assert [line.split(":")[1] for line in listed] == ["1", "2"]
    assert f"{path}: 5 problems" in out
    assert "... and 3 more problems" in out


def test_validate_max_problems_zero_lists_none_but_counts_all(tmp_path, capsys):
    path = write(tmp_path / "bad.jsonl", b"[]\n")
    assert main(["validate", "--max-problems", "0", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: 1 problem" in out and "... and 1 more problem" in out and f"{path}:1:" not in out


def test_validate_negative_max_problems_is_a_usage_error(tmp_path, capsys):
    assert main(["validate", "--max-problems", "-1", str(good_file(tmp_path))]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "ftstack: error: --max-problems must be 0 or more"
    assert captured.out == ""


def test_no_arguments_is_a_usage_error():
    result = cli()
    assert result.returncode == 2
    assert result.stderr.startswith("usage: ftstack")
    assert "Traceback" not in result.stderr
    # The hint names a command that exists: `ftstack --help`.
    assert "see ftstack --help" in result.stderr, result.stderr


def test_validate_without_files_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["validate"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ftstack validate") and "see ftstack validate --help" in err


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err


# --- local: user errors are caught before anything is written ---------------------------------

def test_local_bad_override_key_suggests_the_right_one(tmp_path):
    output = tmp_path / "run"
    result = cli("local", "--train", str(good_file(tmp_path)), "--output", str(output), "optimizer.lrr=1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ftstack: error: optimizer.lrr")
    assert "did you mean 'optimizer.lr'?" in result.stderr
    assert not output.exists()


USER_ERRORS = {  # arguments after `ftstack local` -> the start of the one-line message
    "missing train": (["--train", "{tmp}/missing.jsonl"], "--train {tmp}/missing.jsonl: no such file"),
    "missing test": (["--test", "{tmp}/missing.jsonl"], "--test {tmp}/missing.jsonl: no such file"),
    "missing config": (["--config", "{tmp}/missing.yaml"], "--config {tmp}/missing.yaml: no such file"),
    "nproc 0": (["--nproc", "0"], "--nproc 0: give at least 1 process"),
    "nproc -2": (["--nproc", "-2"], "--nproc -2: give at least 1 process"),
    "no equals": (["optimizer.lr=1e-4", "noequals"], "'noequals': write overrides as key=value"),
    "empty key": (["=3"], "'=3': write overrides as key=value"),
    "bad value": (["optimizer.lr=fast"], "optimizer.lr (hyperparameter): 'fast' is not a number"),
    "missing model": (["--model", "/does/not/exist"], "--model /does/not/exist: not a directory"),
    "model is a file": (["--model", "{tmp}/train.jsonl"], "--model {tmp}/train.jsonl: not a directory"),
    "bad yaml": (["--config", "{tmp}/bad.yaml"], "{tmp}/bad.yaml: line 3 is not valid YAML"),
    "yaml not a mapping": (["--config", "{tmp}/list.yaml"], "{tmp}/list.yaml: the top level must be a mapping"),
    "unknown yaml key": (["--config", "{tmp}/typo.yaml"], "optimizer.lrr ({tmp}/typo.yaml): unknown key; did you mean 'optimizer.lr'?"),
    "too few to hold out": (["--train", "{tmp}/small.jsonl"], "--train {tmp}/small.jsonl: 5 records are too few to hold out a test set; give --test"),
}


@pytest.mark.parametrize("case", USER_ERRORS)
def test_local_user_error_is_one_line_and_writes_nothing(tmp_path, capsys, no_launch, case):
    write(tmp_path / "bad.yaml", b"optimizer:\n  lr: [1e-4\nrun_name: x\n")
    write(tmp_path / "list.yaml", b"- a\n- b\n")
    write(tmp_path / "typo.yaml", b"optimizer:\n  lrr: 1e-4\n")
    good_file(tmp_path, "small.jsonl", 5)
    args, says = USER_ERRORS[case]
    args = [arg.format(tmp=tmp_path) for arg in args]
    if "--train" not in args:
        args += ["--train", str(good_file(tmp_path))]
    output = tmp_path / "run"
    assert main(["local", *args, "--output", str(output)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"ftstack: error: {says.format(tmp=tmp_path)}"), captured.err
    assert captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.out + captured.err
    assert not output.exists() or not any(output.rglob("*")), sorted(output.rglob("*"))


def test_local_bad_training_data_names_the_file_and_line(tmp_path, capsys, no_launch):
    train = write(tmp_path / "train.jsonl", jsonl(*(record(i) for i in range(30))) + b'{"prompt": "p"}\n')
    output = tmp_path / "run"
    assert main(["local", "--train", str(train), "--output", str(output)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"ftstack: error: {train}:31: field 'response': is missing; give every record a 'response' string (keys found: 'prompt')\n"
    assert not output.exists()


# --- hold_out: the test set when no --test is given --------------------------------------------

def channels(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "input" / "data" / "train", tmp_path / "input" / "data" / "test"


def test_hold_out_sends_every_20th_record_to_test(tmp_path):
    records = [record(i) for i in range(1, 46)]  # the 20th and 40th are held out
    lines = [json.dumps(r).encode() for r in records]
    data = b"\n" + b"\n".join(lines[:10]) + b"\n\n   \n" + b"\n".join(lines[10:])  # blank lines, no final newline
    assert not data.endswith(b"\n")
    source = write(tmp_path / "all.jsonl", data)
    train, test = channels(tmp_path)
    assert hold_out(source, train, test) == (43, 2)

    assert [json.loads(line) for line in (test / "all.jsonl").read_bytes().splitlines()] == [records[19], records[39]]
    kept = (train / "all.jsonl").read_bytes()
    assert kept.endswith(b"\n") and b"\n\n" not in kept and not kept.startswith(b"\n")
    assert [json.loads(line) for line in kept.splitlines()] == [r for i, r in enumerate(records, 1) if i % HOLD_OUT_EVERY]


def test_hold_out_of_exactly_20_records_holds_out_the_last(tmp_path):
    source = good_file(tmp_path, "all.jsonl", 20)
    train, test = channels(tmp_path)
    assert hold_out(source, train, test) == (19, 1)
    assert json.loads((test / "all.jsonl").read_text()) == record(19)


def test_hold_out_keeps_crlf_lines_as_they_are(tmp_path):
    source = write(tmp_path / "all.jsonl", b"".join(json.dumps(record(i)).encode() + b"\r\n" for i in range(20)))
    train, test = channels(tmp_path)
    assert hold_out(source, train, test) == (19, 1)
    assert (test / "all.jsonl").read_bytes() == json.dumps(record(19)).encode() + b"\r\n"


def test_hold_out_validates_the_source_first(tmp_path):
    data = jsonl(*(record(i) for i in range(30)))
    data = data.replace(json.dumps(record(6)).encode(), b'{"prompt": "p", "response": 3}')  # line 7
    source = write(tmp_path / "all.jsonl", data + b"not json\n")
    train, test = channels(tmp_path)
    with pytest.raises(DataError) as info:
        hold_out(source, train, test)
    first, second = str(info.value).splitlines()
    assert first == f"{source}:7: field 'response': is a number, not a string; give every record a response as text in quotes"
    assert second.startswith(f"{source}:31: is not valid JSON")
    assert not train.exists() and not test.exists()


def test_hold_out_of_too_few_records_suggests_test(tmp_path):
    source = good_file(tmp_path, "all.jsonl", HOLD_OUT_EVERY - 1)
    train, test = channels(tmp_path)
    with pytest.raises(ConfigError, match=r"19 records are too few to hold out a test set; give --test"):
        hold_out(source, train, test)
    assert not train.exists() and not test.exists()


def test_hold_out_never_deletes_or_overwrites_what_the_channels_hold(tmp_path):
    """Clearing the channels of an earlier run's files is lay_out's job, which knows what it wrote."""
    train, test = channels(tmp_path)
    for channel in (train, test):
        channel.mkdir(parents=True)
        (channel / "old.jsonl").write_bytes(jsonl(record(0)))
    hold_out(good_file(tmp_path, "all.jsonl"), train, test)
    assert sorted(p.name for p in train.iterdir()) == sorted(p.name for p in test.iterdir()) == ["all.jsonl", "old.jsonl"]
    assert (train / "old.jsonl").read_bytes() == (test / "old.jsonl").read_bytes() == jsonl(record(0))
    before = (train / "all.jsonl").read_bytes()
    with pytest.raises(FileExistsError):
        hold_out(good_file(tmp_path, "all.jsonl"), train, test)
    assert (train / "all.jsonl").read_bytes() == before


# --- lay_out: the /opt/ml tree -----------------------------------------------------------------

def local_run(tmp_path: Path, **changes) -> LocalRun:
    values = dict(train=good_file(tmp_path), test=None, model=None, nproc=2, config=None, output=tmp_path / "run", overrides=())
    values.update(changes)
    return LocalRun(**values)


def hyperparameters(paths: SageMakerPaths) -> dict:
    return json.loads(paths.hyperparameters.read_text())


def test_lay_out_builds_the_sagemaker_tree(tmp_path, capsys):
    run = local_run(tmp_path, model="tiny-mpt", overrides=("optimizer.lr=1e-4", "max_duration = 2ep", "eval_first=false",
                                                           "global_train_batch_size=8", 'run_name="my run"'))
    paths = lay_out(run)
    assert paths.root == (tmp_path / "run").resolve()
    root = paths.root
    assert (root / "input" / "data" / "train" / "train.jsonl").is_file()
    assert (root / "input" / "data" / "test" / "train.jsonl").is_file()
    assert hyperparameters(paths) == {
        "optimizer.lr": "1e-4", "max_duration": "2ep", "eval_first": "false", "global_train_batch_size": "8",
        "run_name": '"my run"', "model.pretrained_model_name_or_path": "tiny-mpt",
    }
    assert paths.hyperparameters == root / "input" / "config" / "hyperparameters.json"
    assert json.loads(paths.resource_config.read_text()) == {"current_host": "algo-1", "hosts": ["algo-1"]}
    assert not paths.channel("model").exists() and not paths.channel("config").exists()
    assert "held out every 20th record" in capsys.readouterr().out

    # The job reads back what was laid out.
    from ftstack_train.job import load_job_config

    cfg, _ = load_job_config(paths)
    assert (cfg.lr, str(cfg.max_duration), cfg.eval_first, cfg.run_name, cfg.model) == (1e-4, "2ep", False, "my run", "tiny-mpt")


def test_lay_out_with_test_and_config_copies_them(tmp_path, capsys):
    test = good_file(tmp_path, "eval.jsonl", 3)
    config = write(tmp_path / "mine.yml", b"optimizer:\n  lr: 2.0e-5\n")
    paths = lay_out(local_run(tmp_path, test=test, config=config))
    assert (paths.channel("train") / "train.jsonl").read_bytes() == (tmp_path / "train.jsonl").read_bytes()
    assert [p.name for p in paths.channel("test").iterdir()] == ["eval.jsonl"]
    assert (paths.channel("config") / "config.yaml").read_bytes() == config.read_bytes()
    assert hyperparameters(paths) == {}
    assert capsys.readouterr().out == ""


def test_lay_out_links_a_model_directory_into_the_model_channel(tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    paths = lay_out(local_run(tmp_path, model=str(model_dir)))
    channel = paths.channel("model")
    assert channel.is_symlink() and channel.resolve() == model_dir.resolve()
    assert (channel / "config.json").is_file()
    assert "model.pretrained_model_name_or_path" not in hyperparameters(paths)


def test_lay_out_again_replaces_the_previous_inputs(tmp_path):
    first_model = tmp_path / "m1"
    first_model.mkdir()
    paths = lay_out(local_run(tmp_path, test=good_file(tmp_path, "old-test.jsonl", 3), model=str(first_model),
                              overrides=("optimizer.lr=1e-4",)))
    paths.failure_file.parent.mkdir(parents=True, exist_ok=True)
    paths.failure_file.write_text("the earlier attempt failed")

    second_model = tmp_path / "m2"
    second_model.mkdir()
    train = good_file(tmp_path, "new-train.jsonl")
    paths = lay_out(local_run(tmp_path, train=train, model=str(second_model), overrides=("max_duration=1ep",)))
    assert [p.name for p in paths.channel("train").iterdir()] == ["new-train.jsonl"]
    assert [p.name for p in paths.channel("test").iterdir()] == ["new-train.jsonl"]
    assert paths.channel("model").resolve() == second_model.resolve()
    assert hyperparameters(paths) == {"max_duration": "1ep"}
    assert not paths.failure_file.exists()

    paths = lay_out(local_run(tmp_path, train=train, model="tiny-llama"))
    assert not paths.channel("model").exists() and not paths.channel("model").is_symlink()
    assert hyperparameters(paths) == {"model.pretrained_model_name_or_path": "tiny-llama"}


def test_lay_out_again_without_config_drops_the_earlier_config(tmp_path):
    config = write(tmp_path / "config.yaml", b"optimizer:\n  lr: 2.0e-5\n")
    lay_out(local_run(tmp_path, config=config))
    paths = lay_out(local_run(tmp_path))
    # The job reads the config channel when it exists: a stale one would configure this run.
    assert not paths.channel("config").exists()
    from ftstack_train.job import load_job_config

    assert load_job_config(paths)[0].lr == 5e-6


def test_lay_out_removes_an_old_failure_file(tmp_path):
    paths = lay_out(local_run(tmp_path))
    paths.failure_file.parent.mkdir(parents=True)  # as the job of that earlier run does
    paths.failure_file.write_text("internal error")
    (paths.output / "keep.txt").write_text("other output stays")
    lay_out(local_run(tmp_path))
    assert not paths.failure_file.exists() and (paths.output / "keep.txt").is_file()


# --- generate ----------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_generate_on_a_folder_without_config_names_the_folder(tmp_path, capsys, folder):
    model_dir = tmp_path / "runs" / "demo" / "model"
    if folder == "empty":
        model_dir.mkdir(parents=True)
    assert main(["generate", str(model_dir), "hi"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"ftstack: error: {model_dir}: no config.json; give the model folder of a finished run (e.g. runs/demo/model)\n"
    assert captured.out == ""


def _exported(tmp_path) -> tuple[Path, str]:
    """A folder shaped like an export: files, a manifest, and the digest the workflow registers."""
    from ftstack_train.manifest import write_manifest

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "mpt"}')
    (model_dir / "model.safetensors").write_bytes(b"\0" * 4096)
    return model_dir, write_manifest(model_dir)


def test_generate_refuses_a_model_changed_after_its_export(tmp_path, capsys):
    model_dir, _ = _exported(tmp_path)
    (model_dir / "model.safetensors").write_bytes(b"\1" * 4096)
    assert main(["generate", str(model_dir), "hi"]) == 2
    assert "model.safetensors: its content is not what model-manifest.json lists; do not use this model" in capsys.readouterr().err


def test_verify_checks_the_files_and_the_registered_digest(tmp_path, capsys):
    model_dir, digest = _exported(tmp_path)
    assert main(["verify", str(model_dir), "--sha256", digest.upper()]) == 0
    assert f"every file matches the registered digest; manifest SHA-256 {digest}" in capsys.readouterr().out
    assert main(["verify", str(model_dir), "--sha256", "0" * 64]) == 2
    assert f"is not the registered {'0' * 64}; the model was changed after it was registered" in capsys.readouterr().err


def test_verify_rejects_a_malformed_digest_naming_the_flag(tmp_path, capsys):
    model_dir, _ = _exported(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(model_dir), "--sha256", "abc"])
    assert exit_.value.code == 2
    assert "argument --sha256: 'abc' is not a SHA-256 (64 hex digits)" in capsys.readouterr().err


def test_every_command_has_help_with_examples(capsys):
    from ftstack.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"validate", "local", "generate", "verify", "estimate", "start", "stage-model"} <= set(commands)
    for name, parser in commands.items():
        text = parser.format_help()
        examples = text.split("examples:\n", 1)[-1]
        assert "examples:\n" in text and f"  ftstack {name} " in examples, name
