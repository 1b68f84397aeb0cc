"""The SageMaker execution role of the training jobs: its bucket prefixes, its key, its image,
its log group and metrics, and nothing else."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from . import layout
from .nag import acknowledge, arn_in_finding, arn_of, grant_wildcards, wildcard

TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
METRICS_NAMESPACE = "/aws/sagemaker/TrainingJobs"


class TrainingRole(Construct):
    """``self.role``: assumed by SageMaker for the training jobs of this stack."""

    def __init__(self, scope: Construct, construct_id: str, *, bucket: s3.IBucket, key: kms.IKey, repository: ecr.IRepository, in_vpc: bool) -> None:
        super().__init__(scope, construct_id)
        self.role = iam.Role(self, "Role", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
                             description="ftstack training jobs: staged data, checkpoints, model output, image, logs")
        bucket.grant_read(self.role, f"{layout.SCRATCH}*/data/*")
        bucket.grant_read(self.role, f"{layout.BASE_MODELS}*")
        bucket.grant_read_write(self.role, f"{layout.SCRATCH}*/checkpoints/*")
        bucket.grant_put(self.role, f"{layout.EXECUTIONS}*/model/*")
        # The training volume and the model output are encrypted with the stack's key.
        key.grant_encrypt_decrypt(self.role)
        key.grant(self.role, "kms:DescribeKey")
        # SageMaker creates KMS grants for the job's encrypted volume; only AWS services may use this.
        self.role.add_to_policy(iam.PolicyStatement(
            actions=["kms:CreateGrant"], resources=[key.key_arn],
            conditions={"Bool": {"kms:GrantIsForAWSResource": "true"}},
        ))
        repository.grant_pull(self.role)
        stack = cdk.Stack.of(self)
        self.role.add_to_policy(iam.PolicyStatement(
            actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
            resources=[stack.format_arn(service="logs", resource="log-group", resource_name=f"{TRAINING_LOG_GROUP}:*",
                                        arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME)],
        ))
        self.role.add_to_policy(iam.PolicyStatement(
            actions=["cloudwatch:PutMetricData"], resources=["*"],
            conditions={"StringEquals": {"cloudwatch:namespace": METRICS_NAMESPACE}},
        ))
        if in_vpc:
            self.role.add_to_policy(iam.PolicyStatement(
                actions=["ec2:CreateNetworkInterface", "ec2:CreateNetworkInterfacePermission", "ec2:DeleteNetworkInterface",
                         "ec2:DeleteNetworkInterfacePermission", "ec2:DescribeNetworkInterfaces", "ec2:DescribeVpcs",
                         "ec2:DescribeDhcpOptions", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups"],
                resources=["*"],
            ))
        bucket_arn = arn_of(bucket)
        acknowledge(self.role, grant_wildcards(
            "Action::s3:GetObject*", "Action::s3:GetBucket*", "Action::s3:List*", "Action::s3:Abort*",
            "Action::s3:DeleteObject*", "Action::kms:GenerateDataKey*", "Action::kms:ReEncrypt*",
        ) | {
            wildcard(f"Resource::{bucket_arn}/{layout.SCRATCH}*/data/*"): "staged data of any execution: execution names are chosen at start",
            wildcard(f"Resource::{bucket_arn}/{layout.SCRATCH}*/checkpoints/*"): "checkpoints of any execution (every attempt of one execution shares them)",
            wildcard(f"Resource::{bucket_arn}/{layout.EXECUTIONS}*/model/*"): "model output of any execution",
            wildcard(f"Resource::{bucket_arn}/{layout.BASE_MODELS}*"): "base models uploaded for jobs without network access",
            wildcard("Resource::" + arn_in_finding(self, "logs", f"log-group:{TRAINING_LOG_GROUP}:*")):
                "SageMaker names one log stream per training job and instance",
            wildcard("Resource::*"): "cloudwatch:PutMetricData and ecr:GetAuthorizationToken (and the VPC network-interface "
                "actions) support no resource scoping; PutMetricData is limited to the SageMaker namespace by condition",
        })
