#!/usr/bin/env python3
"""A platform team's CDK app: two teams' fine-tuning pipelines on what the platform already runs.

- One data bucket for all teams (imported by name), encrypted with the platform's KMS key: each
  team's pipeline works in its own folder (``team-a/``, ``team-b/``) and its IAM is scoped to it.
- One VPC (imported): the training jobs run in its private subnets.
- The organisation's permissions boundary on every role, role names under ``acme-ml-``, and cost
  allocation tags on every resource and every training job.
- Team B evaluates each model with its own evaluation container, as a SageMaker Processing job,
  before the quality gate, which requires an accuracy of at least 0.7.

One stack per team, so that each team's ``ftstack`` CLI finds its pipeline by stack name
(``ftstack start --stack acme-ml-team-b ...``). Synthesize it offline, with cdk-nag's rules:

    pip install "ftstack[infra]"   # or, in this repository: make venv
    npx cdk synth --app "python examples/platform/app.py"

Replace the values of ``PLATFORM`` with your own (or give them with ``-c key=value``).
"""

from __future__ import annotations

import sys

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from cdk_nag import AwsSolutionsChecks
from constructs import Construct

from ftstack.infra import (
    ExistingNetwork, FineTuningPipeline, FineTuningPipelineProps, GateCondition, PropsError, TrainingOptions,
)
from ftstack.infra.nag import acknowledge, in_finding, wildcard

PLATFORM = {
    "account": "123456789012",
    "region": "us-east-1",
    "bucket": "acme-ml-data",
    "bucket_key_arn": "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555",
    "vpc_id": "vpc-0a1b2c3d4e5f60718",
    "availability_zones": "us-east-1a,us-east-1b",
    "private_subnet_ids": "subnet-0a1b2c3d4e5f60718,subnet-0f1e2d3c4b5a69788",
    "private_subnet_route_table_ids": "rtb-0a1b2c3d4e5f60718,rtb-0f1e2d3c4b5a69788",
    "permissions_boundary": "acme-ml-boundary",
    "evaluation_image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/team-b-evaluation:1.4.0",
}
"""What the platform already runs (placeholders: give yours as context values)."""

EVALUATION_OUTPUT = "evaluations/"
"""Where team B's evaluation jobs write, under the team's folder: ``<execution>/metrics.json``."""


def setting(app: cdk.App, key: str) -> str:
    """A platform value: ``-c key=value`` or cdk.json context, else the placeholder above."""
    return app.node.try_get_context(key) or PLATFORM[key]


