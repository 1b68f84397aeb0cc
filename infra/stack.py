"""The app's stack: one ``FineTuningPipeline`` made from the ``cdk.json`` configuration, and the
outputs the ``ftstack`` CLI reads. It uses the same public API as any platform team's app."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from constructs import Construct

from .config import InfraConfig
from .pipeline import FineTuningPipeline
from .props import BuiltImage, ExistingNetwork, FineTuningPipelineProps


class FineTuningStack(cdk.Stack):
    """A stack around one pipeline named after the stack (``config.stack_name``).

    The pipeline's construct id is ``Default``, which CDK leaves out of logical ids, so the
    resources keep the ids they had when the stack built them itself."""

    def __init__(self, scope: Construct, construct_id: str, *, config: InfraConfig, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.pipeline = FineTuningPipeline(self, "Default", props_from_config(self, config))
        self.pipeline.add_cli_outputs()


def props_from_config(scope: Construct, config: InfraConfig) -> FineTuningPipelineProps:
    """The pipeline's props from the app's configuration (ids and ARNs become imported objects)."""
    network = None
    if config.vpc_subnet_ids:
        network = ExistingNetwork(
            subnets=tuple(ec2.Subnet.from_subnet_id(scope, f"Subnet{i}", s) for i, s in enumerate(config.vpc_subnet_ids)),
            security_groups=tuple(ec2.SecurityGroup.from_security_group_id(scope, f"SecurityGroup{i}", g, mutable=False)
                                  for i, g in enumerate(config.vpc_security_group_ids)),
        )
    boundary = None
    if config.permissions_boundary:
        boundary = iam.ManagedPolicy.from_managed_policy_arn(scope, "PermissionsBoundary", config.permissions_boundary)
    return FineTuningPipelineProps(
        name=config.stack_name,
        training=config.training,
        removal_policy=cdk.RemovalPolicy.DESTROY if config.removal_policy == "destroy" else cdk.RemovalPolicy.RETAIN,
        notification_emails=config.notification_emails,
        network=network,
        training_image=BuiltImage(base_image=config.base_image, base_image_digest=config.base_image_digest,
                                  pytorch_version=config.pytorch_version, python_version=config.python_version),
        inference_image=config.inference_image,
        deploy_on_approval=config.deploy_on_approval,
        endpoint_instance_type=config.endpoint_instance_type,
        permissions_boundary=boundary,
        role_name_prefix=config.role_name_prefix,
        tags=config.tag_map,
    )
