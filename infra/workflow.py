"""The Step Functions state machine of a fine-tuning run, with its log group and the narrow
permissions its tasks need (the definition is raw ASL, so nothing is generated for it).

``TASK_ACTIONS`` maps each task resource of the definition to the IAM actions it calls; a test
checks that every task of the definition is in it and that the role allows each action."""

from __future__ import annotations

from dataclasses import dataclass

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

from .layout import JOB_MODEL_DIR, Layout
from .access import DECRYPT, grant_key, grant_objects
from .nag import acknowledge, arn_in_finding, grant_wildcards, in_finding, wildcard
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


def final_metrics_objects(layout: Layout) -> str:
    """Every job's final-metrics file: ``<prefix>executions/<execution>/model/<job>/output/model/final-metrics.json``."""
    return f"{layout.model_prefix('*')}*/{JOB_MODEL_DIR}{FINAL_METRICS_FILE}"


def state_machine_name(name: str) -> str:
    """The state machine's name, ``<pipeline name>-workflow``, fixed so that the staging function
    can be told its ARN without a reference to it (the machine refers to the function: a cycle).
    Step Functions takes 80 characters, of 0-9 A-Z a-z - _ when it logs; a pipeline's name has at
    most 40 (``infra.props.NAME``)."""
    return f"{name}-workflow"


def state_machine_arn(stack: cdk.Stack, name: str) -> str:
    """The ARN of pipeline ``name``'s state machine, from its name (see ``state_machine_name``)."""
    return stack.format_arn(service="states", resource="stateMachine", resource_name=state_machine_name(name),
                            arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME)


def execution_arns(stack: cdk.Stack, name: str) -> str:
    """The ARN pattern of every execution of pipeline ``name``'s state machine."""
    return stack.format_arn(service="states", resource="execution", resource_name=f"{state_machine_name(name)}:*",
                            arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME)


def model_package_group_arn(stack: cdk.Stack, group: str, *, packages: bool = False) -> str:
    """The ARN of a model package group (or, with ``packages``, of its versions). SageMaker writes
    these ARNs in lower case whatever the group name's case, and IAM compares ARNs case-sensitively."""
    if packages:
        return stack.format_arn(service="sagemaker", resource="model-package", resource_name=f"{group.lower()}/*")
    return stack.format_arn(service="sagemaker", resource="model-package-group", resource_name=group.lower())


@dataclass(frozen=True)
class WorkflowResources:
    """What the workflow's tasks use, made or brought by the pipeline."""

    bucket: s3.IBucket
    key: kms.IKey
    """Encrypts the workflow's logs and the training volumes."""
    bucket_key: kms.IKey | None
    """Encrypts the model output; None: the bucket's default encryption."""
    training_role: iam.IRole
    training_image: str
    inference_image: str
    staging_function: lambda_.IFunction
    model_check: lambda_.IFunction
    """Pins the model's files before registration (``ModelCheckFunction``)."""
    topic: sns.ITopic
    model_package_group: str