class TeamStack(cdk.Stack):
    """One team's pipeline in the platform's bucket and VPC, under its boundary."""

    def __init__(self, scope: cdk.App, construct_id: str, *, team: str, evaluate: bool = False, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        app = scope
        bucket = s3.Bucket.from_bucket_name(self, "SharedBucket", setting(app, "bucket"))
        cdk.Annotations.of(bucket).acknowledge_warning(
            "ftstack:ScratchNotExpired", "the platform's own lifecycle rules expire every team's scratch/ folder")
        bucket_key = kms.Key.from_key_arn(self, "SharedBucketKey", setting(app, "bucket_key_arn"))
        vpc = ec2.Vpc.from_vpc_attributes(
            self, "SharedVpc", vpc_id=setting(app, "vpc_id"),
            availability_zones=setting(app, "availability_zones").split(","),
            private_subnet_ids=setting(app, "private_subnet_ids").split(","),
            private_subnet_route_table_ids=setting(app, "private_subnet_route_table_ids").split(","))
        boundary = iam.ManagedPolicy.from_managed_policy_name(self, "Boundary", setting(app, "permissions_boundary"))
        # The boundary reaches every role of the stack, the team's own (the evaluation job's) included.
        iam.PermissionsBoundary.of(self).apply(boundary)
        prefix = f"{team}/"
        evaluation = Evaluation(self, "Evaluation", bucket=bucket, bucket_key=bucket_key, prefix=prefix,
                                image=setting(app, "evaluation_image")) if evaluate else None
        self.pipeline = FineTuningPipeline(self, "Pipeline", FineTuningPipelineProps(
            name=team,
            prefix=prefix,
            bucket=bucket,
            bucket_key=bucket_key,
            network=ExistingNetwork(subnets=tuple(vpc.private_subnets), vpc=vpc),
            permissions_boundary=boundary,
            role_name_prefix="acme-ml-",
            tags={"team": team, "cost-center": "ml-platform"},
            training=TrainingOptions(instance_type="ml.p4d.24xlarge", fallback_instance_types=("ml.g5.48xlarge",),
                                     quality_threshold=2.0),
            evaluate=evaluation.step if evaluation else None,
            gate=(GateCondition("accuracy", at_least=0.7),) if evaluation else (),
            deploy_on_approval=True,
        ))
        if evaluation:
            evaluation.allow(self.pipeline)
        self.pipeline.add_cli_outputs()


class Evaluation(Construct):
    """Team B's evaluation: a SageMaker Processing job of the team's own container reads the model
    and the held-out test set, writes ``metrics.json`` (``{"accuracy": 0.83, ...}``), and the step
    returns ``{"metrics": ...}`` for the gate (ftstack's ``evaluate`` contract)."""

    def __init__(self, scope: Construct, construct_id: str, *, bucket: s3.IBucket, bucket_key: kms.IKey, prefix: str,
                 image: str) -> None:
        super().__init__(scope, construct_id)
        stack = cdk.Stack.of(self)
        self.output = f"{prefix}{EVALUATION_OUTPUT}"
        self.role = iam.Role(self, "JobRole", description="team evaluation jobs: read models and test data, write metrics",
                             assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com", conditions={
                                 "StringEquals": {"aws:SourceAccount": stack.account}}))
        self.bucket = bucket
        self.models, self.test_data = models, test_data = f"{prefix}executions/*/model/*", f"{prefix}scratch/*/data/*"
        self.role.add_to_policy(iam.PolicyStatement(actions=["s3:GetObject"], resources=[
            bucket.arn_for_objects(models), bucket.arn_for_objects(test_data)]))
        self.role.add_to_policy(iam.PolicyStatement(actions=["s3:PutObject"], resources=[bucket.arn_for_objects(f"{self.output}*")]))
        self.role.add_to_policy(iam.PolicyStatement(actions=["s3:ListBucket"], resources=[bucket.bucket_arn], conditions={
            "StringLike": {"s3:prefix": [models, test_data, f"{self.output}*"]}}))
        bucket_key.grant(self.role, "kms:Decrypt", "kms:GenerateDataKey")
        self.role.add_to_policy(iam.PolicyStatement(actions=["ecr:GetAuthorizationToken"], resources=["*"]))
        self.role.add_to_policy(iam.PolicyStatement(
            actions=["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
            resources=[stack.format_arn(service="ecr", resource="repository", resource_name=image.split("/", 1)[1].split(":")[0])]))
        self.role.add_to_policy(iam.PolicyStatement(
            actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
            resources=[stack.format_arn(service="logs", resource="log-group", resource_name="/aws/sagemaker/ProcessingJobs:*",
                                        arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME)]))
        self.step = self._step(bucket, image)

    def _step(self, bucket: s3.IBucket, image: str) -> sfn.IChainable:
        job_name = "States.Format('eval-{}', States.Hash($.execution, 'MD5'))"
        output = f"s3://{bucket.bucket_name}/{self.output}"
        run = sfn.CustomState(self, "RunEvaluation", state_json={
            "Type": "Task",
            # The optimized integration waits for the job (``.sync``).
            "Resource": f"arn:{cdk.Aws.PARTITION}:states:::sagemaker:createProcessingJob.sync",
            "Parameters": {
                "ProcessingJobName.$": job_name,
                "RoleArn": self.role.role_arn,
                "AppSpecification": {"ImageUri": image},
                "ProcessingResources": {"ClusterConfig": {"InstanceCount": 1, "InstanceType": "ml.g5.2xlarge", "VolumeSizeInGB": 100}},
                "StoppingCondition": {"MaxRuntimeInSeconds": 7200},
                "ProcessingInputs": [
                    {"InputName": "model", "S3Input": {"S3Uri.$": "$.model_uri", "LocalPath": "/opt/ml/processing/model",
                                                       "S3DataType": "S3Prefix", "S3InputMode": "File"}},
                    {"InputName": "test", "S3Input": {"S3Uri.$": "$.test.s3_uri", "LocalPath": "/opt/ml/processing/test",
                                                      "S3DataType": "S3Prefix", "S3InputMode": "File"}},
                ],
                "ProcessingOutputConfig": {"Outputs": [{"OutputName": "metrics", "S3Output": {
                    "S3Uri.$": f"States.Format('{output}{{}}/', $.execution)",
                    "LocalPath": "/opt/ml/processing/output", "S3UploadMode": "EndOfJob"}}]},
                "Environment": {"FTSTACK_EXECUTION.$": "$.execution"},
            },
            "ResultSelector": {"output.$": "$.ProcessingOutputConfig.Outputs[0].S3Output.S3Uri"},
            "ResultPath": "$.job",
        })
        read = tasks.CallAwsService(
            self, "ReadEvaluation", service="s3", action="getObject",
            parameters={"Bucket": bucket.bucket_name, "Key.$": f"States.Format('{self.output}{{}}/metrics.json', $.execution)"},
            iam_resources=[bucket.arn_for_objects(f"{self.output}*")],
            result_selector={"metrics.$": "States.StringToJson($.Body)"},
        )
        return run.next(read)

    def allow(self, pipeline: FineTuningPipeline) -> None:
        """What the pipeline's workflow needs to run the job (a CustomState brings no permissions)."""
        stack = cdk.Stack.of(self)
        role = pipeline.state_machine.role
        jobs = stack.format_arn(service="sagemaker", resource="processing-job", resource_name="eval-*")
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:CreateProcessingJob", "sagemaker:DescribeProcessingJob", "sagemaker:StopProcessingJob",
                     "sagemaker:AddTags", "sagemaker:ListTags"], resources=[jobs]))
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["iam:PassRole"], resources=[self.role.role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}))
        # .sync follows the job through this managed rule (Step Functions developer guide, "IAM
        # policies for SageMaker AI": the rule the service creates in the account).
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["events:PutTargets", "events:PutRule", "events:DescribeRule"],
            resources=[stack.format_arn(service="events", resource="rule",
                                        resource_name="StepFunctionsGetEventsForSageMakerProcessingJobsRule")]))
        if pipeline.bucket_key is not None:  # the workflow reads the metrics file
            pipeline.bucket_key.grant(role, "kms:Decrypt")
        acknowledge_evaluation(self, role)


