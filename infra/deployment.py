"""Deploy on approval: when a model package of the group is approved, a small workflow checks its
model files against the registered manifest digest and serves it behind the group's one endpoint
(``infra.deploy_definition``), with a serving role that reads only the models."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from ftstack.serving import SUFFIX_CHARS, resource_prefix

from .access import DECRYPT, grant_key, grant_list, grant_objects
from .deploy_definition import DeploySettings, build_deploy_definition, render
from .nag import acknowledge, arn_in_finding, grant_wildcards, in_finding, wildcard

DETAIL_TYPE = "SageMaker Model Package State Change"


def approval_pattern(group_name: str) -> events.EventPattern:
    """Approvals of ``group_name``'s packages only (SageMaker sends an event for every change)."""
    return events.EventPattern(source=["aws.sagemaker"], detail_type=[DETAIL_TYPE],
                               detail={"ModelPackageGroupName": [group_name], "ModelApprovalStatus": ["Approved"]})


class ServingRole(Construct):
    """``self.role``: what SageMaker assumes to serve the pipeline's models: it reads only the
    models (``model_objects``), pulls the image and writes endpoint ``name``'s logs. Both the
    deploy-on-approval workflow and ``ftstack deploy`` (the ``ServingRoleArn`` output) pass it."""

    def __init__(self, scope: Construct, construct_id: str, *, bucket: s3.IBucket, bucket_key: kms.IKey | None,
                 model_objects: str, name: str) -> None:
        super().__init__(scope, construct_id)
        stack = cdk.Stack.of(self)
        role = iam.Role(self, "Role", description=f"ftstack endpoint {name}: read the models, pull the image, log",
                        assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com", conditions={
                            "StringEquals": {"aws:SourceAccount": stack.account}}))
        grant_objects(role, bucket, read=(model_objects,))
        grant_list(role, bucket, model_objects)  # an S3Prefix model source is listed, then copied
        if bucket_key is not None:
            grant_key(role, bucket_key, *DECRYPT)
        repositories = stack.format_arn(service="ecr", account="*", resource="repository", resource_name="*")
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
            resources=[repositories]))
        role.add_to_principal_policy(iam.PolicyStatement(actions=["ecr:GetAuthorizationToken"], resources=["*"]))
        # Any endpoint's: `ftstack deploy --endpoint NAME` serves under a name chosen at deploy time.
        endpoint_logs = stack.format_arn(service="logs", resource="log-group", resource_name="/aws/sagemaker/Endpoints/*",
                                         arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME)
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
            resources=[endpoint_logs]))
        acknowledge(role, {
            wildcard(f"Resource::{in_finding(self, bucket.bucket_arn)}/{model_objects}"): "reads the approved model, whose execution and job are known at run time only",
            wildcard("Resource::" + _any_account(self, arn_in_finding(self, "ecr", "repository/*"))):
                "pulls the package's image, by default the region's Hugging Face vLLM container, kept in an AWS account that differs by region",
            wildcard("Resource::*"): "ecr:GetAuthorizationToken supports no resource scoping",
            wildcard("Resource::" + arn_in_finding(self, "logs", "log-group:/aws/sagemaker/Endpoints/*")):
                "the log groups of the endpoints it serves, named at deploy time (ftstack deploy --endpoint), and their "
                "streams (one per instance); writing logs only",
        })
        self.role = role



