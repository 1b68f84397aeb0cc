"""ftstack.s3_model: a model folder in S3 pinned by its object versions at registration and checked
against them at deployment, in moto's versioned S3. The case the versions are for: other weights
of the same shape, which the manifest's sizes cannot tell from the registered ones."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import boto3
import pytest
from moto import mock_aws

from ftstack.s3_model import VERSIONS_SHA256, pin_s3_model, verify_s3_model
from ftstack.serving import ServingError
from ftstack_train.manifest import ModelIntegrityError, manifest_bytes

FILES = {"config.json": b"{}", "model.safetensors": b"\1" * 100}
MANIFEST = manifest_bytes({n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in FILES.items()})
DIGEST = hashlib.sha256(MANIFEST).hexdigest()
URI = "s3://bkt/m/model/"
SUMMARY = {"model_uri": URI, "files": 2, "bytes": 102, "model_manifest_sha256": DIGEST}


def upload(client, versioned: bool = True) -> None:
    client.create_bucket(Bucket="bkt")
    if versioned:
        client.put_bucket_versioning(Bucket="bkt", VersioningConfiguration={"Status": "Enabled"})
    for name, body in {**FILES, "model-manifest.json": MANIFEST, "final-metrics.json": b"{}",
                       ".ftstack-export.json": b"{}"}.items():
        client.put_object(Bucket="bkt", Key=f"m/model/{name}", Body=body)
    client.put_object(Bucket="bkt", Key="m/model-other/x", Body=b"x")  # a sibling prefix is not the model's


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        upload(client)
        yield client


def test_a_model_as_its_job_left_it_is_pinned_and_then_passes(s3):
    pinned = pin_s3_model(s3, "s3://bkt/m/model", DIGEST.upper())
    versions = pinned.pop(VERSIONS_SHA256)
    assert pinned == SUMMARY
    assert verify_s3_model(s3, "s3://bkt/m/model", DIGEST, versions.upper()) == SUMMARY | {VERSIONS_SHA256: versions}
    s3.put_object(Bucket="bkt", Key="m/model-other/x", Body=b"y")  # outside the folder: no change to it
    assert verify_s3_model(s3, URI, DIGEST, versions)[VERSIONS_SHA256] == versions


@pytest.mark.parametrize("change, found", [
    # Other weights of the same shape: the same size, only the object's version differs.
    (lambda s3: s3.put_object(Bucket="bkt", Key="m/model/model.safetensors", Body=b"\2" * 100),
     "(model.safetensors written more than once)"),
    # The same bytes written again are a write all the same.
    (lambda s3: s3.put_object(Bucket="bkt", Key="m/model/config.json", Body=b"{}"), "(config.json written more than once)"),
    (lambda s3: s3.put_object(Bucket="bkt", Key="m/model/final-metrics.json", Body=b"{}"), "final-metrics.json written"),
    (lambda s3: s3.put_object(Bucket="bkt", Key="m/model/sub/weights.bin", Body=b"x"), "objects were added, deleted"),
    (lambda s3: s3.delete_object(Bucket="bkt", Key="m/model/config.json"), "(config.json written more than once)"),
])
def test_any_write_to_the_folder_after_registration_fails_the_deployment_check(s3, change, found):
    versions = pin_s3_model(s3, URI, DIGEST)[VERSIONS_SHA256]
    change(s3)
    with pytest.raises(ModelIntegrityError, match="not the versions registered") as caught:
        verify_s3_model(s3, URI, DIGEST, versions)
    assert found in str(caught.value)


def test_a_folder_written_to_before_registration_is_not_pinned(s3):
    s3.put_object(Bucket="bkt", Key="m/model/model.safetensors", Body=b"\2" * 100)
    with pytest.raises(ModelIntegrityError, match="model.safetensors written 2 times .* not registered"):
        pin_s3_model(s3, URI, DIGEST)


def test_a_bucket_without_versioning_cannot_pin_a_model():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        upload(client, versioned=False)
        with pytest.raises(ModelIntegrityError, match="bucket bkt does not keep object versions.*turn on versioning"):
            pin_s3_model(client, URI, DIGEST)


@pytest.mark.parametrize("manifest, versions, message", [
    ("", "0" * 64, "has no model_manifest_sha256"),
    (DIGEST, "", "has no model_versions_sha256"),
    (DIGEST, "xyz", "has no model_versions_sha256"),
])
def test_a_missing_digest_fails(s3, manifest, versions, message):
    with pytest.raises(ModelIntegrityError, match=message):
        verify_s3_model(s3, URI, manifest, versions)


def test_a_different_manifest_digest_fails_both_checks(s3):
    versions = pin_s3_model(s3, URI, DIGEST)[VERSIONS_SHA256]
    for check in (lambda: pin_s3_model(s3, URI, "1" * 64), lambda: verify_s3_model(s3, URI, "1" * 64, versions)):
        with pytest.raises(ModelIntegrityError, match="is not the registered"):
            check()


def test_the_folder_must_hold_exactly_the_listed_files_at_their_sizes():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        upload(client)
        client.put_object(Bucket="bkt", Key="m/model2/config.json", Body=b"{}")
        client.put_object(Bucket="bkt", Key="m/model2/model.safetensors", Body=b"\1" * 99)
        client.put_object(Bucket="bkt", Key="m/model2/model-manifest.json", Body=MANIFEST)
        with pytest.raises(ModelIntegrityError, match="99 bytes where model-manifest.json lists 100"):
            pin_s3_model(client, "s3://bkt/m/model2/", DIGEST)
        client.put_object(Bucket="bkt", Key="m/model3/model-manifest.json", Body=MANIFEST)
        client.put_object(Bucket="bkt", Key="m/model3/config.json", Body=b"{}")
        client.put_object(Bucket="bkt", Key="m/model3/sub/weights.bin", Body=b"x")
        with pytest.raises(ModelIntegrityError, match="missing: model.safetensors; not listed: sub/weights.bin"):
            pin_s3_model(client, "s3://bkt/m/model3/", DIGEST)
        with pytest.raises(ModelIntegrityError, match="model-manifest.json: missing"):
            pin_s3_model(client, "s3://bkt/m/none/", DIGEST)


@pytest.mark.parametrize("uri", ["bkt/m/model", "https://bkt.s3.amazonaws.com/m", ""])
def test_a_uri_that_is_not_s3_is_refused(s3, uri):
    with pytest.raises(ServingError, match="not an s3:// URI"):
        verify_s3_model(s3, uri, DIGEST, "0" * 64)


def test_the_module_loads_without_boto3_or_torch():
    code = ("import sys; sys.modules['boto3'] = None; sys.modules['torch'] = None; sys.modules['aws_cdk'] = None\n"
            "import ftstack.s3_model")
    subprocess.run([sys.executable, "-c", code], check=True)
