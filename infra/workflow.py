"""The Step Functions state machine of a fine-tuning run, with its log group and the narrow
permissions its tasks need (the definition is raw ASL, so nothing is generated for it).

``TASK_ACTIONS`` maps each task resource of the definition to the IAM actions it calls; a test
checks that every task of the definition is in it and that the role allows each action."""

from __future__ import annotations

import hashlib

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from ftstack_train.contract import FINAL_METRICS_FILE

from . import layout
from .layout import JOB_MODEL_DIR
from .access import DECRYPT, grant_key, grant_objects
from .nag import acknowledge, arn_in_finding, arn_of, grant_wildcards, wildcard
from .definition import WorkflowSettings, build_definition, render
from .stage_data.request import training_jobs

TASK_ACTIONS = {
    # CreateTrainingJob with Tags needs AddTags as well (SageMaker's IAM reference).
    "arn:aws:states:::aws-sdk:sagemaker:createTrainingJob": ("sagemaker:CreateTrainingJob", "sagemaker:AddTags"),
    "arn:aws:states:::aws-sdk:sagemaker:describeTrainingJob": ("sagemaker:DescribeTrainingJob",),
    "arn:aws:states:::aws-sdk:sagemaker:createModelPackage": ("sagemaker:CreateModelPackage",),
    "arn:aws:states:::aws-sdk:s3:getObject": ("s3:GetObject",),
    "arn:aws:states:::lambda:invoke": ("lambda:InvokeFunction",),
    "arn:aws:states:::sns:publish": ("sns:Publish",),
}
"""The IAM actions behind each task resource the definition uses."""


FINAL_METRICS_OBJECTS = f"{layout.model_prefix('*')}*/{JOB_MODEL_DIR}{FINAL_METRICS_FILE}"
"""Every job's final-metrics file: ``executions/<execution>/model/<job>/output/model/final-metrics.json``."""


def state_machine_name(stack: cdk.Stack) -> str:
    """The state machine's name, ``<stack>-workflow``, fixed so that the staging function can be
    told its ARN without a reference to it (the machine refers to the function: a cycle). Step
    Functions takes 80 characters, of 0-9 A-Z a-z - _ when it logs; a stack name may be 128."""
    name = stack.stack_name
    if cdk.Token.is_unresolved(name):
        raise ValueError("the workflow's stack needs a concrete stack name (its state machine is named after it)")
    if len(name) > 80 - len("-workflow"):
        name = f"{name[:62]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return f"{name}-workflow"


def state_machine_arn(stack: cdk.Stack) -> str:
    """The workflow's state machine ARN, from its name (see ``state_machine_name``)."""
    return stack.format_arn(service="states", resource="stateMachine", resource_name=state_machine_name(stack),
                            arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME)


def execution_arns(stack: cdk.Stack) -> str:
    """The ARN pattern of every execution of the workflow's state machine."""
    return stack.format_arn(service="states", resource="execution", resource_name=f"{state_machine_name(stack)}:*",
                            arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME)


def model_package_group_arn(stack: cdk.Stack, group: str, *, packages: bool = False) -> str:
    """The ARN of a model package group (or, with ``packages``, of its versions). SageMaker writes
    these ARNs in lower case whatever the group name's case, and IAM compares ARNs case-sensitively."""
    if packages:
        return stack.format_arn(service="sagemaker", resource="model-package", resource_name=f"{group.lower()}/*")
    return stack.format_arn(service="sagemaker", resource="model-package-group", resource_name=group.lower())


class FineTuningWorkflow(Construct):
    """``self.state_machine``: validate, stage, train, gate, register, notify."""

    def __init__(
        self, scope: Construct, construct_id: str, *, settings: WorkflowSettings, bucket: s3.IBucket, key: kms.IKey,
        training_role: iam.IRole, training_image: str, inference_image: str, staging_function: lambda_.IFunction,
        topic: sns.ITopic, model_package_group: str, job_prefix: str, instance_types: tuple[str, ...],
    ) -> None:
        """``instance_types``: every instance type a training job of the stack may use."""
        super().__init__(scope, construct_id)
        # Kept when the stack is deleted: the executions' history is the audit trail.
        log_group = logs.LogGroup(self, "Logs", encryption_key=key, retention=logs.RetentionDays.ONE_YEAR,
                                  removal_policy=cdk.RemovalPolicy.RETAIN)
        stack = cdk.Stack.of(self)
        # Only Step Functions acting for this very state machine may assume the role (confused-deputy
        # prevention, as the Step Functions developer guide shows it). Its name is fixed, so its ARN
        # is known without a reference to it, which would be a cycle: the machine names the role.
        role = iam.Role(self, "Role", description="ftstack workflow: stage, train, read final metrics, register, notify",
                        assumed_by=iam.ServicePrincipal("states.amazonaws.com", conditions={
                            "StringEquals": {"aws:SourceAccount": stack.account},
                            "ArnLike": {"aws:SourceArn": state_machine_arn(stack)}}))
        self.state_machine = sfn.StateMachine(
            self, "StateMachine", role=role, state_machine_name=state_machine_name(stack),
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
        self._grant(bucket, key, training_role, staging_function, topic, model_package_group, job_prefix, instance_types)

    def _grant(self, bucket, key, training_role, staging_function, topic, model_package_group: str, job_prefix: str,
               instance_types: tuple[str, ...]) -> None:
        stack = cdk.Stack.of(self)
        role = self.state_machine.role
        jobs = stack.format_arn(service="sagemaker", resource="training-job", resource_name=training_jobs(job_prefix))
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:CreateTrainingJob"], resources=[jobs],
            # Staging accepts no other instance type either; this holds whatever the input says.
            conditions={"ForAllValues:StringEquals": {"sagemaker:InstanceTypes": list(instance_types)},
                        "Null": {"sagemaker:InstanceTypes": "false"}},
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:DescribeTrainingJob", "sagemaker:AddTags"], resources=[jobs],
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["iam:PassRole"], resources=[training_role.role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:CreateModelPackage"],
            resources=[model_package_group_arn(stack, model_package_group),
                       model_package_group_arn(stack, model_package_group, packages=True)],
        ))
        # The job's volume and output use the key; SageMaker creates grants on it, with the
        # caller's credentials, for the job's resources only.
        # Reading the final metrics decrypts (grant_publish adds the data key the encrypted topic needs).
        grant_key(role, key, "kms:DescribeKey", *DECRYPT)
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["kms:CreateGrant"], resources=[key.key_arn],
            conditions={"Bool": {"kms:GrantIsForAWSResource": "true"}},
        ))
        grant_objects(role, bucket, read=(FINAL_METRICS_OBJECTS,))
        staging_function.grant_invoke(role)
        topic.grant_publish(role)
        acknowledge(role, grant_wildcards("Action::kms:GenerateDataKey*") | {
            wildcard(f"Resource::{arn_of(bucket)}/{FINAL_METRICS_OBJECTS}"):
                "reads the final metrics of the execution's job (execution and job names are known at run time only)",
            wildcard("Resource::" + arn_in_finding(self, "sagemaker", "training-job/" + training_jobs(job_prefix))): "job names carry the execution name and attempt, known only at run time",
            wildcard("Resource::" + arn_in_finding(self, "sagemaker", f"model-package/{model_package_group.lower()}/*")):
                "each registration creates a new version in the group",
            wildcard(f"Resource::{arn_of(staging_function)}:*"): "grant_invoke covers the function's versions",
            wildcard("Resource::*"): "X-Ray and CloudWatch Logs delivery (the state machine's logging) support no resource scoping",
        })
