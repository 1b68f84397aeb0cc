"""The SageMaker execution role of the training jobs: its bucket prefixes, its key, its image,
its log group and metrics, and nothing else."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from .layout import Layout
from .access import ENCRYPT_OBJECTS, grant_key, grant_list, grant_objects
from .nag import acknowledge, arn_in_finding, in_finding, wildcard
from .stage_data.request import training_jobs

TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
METRICS_NAMESPACE = "/aws/sagemaker/TrainingJobs"
SHARED_ROLE = ("one role serves every training job of the stack (SageMaker takes no per-job session policy), and "
               "execution names are chosen at start: ")


class TrainingRole(Construct):
    """``self.role``: assumed by SageMaker for the training jobs of this stack."""

    def __init__(self, scope: Construct, construct_id: str, *, bucket: s3.IBucket, key: kms.IKey, repository: ecr.IRepository,
                 bucket_key: kms.IKey | None, in_vpc: bool, job_prefix: str, layout: Layout = Layout()) -> None:
        """``key`` encrypts the training volumes; ``bucket_key`` the bucket's objects (None: the
        bucket's default encryption, which needs no grant of ours)."""
        super().__init__(scope, construct_id)
        stack = cdk.Stack.of(self)
        # Only SageMaker acting for this stack's training jobs may assume the role (confused-deputy
        # prevention, "Cross-service confused deputy prevention" in the SageMaker developer guide).
        # Training job ARNs are lower case, as is the job prefix.
        jobs = stack.format_arn(service="sagemaker", resource="training-job", resource_name=training_jobs(job_prefix))
        self.role = iam.Role(self, "Role", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com", conditions={
            "StringEquals": {"aws:SourceAccount": stack.account}, "ArnLike": {"aws:SourceArn": jobs}}),
            description="ftstack training jobs: staged data, checkpoints, model output, image, logs")
        data, checkpoints = f"{layout.scratch}*/data/*", f"{layout.scratch}*/checkpoints/*"
        models, outputs = f"{layout.base_models}*", f"{layout.executions}*/model/*"
        grant_objects(self.role, bucket, read=(data, models, checkpoints), write=(checkpoints, outputs),
                      delete=(checkpoints,))  # SageMaker's checkpoint sync mirrors pruned checkpoints
        grant_list(self.role, bucket, data, models, checkpoints, f"{layout.scratch}*/checkpoints", outputs)
        if bucket_key is not None:
            # kms:Encrypt: OutputDataConfig.KmsKeyId's documentation asks the execution role for it.
            grant_key(self.role, bucket_key, *ENCRYPT_OBJECTS, "kms:Encrypt", "kms:DescribeKey")
        grant_key(self.role, key, "kms:DescribeKey")
        # SageMaker creates KMS grants for the job's encrypted volume; only AWS services may use this.
        self.role.add_to_policy(iam.PolicyStatement(
            actions=["kms:CreateGrant"], resources=[key.key_arn],
            conditions={"Bool": {"kms:GrantIsForAWSResource": "true"}},
        ))
        repository.grant_pull(self.role)
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
        bucket_arn = in_finding(self, bucket.bucket_arn)
        acknowledge(self.role, {
            wildcard(f"Resource::{bucket_arn}/{data}"): SHARED_ROLE + "staged data of any execution",
            wildcard(f"Resource::{bucket_arn}/{checkpoints}"): SHARED_ROLE + "checkpoints of any execution (its attempts share them)",
            wildcard(f"Resource::{bucket_arn}/{outputs}"): SHARED_ROLE + "model output of any execution; registered "
                "packages carry the SHA-256 of their model's manifest, so a later overwrite is detected",
            wildcard(f"Resource::{bucket_arn}/{models}"): "base models uploaded for jobs without network access",
            wildcard("Resource::" + arn_in_finding(self, "logs", f"log-group:{TRAINING_LOG_GROUP}:*")):
                "SageMaker names one log stream per training job and instance",
            wildcard("Resource::*"): "cloudwatch:PutMetricData and ecr:GetAuthorizationToken (and the VPC network-interface "
                "actions) support no resource scoping; PutMetricData is limited to the SageMaker namespace by condition",
        })
