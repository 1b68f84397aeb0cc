"""The training image: ``training_code/`` built on the AWS PyTorch training image for the region.

Synth only stages the build context (``.dockerignore`` applies); ``cdk deploy`` builds the image for
linux/amd64 and pushes it to the bootstrap's container-assets repository.
"""

from __future__ import annotations

from aws_cdk import aws_ecr_assets as ecr_assets
from constructs import Construct


class TrainingImage(Construct):
    """A Docker image asset built from ``directory`` with ``--build-arg BASE_IMAGE=<base_image>``."""

    def __init__(self, scope: Construct, construct_id: str, *, directory: str, base_image: str) -> None:
        super().__init__(scope, construct_id)
        if not base_image.strip():
            raise ValueError("base_image is empty: give the image URI the Dockerfile's BASE_IMAGE builds on")
        self.asset = ecr_assets.DockerImageAsset(
            self,
            "Asset",
            directory=directory,
            platform=ecr_assets.Platform.LINUX_AMD64,
            build_args={"BASE_IMAGE": base_image},
            display_name="Training image",
        )
        self.image_uri = self.asset.image_uri
        self.image_tag = self.asset.image_tag
        self.repository = self.asset.repository