class DeployOnApproval(Construct):
    """``self.state_machine`` (started by ``self.rule``), ``self.serving_role``, ``self.function`` (the model check)."""

    def __init__(self, scope: Construct, construct_id: str, *, group_name: str, topic: sns.ITopic, key: kms.IKey,
                 bucket: s3.IBucket, bucket_key: kms.IKey | None, model_objects: str, instance_type: str, name: str,
                 model_check: lambda_.IFunction, serving_role: iam.IRole | None = None) -> None:
        """``key`` encrypts the logs; ``bucket_key`` the bucket's objects (None: S3-managed);
        ``model_objects`` is the key pattern of the models (``executions/*/model/*``); ``name`` is the
        endpoint's, and the start of every physical name here; ``model_check``: the function that
        checks a model against what was registered (``ModelCheckFunction``); ``serving_role``: the
        models' (a ``ServingRole`` is created when none is given)."""
        super().__init__(scope, construct_id)
        stack = cdk.Stack.of(self)
        settings = DeploySettings(endpoint=name, region=stack.region, instance_type=instance_type)
        self.serving_role = serving_role or ServingRole(self, "ServingRole", bucket=bucket, bucket_key=bucket_key,
                                                        model_objects=model_objects, name=name).role
        self.function = model_check
        log_group = logs.LogGroup(self, "Logs", encryption_key=key, retention=logs.RetentionDays.ONE_YEAR,
                                  removal_policy=cdk.RemovalPolicy.RETAIN)
        machine_name = f"{name}-deploy"
        role = iam.Role(self, "Role", description=f"ftstack deploy-on-approval of {group_name}: model, config, endpoint {name}",
                        assumed_by=iam.ServicePrincipal("states.amazonaws.com", conditions={
                            "StringEquals": {"aws:SourceAccount": stack.account},
                            "ArnLike": {"aws:SourceArn": stack.format_arn(
                                service="states", resource="stateMachine", resource_name=machine_name,
                                arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME)}}))
        self.state_machine = sfn.StateMachine(
            self, "StateMachine", role=role, state_machine_name=machine_name,
            definition_body=sfn.DefinitionBody.from_string(render(build_deploy_definition(settings))),
            definition_substitutions={"ModelPackageGroupName": group_name, "ServingRoleArn": self.serving_role.role_arn,
                                      "VerifyFunctionArn": self.function.function_arn, "TopicArn": topic.topic_arn},
            logs=sfn.LogOptions(destination=log_group, level=sfn.LogLevel.ALL, include_execution_data=True),
            tracing_enabled=True,
        )
        self._grant(role, group_name, name, topic)
        # A rule name takes 64 characters, an endpoint name 63: the short prefix keeps it in bounds.
        rule_name = f"{resource_prefix(name)}-approved"
        # Only EventBridge acting for this very rule may start the workflow (confused-deputy
        # prevention, EventBridge user guide); the rule's name is fixed, so its ARN is known.
        rule_arn = stack.format_arn(service="events", resource="rule", resource_name=rule_name)
        events_role = iam.Role(self, "EventsRole", description=f"ftstack: start the deploy workflow of {name}",
                               assumed_by=iam.ServicePrincipal("events.amazonaws.com", conditions={
                                   "StringEquals": {"aws:SourceAccount": stack.account},
                                   "ArnLike": {"aws:SourceArn": rule_arn}}))
        self.rule = events.Rule(self, "Approved", rule_name=rule_name,
                                event_pattern=approval_pattern(group_name),
                                description=f"ftstack: deploy approved models of {group_name} to endpoint {name}",
                                targets=[targets.SfnStateMachine(self.state_machine, role=events_role)])

    def _grant(self, role: iam.IRole, group_name: str, name: str, topic: sns.ITopic) -> None:
        stack = cdk.Stack.of(self)
        prefix = resource_prefix(name).lower()  # SageMaker writes its ARNs in lower case

        def arn(resource: str, resource_name: str) -> str:
            return stack.format_arn(service="sagemaker", resource=resource, resource_name=resource_name)

        packages = arn("model-package", f"{group_name.lower()}/*")
        # Exactly '<prefix>-' and the 32 hex digits of resource_name: with '*' a pipeline whose
        # endpoint name starts another's ('team' and 'team-models') could take that one's names.
        own = f"{prefix}-{'?' * SUFFIX_CHARS}"
        models, configs, endpoint = arn("model", own), arn("endpoint-config", own), arn("endpoint", name.lower())
        for actions, resources in (
            (["sagemaker:DescribeModelPackage"], [packages]),
            (["sagemaker:ListModelPackages"], ["*"]),  # takes no resource (SageMaker's IAM reference)
            (["sagemaker:CreateModel"], [models]),
            (["sagemaker:CreateEndpointConfig"], [configs]),
            (["sagemaker:CreateEndpoint", "sagemaker:UpdateEndpoint"], [endpoint, configs]),
            (["sagemaker:DescribeEndpoint"], [endpoint]),
        ):
            role.add_to_principal_policy(iam.PolicyStatement(actions=actions, resources=resources))
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["iam:PassRole"], resources=[self.serving_role.role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}))
        self.function.grant_invoke(role)
        topic.grant_publish(role)
        acknowledge(role, grant_wildcards("Action::kms:GenerateDataKey*") | {
            wildcard("Resource::" + arn_in_finding(self, "sagemaker", f"model-package/{group_name.lower()}/*")):
                "describes the approved version of the group, known at run time only",
            wildcard(f"Resource::{in_finding(self, self.function.function_arn)}:*"): "grant_invoke covers the function's versions",
            wildcard("Resource::*"): "X-Ray, CloudWatch Logs delivery (the state machine's logging) and sagemaker:ListModelPackages "
                "support no resource scoping",
        })


def _any_account(scope: Construct, finding: str) -> str:
    """``finding`` (an ARN as cdk-nag shows it) with ``*`` for the account, as ``format_arn(account="*")``
    writes it. The partition and account may show as ``<AWS::...>``, colons included: no split on ``:``."""
    account = cdk.Stack.of(scope).account
    shown = "<AWS::AccountId>" if cdk.Token.is_unresolved(account) else account
    head, _, resource = finding.rpartition(f":{shown}:")
    return f"{head}:*:{resource}"
