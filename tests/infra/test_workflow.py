"""The state machine construct: logging, tracing, substitutions and its narrow permissions."""

from __future__ import annotations

import fnmatch
import json

import aws_cdk as cdk
import pytest
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk.assertions import Match, Template

from ftstack.infra.definition import PLACEHOLDERS, WorkflowSettings
from ftstack.infra.storage import Storage
from ftstack.infra.layout import Layout
from ftstack.infra.workflow import TASK_ACTIONS, FineTuningWorkflow, WorkflowResources

SETTINGS = WorkflowSettings(region="us-east-1", volume_size_gb=200, max_runtime_s=3600, max_wait_s=7200, max_instance_count=2,
                            network_isolation=True, subnets=("subnet-1",), security_groups=("sg-1",),
                            approval_status="Approved", quality_threshold=None, volume_kms_instance_types=("ml.p3.2xlarge",))


INSTANCE_TYPES = ("ml.p4d.24xlarge", "ml.g5.48xlarge")


def build(stack: cdk.Stack) -> FineTuningWorkflow:
    storage = Storage(stack, "Storage", removal_policy=cdk.RemovalPolicy.RETAIN)
    role = iam.Role(stack, "TrainingRole", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"))
    function = lambda_.Function(stack, "Fn", runtime=lambda_.Runtime.PYTHON_3_14, handler="x.handler", code=lambda_.Code.from_inline("def handler(e, c): pass"))
    return FineTuningWorkflow(
        stack, "Workflow", name="ftstack", layout=Layout(), settings=SETTINGS, job_prefix="ftstack", instance_types=INSTANCE_TYPES,
        resources=WorkflowResources(
            bucket=storage.bucket, key=storage.key, bucket_key=storage.bucket_key, training_role=role,
            training_image="123456789012.dkr.ecr.us-east-1.amazonaws.com/train:1",
            inference_image="763104351884.dkr.ecr.us-east-1.amazonaws.com/tgi:1", staging_function=function,
            model_check=lambda_.Function(stack, "CheckFn", runtime=lambda_.Runtime.PYTHON_3_14, handler="x.handler",
                                         code=lambda_.Code.from_inline("def handler(e, c): pass")),
            topic=sns.Topic(stack, "Topic"), model_package_group="FtStack-Models"),
    )


@pytest.fixture(scope="module")
def template(new_stack) -> Template:
    _, stack = new_stack()
    build(stack)
    return Template.from_stack(stack)


def policy_statements(template: Template) -> list[dict]:
    policies = template.find_resources("AWS::IAM::Policy", {"Properties": {"Roles": [{"Ref": Match.string_like_regexp("WorkflowRole")}]}})
    (policy,) = policies.values()
    return policy["Properties"]["PolicyDocument"]["Statement"]


def test_definition_settings_and_substitutions(template):
    (machine,) = template.find_resources("AWS::StepFunctions::StateMachine").values()
    props = machine["Properties"]
    assert set(props["DefinitionSubstitutions"]) == set(PLACEHOLDERS)
    definition = json.loads(props["DefinitionString"])
    train = definition["States"]["Train"]["Parameters"]
    assert train["EnableNetworkIsolation"] is True and train["VpcConfig"] == {"Subnets": ["subnet-1"], "SecurityGroupIds": ["sg-1"]}
    assert train["OutputDataConfig"]["CompressionType"] == "NONE"
    assert definition["States"]["EncryptVolume"]["Parameters"]["VolumeKmsKeyId"] == "${KeyArn}"
    assert "VolumeKmsKeyId" not in definition["States"]["Resources"]["Parameters"]
    assert "QualityGate" not in definition["States"]
    assert definition["States"]["Register"]["Parameters"]["ModelApprovalStatus"] == "Approved"


def test_logging_and_tracing(template):
    template.has_resource_properties("AWS::StepFunctions::StateMachine", {
        "LoggingConfiguration": {"Level": "ALL", "IncludeExecutionData": True, "Destinations": Match.any_value()},
        "TracingConfiguration": {"Enabled": True},
    })
    template.has_resource_properties("AWS::Logs::LogGroup", {"KmsKeyId": Match.any_value(), "RetentionInDays": 365})


def test_training_jobs_are_limited_to_the_prefix_and_the_allowed_instance_types(template):
    (statement,) = [s for s in policy_statements(template) if "sagemaker:CreateTrainingJob" in s["Action"]]
    assert json.dumps(statement["Resource"]).endswith(':training-job/ftstack--*"]]}')
    assert statement["Condition"] == {"ForAllValues:StringEquals": {"sagemaker:InstanceTypes": list(INSTANCE_TYPES)},
                                      "Null": {"sagemaker:InstanceTypes": "false"}}


def test_assumed_by_step_functions_only_for_this_state_machine(template):
    (role,) = [r for r in template.find_resources("AWS::IAM::Role").values()
               if "states.amazonaws.com" in json.dumps(r["Properties"]["AssumeRolePolicyDocument"])]
    (trust,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert set(trust["Condition"]) == {"StringEquals", "ArnLike"}
    assert set(trust["Condition"]["StringEquals"]) == {"aws:SourceAccount"}
    assert json.dumps(trust["Condition"]["ArnLike"]["aws:SourceArn"]).endswith(':stateMachine:ftstack-workflow"]]}')


def test_the_execution_log_is_kept_when_the_stack_is_deleted(template):
    template.has_resource("AWS::Logs::LogGroup", {"DeletionPolicy": "Retain", "UpdateReplacePolicy": "Retain"})


def test_pass_role_only_to_sagemaker(template):
    (statement,) = [s for s in policy_statements(template) if s["Action"] == "iam:PassRole"]
    assert statement["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}
    assert "Fn::GetAtt" in statement["Resource"]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def allowed_actions(template: Template) -> set[str]:
    return {a for s in policy_statements(template) for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}


def test_every_task_of_the_definition_has_its_actions(template):
    (machine,) = template.find_resources("AWS::StepFunctions::StateMachine").values()
    definition = json.loads(props_definition(machine))
    resources = {s["Resource"] for s in definition["States"].values() if s["Type"] == "Task"}
    assert resources <= set(TASK_ACTIONS), resources - set(TASK_ACTIONS)
    needed = {a for r in resources for a in TASK_ACTIONS[r]}
    allowed = allowed_actions(template)
    missing = {a for a in needed if not any(fnmatch.fnmatchcase(a, pattern) for pattern in allowed)}
    assert missing == set()


def props_definition(machine: dict) -> str:
    return machine["Properties"]["DefinitionString"]


def test_model_package_arns_are_lower_case_as_sagemaker_writes_them(template):
    (packages,) = [s for s in policy_statements(template) if s["Action"] == "sagemaker:CreateModelPackage"]
    text = json.dumps(packages["Resource"])
    assert "model-package-group/ftstack-models" in text and "model-package/ftstack-models/*" in text
    assert "FtStack" not in text


def test_create_grant_only_for_aws_resources(template):
    (grant,) = [s for s in policy_statements(template) if s["Action"] == "kms:CreateGrant"]
    assert grant["Condition"] == {"Bool": {"kms:GrantIsForAWSResource": "true"}}


def test_reads_only_the_final_metrics(template):
    reads = [s for s in policy_statements(template) if any(a.startswith("s3:") for a in as_list(s["Action"]))]
    assert all(s["Action"] == "s3:GetObject" for s in reads), reads
    assert reads and all("/output/model/final-metrics.json" in json.dumps(s["Resource"]) for s in reads)


def test_no_unacknowledged_nag_finding(new_stack, nag_findings):
    app, stack = new_stack("Nag")
    build(stack)
    assert [f for f in nag_findings(app) if "/Workflow/" in f] == []