def acknowledge_evaluation(evaluation: Evaluation, workflow_role: iam.IRole) -> None:
    """The team's own cdk-nag acknowledgements: each exact finding, with its reason."""
    stack = cdk.Stack.of(evaluation)
    objects = in_finding(evaluation, evaluation.bucket.bucket_arn)
    per_execution = "per execution under the team's folder, named at run time"
    acknowledge(evaluation.role, {
        wildcard(f"Resource::{objects}/{evaluation.models}"): f"reads the model to evaluate, {per_execution}",
        wildcard(f"Resource::{objects}/{evaluation.test_data}"): f"reads the held-out test set, {per_execution}",
        wildcard(f"Resource::{objects}/{evaluation.output}*"): f"writes its metrics, {per_execution}",
        wildcard("Resource::" + in_finding(evaluation, stack.format_arn(
            service="logs", resource="log-group", resource_name="/aws/sagemaker/ProcessingJobs:*",
            arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME))): "SageMaker names one log stream per processing job and instance",
        wildcard("Resource::*"): "ecr:GetAuthorizationToken supports no resource scoping",
    })
    acknowledge(workflow_role, {
        wildcard(f"Resource::{objects}/{evaluation.output}*"): f"reads the evaluation's metrics, {per_execution}",
        wildcard("Resource::" + in_finding(evaluation, stack.format_arn(
            service="sagemaker", resource="processing-job", resource_name="eval-*"))): "one evaluation job per execution, named at run time",
    })


def build_app(app: cdk.App) -> list[TeamStack]:
    """The two teams' stacks, checked with cdk-nag's AWS Solutions rules."""
    env = cdk.Environment(account=setting(app, "account"), region=setting(app, "region"))
    stacks = [TeamStack(app, "acme-ml-team-a", team="team-a", env=env),
              TeamStack(app, "acme-ml-team-b", team="team-b", evaluate=True, env=env)]
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return stacks


def main() -> int:
    app = cdk.App()
    try:
        build_app(app)
    except PropsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app.synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
