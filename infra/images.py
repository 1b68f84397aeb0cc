"""The AWS container images for a region, resolved offline from the image tables that the pinned
sagemaker-core ships (no AWS call, no network). ``app.py`` calls these only when the ``base_image``
or ``inference_image`` context key is empty; a failed lookup names the key to set."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import InfraConfigError

# The instance families that decide the image's processor (gpu) and its CUDA build.
_TRAINING_INSTANCE = "ml.p4d.24xlarge"
_INFERENCE_INSTANCE = "ml.g5.2xlarge"  # ftstack.serving.DEFAULT_INSTANCE_TYPE (a test ties them)
# sagemaker-core suggests `pip install -U sagemaker`; here the fix is a context key.
_UPGRADE_HINT = re.compile(r"\s*You may need to upgrade your SDK version \(pip install -U sagemaker\)[^.]*\.")
# An ECR registry host: <account>.dkr.ecr[-fips].<region>.amazonaws.com[.cn] (China regions end in .cn).
_ECR_HOST = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d)\.amazonaws\.com(?:\.cn)?$")


@dataclass(frozen=True)
class Registry:
    """The ECR registry an image is pulled from. The AWS Deep Learning Containers live in a
    different AWS account in some regions (763104351884 in most, 871362719292 in ap-east-1,
    727897471807 in cn-north-1, ...), so the login must come from the image URI, not a constant."""

    account: str
    region: str
    host: str

    @property
    def login_command(self) -> str:
        """The shell command that logs Docker in to this registry (AWS CLI v2)."""
        return (f"aws ecr get-login-password --region {self.region} | "
                f"docker login --username AWS --password-stdin {self.host}")


def registry_of(image_uri: str) -> Registry | None:
    """The ECR registry of ``image_uri``, or None for an image outside ECR (Docker Hub, a
    private registry), for which no AWS login applies."""
    host = image_uri.split("/", 1)[0] if "/" in image_uri else ""
    match = _ECR_HOST.match(host)
    return Registry(match["account"], match["region"], host) if match else None


def pinned_by_digest(image_uri: str, digest: str) -> str:
    """``image_uri`` as ``<repository>@<digest>``: Docker then pulls that exact image, whatever the
    tag points to by the time of the build. The tag is dropped rather than kept beside the digest
    (``repo:tag@digest``), where Docker would ignore it without a word."""
    host_and_path, _, last = image_uri.rpartition("/")
    repository = last.split("@", 1)[0].split(":", 1)[0]
    return f"{host_and_path}/{repository}@{digest}" if host_and_path else f"{repository}@{digest}"


def training_base_image(region: str, pytorch_version: str, python_version: str) -> str:
    """The AWS Deep Learning Container for PyTorch GPU training in ``region``, e.g.
    ``763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.8-gpu-py312``."""
    for key, value in (("pytorch_version", pytorch_version), ("python_version", python_version)):
        if not value.strip():
            raise InfraConfigError(
                f"context key {key!r}: must not be empty; give a version (e.g. 2.8 and py312) or set 'base_image'"
            )
    from sagemaker.core import image_uris  # several seconds to import: only when needed

    try:
        return image_uris.retrieve(
            framework="pytorch",
            region=region,
            version=pytorch_version,
            py_version=python_version,
            instance_type=_TRAINING_INSTANCE,
            image_scope="training",
        )
    except (ValueError, KeyError) as err:
        reason = _UPGRADE_HINT.sub("", str(err)).rstrip(".")
        key = "python_version" if "Python version" in reason else "region" if "region" in reason else "pytorch_version"
        raise InfraConfigError(
            f"context key {key!r}: no AWS PyTorch training image for PyTorch {pytorch_version!r}, "
            f"{python_version!r} in {region!r} ({reason}). Choose a supported value, or set 'base_image' "
            "to a training image URI."
        ) from None


INFERENCE_FRAMEWORK = "huggingface-vllm"
"""sagemaker-core's name for the Hugging Face vLLM inference container (GPU). vLLM is maintained and
serves MPT and Llama-family models natively; TGI, the previous default, went into maintenance
mode in December 2025. The container's environment is ``ftstack.serving.vllm_environment``."""


def inference_image(region: str) -> str:
    """The Hugging Face vLLM inference image (GPU) in ``region``: the newest version listed by the
    pinned sagemaker-core, e.g. ``763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-vllm:
    0.29.0-transformers5.15.0-gpu-py312-cu130-ubuntu24.04-v1.0``."""
    from sagemaker.core import image_uris  # several seconds to import: only when needed

    try:
        return image_uris.retrieve(
            framework=INFERENCE_FRAMEWORK,
            region=region,
            instance_type=_INFERENCE_INSTANCE,
            image_scope="inference",
        )
    except (ValueError, KeyError) as err:
        reason = _UPGRADE_HINT.sub("", str(err)).rstrip(".")
        raise InfraConfigError(
            f"context key 'inference_image': no Hugging Face vLLM inference image for {region!r} "
            f"({reason}). Set 'inference_image' to an inference image URI."
        ) from None