class FineTuningWorkflow(Construct):
    """``self.state_machine``: validate, stage, train, gate, register, notify, with the pipeline's
    extension steps (``extensions``: a state graph per point, ``infra.extensions``) in place."""

    def __init__(
        self, scope: Construct, construct_id: str, *, name: str, layout: Layout, settings: WorkflowSettings,
        resources: WorkflowResources, job_prefix: str, instance_types: tuple[str, ...],
        extension_statements: tuple[iam.PolicyStatement, ...] = (),
    ) -> None:
        """``instance_types``: every instance type a training job of the pipeline may use;
        ``extension_statements``: what the extension steps' tasks need (their state graphs say)."""
        super().__init__(scope, construct_id)
        r = resources
        # Kept when the stack is deleted: the executions' history is the audit trail.
        log_group = logs.LogGroup(self, "Logs", encryption_key=r.key, retention=logs.RetentionDays.ONE_YEAR,
                                  removal_policy=cdk.RemovalPolicy.RETAIN)
        stack = cdk.Stack.of(self)
        # Only Step Functions acting for this very state machine may assume the role (confused-deputy
        # prevention, as the Step Functions developer guide shows it). Its name is fixed, so its ARN
        # is known without a reference to it, which would be a cycle: the machine names the role.
        role = iam.Role(self, "Role", description="ftstack workflow: stage, train, read final metrics, check, register, notify",
                        assumed_by=iam.ServicePrincipal("states.amazonaws.com", conditions={
                            "StringEquals": {"aws:SourceAccount": stack.account},
                            "ArnLike": {"aws:SourceArn": state_machine_arn(stack, name)}}))
        self.state_machine = sfn.StateMachine(
            self, "StateMachine", role=role, state_machine_name=state_machine_name(name),
            # The extension steps' graphs may hold tokens (their functions' ARNs): in a string, CDK
            # resolves them (a join). Python's JSON keeps 2.0 a float, as ASL's BackoffRate wants.
            definition_body=sfn.DefinitionBody.from_string(render(build_definition(settings))),
            definition_substitutions={
                "Bucket": r.bucket.bucket_name, "KeyArn": r.key.key_arn,
                "BucketKeyArn": r.bucket_key.key_arn if r.bucket_key else "",
                "TrainingRoleArn": r.training_role.role_arn, "TrainingImage": r.training_image,
                "InferenceImage": r.inference_image, "StagingFunctionArn": r.staging_function.function_arn,
                "ModelCheckFunctionArn": r.model_check.function_arn,
                "TopicArn": r.topic.topic_arn, "ModelPackageGroupName": r.model_package_group,
            },
            logs=sfn.LogOptions(destination=log_group, level=sfn.LogLevel.ALL, include_execution_data=True),
            tracing_enabled=True,
        )
        for statement in extension_statements:
            role.add_to_principal_policy(statement)
        self._grant(r, layout, job_prefix, instance_types)

    def _grant(self, r: WorkflowResources, layout: Layout, job_prefix: str, instance_types: tuple[str, ...]) -> None:
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
            actions=["iam:PassRole"], resources=[r.training_role.role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:CreateModelPackage"],
            resources=[model_package_group_arn(stack, r.model_package_group),
                       model_package_group_arn(stack, r.model_package_group, packages=True)],
        ))
        # The job's volume and output use the keys; SageMaker creates grants on them, with the
        # caller's credentials, for the job's resources only.
        keys = [r.key] + ([r.bucket_key] if r.bucket_key and r.bucket_key is not r.key else [])
        for key in keys:
            grant_key(role, key, "kms:DescribeKey")
            role.add_to_principal_policy(iam.PolicyStatement(
                actions=["kms:CreateGrant"], resources=[key.key_arn],
                conditions={"Bool": {"kms:GrantIsForAWSResource": "true"}},
            ))
        # Reading the final metrics decrypts (grant_publish adds the data key the encrypted topic needs).
        if r.bucket_key:
            grant_key(role, r.bucket_key, *DECRYPT)
        metrics = final_metrics_objects(layout)
        grant_objects(role, r.bucket, read=(metrics,))
        r.staging_function.grant_invoke(role)
        r.model_check.grant_invoke(role)
        r.topic.grant_publish(role)
        acknowledge(role, grant_wildcards("Action::kms:GenerateDataKey*") | {
            wildcard(f"Resource::{in_finding(self, r.bucket.bucket_arn)}/{metrics}"):
                "reads the final metrics of the execution's job (execution and job names are known at run time only)",
            wildcard("Resource::" + arn_in_finding(self, "sagemaker", "training-job/" + training_jobs(job_prefix))): "job names carry the execution name and attempt, known only at run time",
            wildcard("Resource::" + arn_in_finding(self, "sagemaker", f"model-package/{r.model_package_group.lower()}/*")):
                "each registration creates a new version in the group",
            wildcard(f"Resource::{in_finding(self, r.staging_function.function_arn)}:*"): "grant_invoke covers the function's versions",
            wildcard(f"Resource::{in_finding(self, r.model_check.function_arn)}:*"): "grant_invoke covers the function's versions",
            wildcard("Resource::*"): "X-Ray and CloudWatch Logs delivery (the state machine's logging) support no resource scoping",
        })
