"""The TrainingImage construct: a linux/amd64 Docker image asset built on the given base image.

Synth stages the asset without Docker; the build settings are checked in the asset manifest that
``cdk deploy`` reads (``<stack>.assets.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Template

from ftstack.infra.assets import training_context
from ftstack.infra.training_image import TrainingImage

TRAINING_CODE = Path(__file__).resolve().parents[2] / "training_code"
BASE = "763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training:2.8-gpu-py312"


@pytest.fixture(scope="module")
def built(new_stack):
    app, stack = new_stack("Image")
    image = TrainingImage(stack, "TrainingImage", directory=str(TRAINING_CODE), base_image=BASE)
    cdk.CfnOutput(stack, "ImageUri", value=image.image_uri)
    assembly = app.synth()
    manifest = json.loads((Path(assembly.directory) / "Image.assets.json").read_text())
    return app, image, assembly, manifest, Template.from_stack(stack)


def docker_image(manifest: dict) -> dict:
    (entry,) = manifest["dockerImages"].values()
    return entry


def test_asset_builds_for_amd64_on_the_base_image(built):
    source = docker_image(built[3])["source"]
    assert source["platform"] == "linux/amd64"
    assert source["dockerBuildArgs"] == {"BASE_IMAGE": BASE}


def test_build_context_is_training_code_without_caches(built):
    _, _, assembly, manifest, _ = built
    staged = Path(assembly.directory) / docker_image(manifest)["source"]["directory"]
    assert (staged / "Dockerfile").read_text() == (TRAINING_CODE / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE" in (staged / "Dockerfile").read_text()
    assert not list(staged.rglob("__pycache__"))


def test_image_goes_to_the_bootstrap_repository(built):
    _, image, _, manifest, template = built
    (destination,) = docker_image(manifest)["destinations"].values()
    assert destination["repositoryName"] == "cdk-hnb659fds-container-assets-123456789012-us-east-1"
    assert destination["imageTag"] == image.asset.asset_hash
    template.resource_count_is("AWS::ECR::Repository", 0)
    template.has_output("ImageUri", {"Value": {"Fn::Sub": (
        f"123456789012.dkr.ecr.us-east-1.${{AWS::URLSuffix}}/cdk-hnb659fds-container-assets-123456789012-us-east-1:"
        f"{image.asset.asset_hash}")}})


def test_attributes(built):
    _, image, _, _, _ = built
    assert image.image_uri == image.asset.image_uri
    assert image.image_tag == image.asset.image_tag
    assert image.repository.repository_name == image.asset.repository.repository_name


def test_empty_base_image_is_rejected(new_stack):
    _, stack = new_stack()
    with pytest.raises(ValueError, match="base_image"):
        TrainingImage(stack, "TrainingImage", directory=str(TRAINING_CODE), base_image=" ")


def test_no_unacknowledged_cdk_nag_findings(new_stack, nag_findings):
    app, stack = new_stack("Nag")  # a fresh app: nag runs as a plugin of its one synth
    TrainingImage(stack, "TrainingImage", directory=str(TRAINING_CODE), base_image="example.com/base:1")
    assert nag_findings(app) == []


def test_the_assembled_build_context_is_the_repositorys_training_code():
    """What the pipeline builds from (``training_context``, the same for a clone and an installed
    ftstack): the Dockerfile, the lock and the training package's modules, byte for byte."""
    context = training_context()
    files = {p.relative_to(context).as_posix(): p for p in context.rglob("*") if p.is_file()}
    sources = {"Dockerfile": TRAINING_CODE / "Dockerfile", "requirements.lock": TRAINING_CODE / "requirements.lock"}
    sources |= {f"ftstack_train/{p.name}": p for p in (TRAINING_CODE / "ftstack_train").glob("*.py")}
    assert sorted(files) == sorted(sources)
    assert all(files[name].read_bytes() == source.read_bytes() for name, source in sources.items())
