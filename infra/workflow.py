"""The Step Functions state machine of a fine-tuning run, with its log group and the narrow
permissions its tasks need (the definition is raw ASL, so nothing is generated for it)."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from . import layout
from .nag import acknowledge, arn_in_finding, arn_of, grant_wildcards, wildcard
from .definition import WorkflowSettings, build_definition, render

SAGEMAKER_SYNC_RULE = "StepFunctionsGetEventsForSageMakerTrainingJobsRule"
"""The EventBridge rule Step Functions manages for ``createTrainingJob.sync``."""


class FineTuningWorkflow(Construct):
    """``self.state_machine``: validate, stage, train, gate, register, notify."""

    def __init__(
        self, scope: Construct, construct_id: str, *, settings: WorkflowSettings, bucket: s3.IBucket, key: kms.IKey,
        training_role: iam.IRole, training_image: str, inference_image: str, staging_function: lambda_.IFunction,
        topic: sns.ITopic, model_package_group: str, job_prefix: str,
    ) -> None:
        super().__init__(scope, construct_id)
        log_group = logs.LogGroup(self, "Logs", encryption_key=key, retention=logs.RetentionDays.ONE_YEAR,
                                  removal_policy=cdk.RemovalPolicy.DESTROY)
        self.state_machine = sfn.StateMachine(
            self, "StateMachine",
            definition_body=sfn.DefinitionBody.from_string(render(build_definition(settings))),
            definition_substitutions={
                "Bucket": bucket.bucket_name, "KeyArn": key.key_arn, "TrainingRoleArn": training_role.role_arn,
                "TrainingImage": training_image, "InferenceImage": inference_image,
                "StagingFunctionArn": staging_function.function_arn, "TopicArn": topic.topic_arn,
                "ModelPackageGroupName": model_package_group,
            },
            logs=sfn.LogOptions(destination=log_group, level=sfn.LogLevel.ALL, include_execution_data=True),
            tracing_enabled=True,
        )
        self._grant(bucket, key, training_role, staging_function, topic, model_package_group, job_prefix)

    def _grant(self, bucket, key, training_role, staging_function, topic, model_package_group: str, job_prefix: str) -> None:
        stack = cdk.Stack.of(self)
        role = self.state_machine.role
        training_jobs = stack.format_arn(service="sagemaker", resource="training-job", resource_name=f"{job_prefix}-*")
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob", "sagemaker:StopTrainingJob", "sagemaker:AddTags"],
            resources=[training_jobs],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["iam:PassRole"], resources=[training_role.role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["events:PutTargets", "events:PutRule", "events:DescribeRule"],
            resources=[stack.format_arn(service="events", resource="rule", resource_name=SAGEMAKER_SYNC_RULE)],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:CreateModelPackage"],
            resources=[
                stack.format_arn(service="sagemaker", resource="model-package-group", resource_name=model_package_group),
                stack.format_arn(service="sagemaker", resource="model-package", resource_name=f"{model_package_group}/*"),
            ],
        ))
        # The job's volume and output use the key; SageMaker takes grants on it for the job.
        key.grant(role, "kms:CreateGrant", "kms:DescribeKey")
        key.grant_encrypt_decrypt(role)
        bucket.grant_read(role, f"{layout.EXECUTIONS}*/model/*")
        staging_function.grant_invoke(role)
        topic.grant_publish(role)
        acknowledge(role, grant_wildcards(
            "Action::s3:GetObject*", "Action::s3:GetBucket*", "Action::s3:List*",
            "Action::kms:GenerateDataKey*", "Action::kms:ReEncrypt*",
        ) | {
            wildcard(f"Resource::{arn_of(bucket)}/{layout.EXECUTIONS}*/model/*"): "reads metrics.json of the execution's job",
            wildcard("Resource::" + arn_in_finding(self, "sagemaker", f"training-job/{job_prefix}-*")): "job names carry the execution name and attempt, known only at run time",
            wildcard("Resource::" + arn_in_finding(self, "sagemaker", f"model-package/{model_package_group}/*")):
                "each registration creates a new version in the group",
            wildcard(f"Resource::{arn_of(staging_function)}:*"): "grant_invoke covers the function's versions",
            wildcard("Resource::*"): "X-Ray and CloudWatch Logs delivery (the state machine's logging) support no resource scoping",
        })
