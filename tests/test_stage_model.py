"""``ftstack stage-model`` against moto: a model directory staged under base-models/NAME/ with its
digests, the manifest written last, re-runs that skip what is there, and refusals before any upload."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path

import pytest

from ftstack import stage_model as stage_module
from ftstack.upload import BASE_MODELS, DIGEST_METADATA

from aws_fixtures import BUCKET, run_cli, stack  # noqa: F401 (stack: a fixture)

PREFIX = f"{BASE_MODELS}tiny/"
URI = f"s3://{BUCKET}/{PREFIX}"


def _model(root: Path, name: str = "tiny") -> Path:
    """A model directory as huggingface-cli download --local-dir leaves it: two shards, their index,
    config, tokenizer, and a hidden .cache folder that must not be staged."""
    folder = root / name
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "download.lock").write_text("x")
    (folder / "config.json").write_text(json.dumps({"model_type": "mpt", "d_model": 8}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (folder / shard).write_bytes(os.urandom(3000))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return folder


def _expected(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size)
            for p in folder.iterdir() if p.is_file()}


def _puts(boto) -> list[str]:
    """Keys written under the prefix, oldest first (every version: the bucket is versioned)."""
    versions = boto.client("s3").list_object_versions(Bucket=BUCKET, Prefix=PREFIX).get("Versions", [])
    return [v["Key"][len(PREFIX):] for v in sorted(versions, key=lambda v: v["LastModified"])]


def _record_puts(monkeypatch) -> list[str]:
    """The order of this run's writes (moto's LastModified has one-second resolution: too coarse)."""
    written: list[str] = []
    upload = stage_module._upload

    def recording_upload(s3, bucket, key, file, digest, out):
        written.append(key[len(PREFIX):])
        return upload(s3, bucket, key, file, digest, out)

    monkeypatch.setattr(stage_module, "_upload", recording_upload)
    return written


def test_a_directory_is_staged_with_digests_and_the_manifest_last(stack, tmp_path, capsys, monkeypatch):
    boto, _, _ = stack
    folder, s3 = _model(tmp_path), boto.client("s3")
    written = _record_puts(monkeypatch)
    manifest_seen_during_uploads = []
    real_verify = stage_module._verify
    monkeypatch.setattr(stage_module, "_verify", lambda *a: (manifest_seen_during_uploads.append(
        stage_module.MANIFEST in _puts(boto)), real_verify(*a))[1])

    code, out, err = run_cli(capsys, "stage-model", str(folder))
    assert code == 0, err
    expected = _expected(folder)
    assert sorted(written) == sorted(expected) and ".cache/huggingface/download.lock" not in _puts(boto)
    for name, (digest, size) in expected.items():
        head = s3.head_object(Bucket=BUCKET, Key=PREFIX + name)
        assert (head["Metadata"][DIGEST_METADATA], head["ContentLength"]) == (digest, size)
        assert s3.get_object(Bucket=BUCKET, Key=PREFIX + name)["Body"].read() == (folder / name).read_bytes()
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=PREFIX + stage_module.MANIFEST)["Body"].read())
    assert {f["path"]: (f["sha256"], f["size"]) for f in manifest["files"]} == expected
    assert manifest_seen_during_uploads == [False] * len(expected)  # every file checked before the manifest
    assert f"base model: {URI}\n" in out and f"--base-model {URI}" in out and "5 uploaded, 0 already there" in out


def test_a_rerun_skips_every_file(stack, tmp_path, capsys, monkeypatch):
    folder = _model(tmp_path)
    assert run_cli(capsys, "stage-model", str(folder))[0] == 0
    written = _record_puts(monkeypatch)
    code, out, _ = run_cli(capsys, "stage-model", str(folder), "--json")
    assert code == 0 and written == []
    result = json.loads(out)
    assert result["uri"] == URI and result["uploaded"] == [] and sorted(result["skipped"]) == sorted(_expected(folder))


def test_an_interrupted_run_uploads_only_what_is_missing(stack, tmp_path, capsys, monkeypatch):
    boto, _, _ = stack
    folder, s3 = _model(tmp_path), boto.client("s3")
    assert run_cli(capsys, "stage-model", str(folder))[0] == 0
    # An interruption leaves a shard out and no manifest (it is written last).
    s3.delete_object(Bucket=BUCKET, Key=PREFIX + "model-00002-of-00002.safetensors")
    s3.delete_object(Bucket=BUCKET, Key=PREFIX + stage_module.MANIFEST)
    written = _record_puts(monkeypatch)
    code, out, _ = run_cli(capsys, "stage-model", str(folder))
    assert code == 0 and written == ["model-00002-of-00002.safetensors"] and "1 uploaded, 4 already there" in out
    s3.head_object(Bucket=BUCKET, Key=PREFIX + stage_module.MANIFEST)


def test_a_changed_file_is_sent_again_and_the_old_manifest_goes_first(stack, tmp_path, capsys, monkeypatch):
    boto, _, _ = stack
    folder, s3 = _model(tmp_path), boto.client("s3")
    assert run_cli(capsys, "stage-model", str(folder))[0] == 0
    (folder / "config.json").write_text(json.dumps({"model_type": "mpt", "d_model": 16}))
    manifest_there = []
    real_upload = stage_module._upload
    monkeypatch.setattr(stage_module, "_upload", lambda *a: (manifest_there.append(
        "Contents" in s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + stage_module.MANIFEST)), real_upload(*a))[1])
    assert run_cli(capsys, "stage-model", str(folder))[0] == 0
    assert manifest_there == [False]  # a folder being changed never carries a manifest
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=PREFIX + stage_module.MANIFEST)["Body"].read())
    assert {f["path"]: f["sha256"] for f in manifest["files"]}["config.json"] == _expected(folder)["config.json"][0]


@pytest.mark.parametrize("remove, message", [
    ("config.json", "has no config.json;"),
    ("weights", "has no weights (*.safetensors or pytorch_model*.bin)"),
    ("shard", "lists shards that are not in the folder: model-00002-of-00002.safetensors"),
])
def test_a_folder_that_is_not_a_model_is_refused_before_any_upload(stack, tmp_path, capsys, remove, message):
    boto, _, _ = stack
    folder = _model(tmp_path)
    doomed = {"config.json": ["config.json"], "shard": ["model-00002-of-00002.safetensors"],
              "weights": [p.name for p in folder.glob("*.safetensors")]}[remove]
    for name in doomed:
        (folder / name).unlink()
    code, _, err = run_cli(capsys, "stage-model", str(folder))
    assert code == 2 and message in err and str(folder) in err
    assert _puts(boto) == []


def test_links_out_of_the_folder_and_special_files_are_refused(stack, tmp_path, capsys):
    boto, _, _ = stack
    folder = _model(tmp_path)
    (tmp_path / "elsewhere.bin").write_bytes(b"x")
    (folder / "extra.bin").symlink_to(tmp_path / "elsewhere.bin")
    code, _, err = run_cli(capsys, "stage-model", str(folder))
    assert code == 2 and "extra.bin: a symbolic link to" in err and "outside" in err
    (folder / "extra.bin").unlink()
    (folder / "extra.bin").symlink_to(folder / "config.json")  # inside the folder: staged with its content
    os.mkfifo(folder / "pipe")
    code, _, err = run_cli(capsys, "stage-model", str(folder))
    assert code == 2 and "pipe: not a regular file" in err
    assert _puts(boto) == []


def test_files_of_another_model_in_the_folder_are_refused(stack, tmp_path, capsys):
    boto, _, _ = stack
    boto.client("s3").put_object(Bucket=BUCKET, Key=PREFIX + "pytorch_model.bin", Body=b"old")
    code, _, err = run_cli(capsys, "stage-model", str(_model(tmp_path)))
    assert code == 2 and "pytorch_model.bin" in err and "--name" in err and f"aws s3 rm --recursive {URI}" in err
    assert _puts(boto) == ["pytorch_model.bin"]


@pytest.mark.parametrize("argv, message", [
    (["--name", "my model"], "--name 'my model': give 1-128 characters of A-Z a-z 0-9 . _ -"),
    (["--name", "../up"], "--name '../up'"),
    (["--name", "x" * 129], "give 1-128 characters"),
])
def test_a_bad_name_is_refused(stack, tmp_path, capsys, argv, message):
    boto, _, _ = stack
    code, _, err = run_cli(capsys, "stage-model", str(_model(tmp_path)), *argv)
    assert code == 2 and message in err and _puts(boto) == []


def test_the_default_name_comes_from_the_folder_or_the_hub_id(tmp_path):
    assert stage_module.resolve_source(str(_model(tmp_path, "mpt-7b")), None)[1] == "mpt-7b"
    assert stage_module.resolve_source("mosaicml/mpt-7b-instruct", None) == (None, "mpt-7b-instruct")
    with pytest.raises(stage_module.AwsError, match="no such directory, and not a Hugging Face hub id"):
        stage_module.resolve_source("no/such/dir", None)


def test_a_hub_id_without_network_says_how_to_download_it(stack, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    boto, _, _ = stack
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the env var is too late
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, _, err = run_cli(capsys, "stage-model", "ftstack-tests/not-a-model")
    assert code == 2 and "downloading it from the Hugging Face hub failed" in err
    assert "`huggingface-cli download ftstack-tests/not-a-model --local-dir DIR`" in err
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    code, _, err = run_cli(capsys, "stage-model", "ftstack-tests/not-a-model")
    assert code == 2 and "huggingface_hub is not installed" in err and "--local-dir DIR" in err
    assert _puts(boto) == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_progress_line_and_a_folder_without_tokenizer_a_warning(stack, tmp_path, capsys):
    boto, _, _ = stack
    folder = _model(tmp_path)
    (folder / "tokenizer.json").unlink()
    files = stage_module.model_files(folder)
    err = capsys.readouterr().err
    assert "has no tokenizer files" in err and "tokenizer.name=HUB_ID_OR_DIR" in err
    terminal = _Terminal()
    staged = stage_module.stage(boto.client("s3"), BUCKET, "tiny", files, out=terminal)
    assert staged.uri == URI and len(staged.uploaded) == 4
    assert "\rconfig.json [" in terminal.getvalue() and "100% " in terminal.getvalue()


def test_a_file_rewritten_while_it_was_uploaded_is_caught_and_no_manifest_is_written(stack, tmp_path, capsys, monkeypatch):
    """The object carries the digest taken before the upload, and a rewrite of the same size
    passes a size check: the file is hashed again after its upload."""
    boto, _, _ = stack
    folder = _model(tmp_path)
    upload = stage_module._upload

    def upload_then_rewrite(s3, bucket, key, file, digest, out):
        upload(s3, bucket, key, file, digest, out)
        if key.endswith("00001-of-00002.safetensors"):
            file.path.write_bytes(os.urandom(file.size))  # a writer still at work, same size

    monkeypatch.setattr(stage_module, "_upload", upload_then_rewrite)
    code, _, err = run_cli(capsys, "stage-model", str(folder))
    assert code == 2 and "model-00001-of-00002.safetensors changed while it was uploaded" in err, err
    assert stage_module.MANIFEST not in _puts(boto)


def test_a_pipeline_in_a_folder_stages_its_base_models_there(stack, tmp_path, capsys):
    """The stack's DataPrefix output (a pipeline in a shared bucket): base models go under
    <prefix>base-models/, where that pipeline's jobs and staging read them."""
    boto, _, _ = stack
    folder = _model(tmp_path)
    code, out, err = run_cli(capsys, "stage-model", str(folder), "--stack", "team-a", "--name", "tiny")
    assert code == 0, err
    assert f"s3://{BUCKET}/team-a/base-models/tiny/" in out
    keys = [o["Key"] for o in boto.client("s3").list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert keys and all(k.startswith("team-a/base-models/tiny/") for k in keys)
