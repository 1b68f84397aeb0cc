"""The model manifest: a registered model that is changed afterwards (a file replaced, added,
removed, or the manifest rewritten to match) is refused before use."""

from __future__ import annotations

import hashlib
import json

import pytest

from ftstack_train.contract import FINAL_METRICS_FILE, MANIFEST_FILE
from ftstack_train.manifest import ModelIntegrityError, verify_model, write_manifest


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "mpt"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 1000)
    (folder / ".ftstack-export.json").write_text('{"files": []}')  # ftstack's marker: not part of the model
    digest = write_manifest(folder)
    (folder / FINAL_METRICS_FILE).write_text(json.dumps({"model_manifest_sha256": digest}))
    return folder, digest


def test_an_untouched_model_verifies_against_its_registered_digest(model):
    folder, digest = model
    assert digest == hashlib.sha256((folder / MANIFEST_FILE).read_bytes()).hexdigest()
    assert verify_model(folder, digest) == digest
    assert verify_model(folder) == digest  # its own manifest alone


def test_a_replaced_weight_file_is_refused(model):
    folder, digest = model
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[::-1])  # same size, other content
    with pytest.raises(ModelIntegrityError, match=r"model.safetensors: its content is not what model-manifest.json lists"):
        verify_model(folder, digest)


def test_a_rewritten_manifest_that_matches_the_new_files_is_refused_by_the_registered_digest(model):
    folder, digest = model
    (folder / "model.safetensors").write_bytes(b"payload")
    write_manifest(folder)  # what an attacker who can write the prefix would do
    verify_model(folder)  # consistent in itself ...
    with pytest.raises(ModelIntegrityError, match=f"is not the registered {digest}; the model was changed after it was registered"):
        verify_model(folder, digest)  # ... but not the registered one


@pytest.mark.parametrize(("change", "says"), [
    (lambda f: (f / "modeling_mpt.py").write_text("import os"), "not listed: modeling_mpt.py"),
    (lambda f: (f / "config.json").unlink(), "missing: config.json"),
])
def test_an_added_or_removed_file_is_refused(model, change, says):
    folder, digest = model
    change(folder)
    with pytest.raises(ModelIntegrityError, match=says):
        verify_model(folder, digest)


@pytest.mark.parametrize("text", [b"not json", b'{"algorithm": "md5", "files": {}}',
                                  b'{"algorithm": "sha256", "files": {"../x": {"sha256": "' + b"0" * 64 + b'", "bytes": 1}}}'])
def test_a_manifest_ftstack_did_not_write_is_refused(model, text):
    folder, _ = model
    (folder / MANIFEST_FILE).write_bytes(text)
    with pytest.raises(ModelIntegrityError, match="not a model manifest written by ftstack"):
        verify_model(folder)


def test_a_folder_without_a_manifest_cannot_be_verified(tmp_path):
    with pytest.raises(ModelIntegrityError, match="no model-manifest.json; only a model exported by ftstack"):
        verify_model(tmp_path)
