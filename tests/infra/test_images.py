"""The region's AWS images, resolved offline by the pinned sagemaker-core."""

from __future__ import annotations

import re
import socket

import pytest

from ftstack.infra.config import InfraConfig, InfraConfigError
from ftstack.infra.images import Registry, inference_image, pinned_by_digest, registry_of, training_base_image

VLLM = re.compile(
    r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/huggingface-vllm:"
    r"(?P<tag>(?P<version>\d+\.\d+\.\d+)-transformers[\d.]+-gpu-py3\d+-cu\d+-ubuntu[\d.]+(?:-v[\d.]+)?)$"
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any network connection fails the test: the lookups must come from the installed tables."""

    def refuse(*args, **kwargs):
        raise AssertionError("image lookup tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
def test_training_base_image(region):
    assert training_base_image(region, "2.8", "py312") == (
        f"763104351884.dkr.ecr.{region}.amazonaws.com/pytorch-training:2.8-gpu-py312"
    )


def test_config_defaults_resolve():
    config = InfraConfig()
    assert training_base_image(config.region, config.pytorch_version, config.python_version).endswith(
        f"/pytorch-training:{config.pytorch_version}-gpu-{config.python_version}"
    )


def test_inference_image_is_the_same_vllm_release_in_every_region():
    east, west, hk = (VLLM.match(inference_image(region)) for region in ("us-east-1", "eu-west-1", "ap-east-1"))
    assert east and west and hk
    assert (east["region"], west["region"], hk["region"]) == ("us-east-1", "eu-west-1", "ap-east-1")
    assert east["tag"] == west["tag"] == hk["tag"]
    assert hk["account"] == "871362719292"  # the region's own DLC account, as for training images
    # vLLM 0.29 or newer: the release the issue names, with native MPT and Llama support.
    assert tuple(int(p) for p in east["version"].split(".")) >= (0, 29, 0)


def test_the_inference_image_is_looked_up_for_the_default_serving_instance_type():
    from ftstack.infra import images
    from ftstack.serving import DEFAULT_INSTANCE_TYPE

    assert images._INFERENCE_INSTANCE == DEFAULT_INSTANCE_TYPE


@pytest.mark.parametrize("args, key", [
    (("us-east-1", "9.9", "py312"), "pytorch_version"),
    (("us-east-1", "2.8", "py27"), "python_version"),
    (("us-east-1", "", "py312"), "pytorch_version"),
    (("us-east-1", "2.8", " "), "python_version"),
    (("xx-nowhere-1", "2.8", "py312"), "region"),
])
def test_training_lookup_failure_names_the_key(args, key):
    with pytest.raises(InfraConfigError, match=f"context key '{key}'") as failure:
        training_base_image(*args)
    assert "base_image" in str(failure.value)
    assert "pip install" not in str(failure.value)


def test_inference_lookup_failure_names_the_key():
    with pytest.raises(InfraConfigError, match="context key 'inference_image'.*vLLM.*xx-nowhere-1") as failure:
        inference_image("xx-nowhere-1")
    assert "pip install" not in str(failure.value)


@pytest.mark.parametrize("region, account, host_suffix", [
    ("eu-west-1", "763104351884", "amazonaws.com"),
    ("ap-southeast-2", "763104351884", "amazonaws.com"),
    ("ap-east-1", "871362719292", "amazonaws.com"),  # not the us-east-1 account: why the login is derived
    ("cn-north-1", "727897471807", "amazonaws.com.cn"),
])
def test_the_registry_login_comes_from_the_resolved_image(region, account, host_suffix):
    image = training_base_image(region, "2.8", "py312")
    host = f"{account}.dkr.ecr.{region}.{host_suffix}"
    assert registry_of(image) == Registry(account=account, region=region, host=host)
    assert registry_of(image).login_command == (
        f"aws ecr get-login-password --region {region} | docker login --username AWS --password-stdin {host}"
    )


@pytest.mark.parametrize("image", [
    "pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel",  # Docker Hub: no AWS login applies
    "registry.example.com/team/train:1",
    "public.ecr.aws/deep-learning-containers/pytorch-training:2.8",
    "763104351884.dkr.ecr.us-east-1.amazonaws.com.evil.example/x:1",
])
def test_images_outside_a_private_ecr_registry_need_no_aws_login(image):
    assert registry_of(image) is None


DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize("image, pinned", [
    ("763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.8-gpu-py312",
     f"763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training@{DIGEST}"),
    ("registry.example.com:5000/team/train:1", f"registry.example.com:5000/team/train@{DIGEST}"),
    ("registry.example.com:5000/team/train", f"registry.example.com:5000/team/train@{DIGEST}"),
    ("ubuntu:24.04", f"ubuntu@{DIGEST}"),
])
def test_a_digest_replaces_the_tag(image, pinned):
    # Docker ignores a tag written beside a digest: dropping it leaves nothing that reads as if it counted.
    assert pinned_by_digest(image, DIGEST) == pinned
    assert registry_of(pinned) == registry_of(image)  # the login is the same registry's
