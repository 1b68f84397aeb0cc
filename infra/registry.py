"""The model registry: the SageMaker model package group that fine-tuned models are registered in."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_sagemaker as sagemaker
from constructs import Construct

from .props import GROUP_NAME


class ModelRegistry(Construct):
    """The model package group that the workflow registers each accepted model in."""

    def __init__(self, scope: Construct, construct_id: str, *, group_name: str, description: str) -> None:
        super().__init__(scope, construct_id)
        if not cdk.Token.is_unresolved(group_name) and not GROUP_NAME.match(group_name):
            raise ValueError(
                f"model package group name {group_name!r}: use 1-63 letters, digits or hyphens, "
                "starting and ending with a letter or digit"
            )
        self.group = sagemaker.CfnModelPackageGroup(
            self,
            "Group",
            model_package_group_name=group_name,
            model_package_group_description=description,
        )
        self.group_name = group_name
        self.group_arn = self.group.attr_model_package_group_arn
