"""The SageMaker execution role: its prefixes, key, image, logs and metrics, nothing else."""

from __future__ import annotations

import json

import aws_cdk as cdk
import pytest
from aws_cdk import aws_ecr as ecr
from aws_cdk.assertions import Match, Template

from ftstack.infra.roles import METRICS_NAMESPACE, TrainingRole
from ftstack.infra.storage import Storage


@pytest.fixture(scope="module")
def template(new_stack) -> Template:
    _, stack = new_stack()
    storage = Storage(stack, "Storage", removal_policy=cdk.RemovalPolicy.RETAIN)
    repository = ecr.Repository(stack, "Repository")
    TrainingRole(stack, "TrainingRole", bucket=storage.bucket, key=storage.key, bucket_key=storage.bucket_key, repository=repository, in_vpc=False, job_prefix="ftstack")
    return Template.from_stack(stack)


def statements(template: Template) -> list[dict]:
    (policy,) = [p for p in template.find_resources("AWS::IAM::Policy").values()]
    return policy["Properties"]["PolicyDocument"]["Statement"]


def test_assumed_by_sagemaker_only_for_this_stacks_jobs(template):
    (role,) = template.find_resources("AWS::IAM::Role").values()
    (trust,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "sagemaker.amazonaws.com"}
    assert set(trust["Condition"]) == {"StringEquals", "ArnLike"}
    assert trust["Condition"]["StringEquals"] == {"aws:SourceAccount": "123456789012"}
    assert json.dumps(trust["Condition"]["ArnLike"]["aws:SourceArn"]).endswith(':sagemaker:us-east-1:123456789012:training-job/ftstack--*"]]}')
    template.resource_properties_count_is("AWS::IAM::Role", {"ManagedPolicyArns": Match.any_value()}, 0)


def test_bucket_access_is_limited_to_the_job_prefixes(template):
    text = json.dumps(statements(template))
    for prefix in ("/scratch/*/data/*", "/scratch/*/checkpoints/*", "/executions/*/model/*", "/base-models/*"):
        assert prefix in text
    assert "/incoming/" not in text, "jobs read staged copies, never the users' uploads"
    for statement in statements(template):
        assert statement["Effect"] == "Allow"
        assert "*" not in (statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]])


def test_wildcard_resources_are_only_those_aws_requires(template):
    star = [s for s in statements(template) if s["Resource"] == "*"]
    actions = sorted(a for s in star for a in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]]))
    assert actions == ["cloudwatch:PutMetricData", "ecr:GetAuthorizationToken"]
    (metrics,) = [s for s in star if s["Action"] == "cloudwatch:PutMetricData"]
    assert metrics["Condition"] == {"StringEquals": {"cloudwatch:namespace": METRICS_NAMESPACE}}


def test_vpc_jobs_get_the_network_interface_actions(new_stack):
    _, stack = new_stack("Vpc")
    storage = Storage(stack, "Storage", removal_policy=cdk.RemovalPolicy.RETAIN)
    TrainingRole(stack, "TrainingRole", bucket=storage.bucket, key=storage.key, bucket_key=storage.bucket_key, repository=ecr.Repository(stack, "Repo"), in_vpc=True, job_prefix="ftstack")
    Template.from_stack(stack).has_resource_properties("AWS::IAM::Policy", {"PolicyDocument": {"Statement": Match.array_with([
        Match.object_like({"Action": Match.array_with(["ec2:CreateNetworkInterface", "ec2:DeleteNetworkInterface"]), "Resource": "*"}),
    ])}})


def test_no_unacknowledged_nag_finding(new_stack, nag_findings):
    app, stack = new_stack("Nag")
    storage = Storage(stack, "Storage", removal_policy=cdk.RemovalPolicy.RETAIN)
    TrainingRole(stack, "TrainingRole", bucket=storage.bucket, key=storage.key, bucket_key=storage.bucket_key, repository=ecr.Repository(stack, "Repo"), in_vpc=False, job_prefix="ftstack")
    assert [f for f in nag_findings(app) if "/TrainingRole/" in f] == []
