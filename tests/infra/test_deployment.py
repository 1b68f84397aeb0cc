"""DeployOnApproval on a bare stack: the rule's pattern against a real "SageMaker Model Package
State Change" event (matched by moto's EventBridge, not by a matcher written here), the state
machine and its narrow permissions, the serving role, and no unacknowledged cdk-nag finding."""

from __future__ import annotations

import copy
import json

import aws_cdk as cdk
import boto3
import pytest
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk.assertions import Match, Template
from moto import mock_aws

from ftstack.infra.deploy_definition import PLACEHOLDERS, DeploySettings, build_deploy_definition
from ftstack.infra.deployment import DeployOnApproval
from ftstack.infra.model_check_function import ModelCheckFunction
from ftstack.serving import ServingError

GROUP = "ftstack-models"
NAME = "ftstack-serve"
MODELS = "executions/*/model/*"
FOLDERS = "executions/*/model/*/output/model/"

APPROVED_EVENT = {
    # The shape of the example in "Events that Amazon SageMaker AI sends to Amazon EventBridge",
    # section "Model package state change":
    # https://docs.aws.amazon.com/sagemaker/latest/dg/automating-sagemaker-with-eventbridge.html#eventbridge-model-package
    "version": "0",
    "id": "844e2571-85d4-695f-b930-0153b71dcb42",
    "detail-type": "SageMaker Model Package State Change",
    "source": "aws.sagemaker",
    "account": "123456789012",
    "time": "2026-11-29T17:00:14Z",
    "region": "us-east-1",
    "resources": [f"arn:aws:sagemaker:us-east-1:123456789012:model-package/{GROUP}/3"],
    "detail": {
        "ModelPackageGroupName": GROUP,
        "ModelPackageVersion": 3,
        "ModelPackageArn": f"arn:aws:sagemaker:us-east-1:123456789012:model-package/{GROUP}/3",
        "CreationTime": 1796053211000,
        "InferenceSpecification": {
            "Containers": [{"Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-vllm:0.29.0",
                            "ImageDigest": "sha256:" + "a" * 64}],
            "SupportedContentTypes": ["application/json"],
            "SupportedResponseMIMETypes": ["application/json"],
        },
        "ModelApprovalStatus": "Approved",
        "CreatedBy": {},
        "ModelPackageStatus": "Completed",
        "ModelPackageName": GROUP,
    },
}


def make(new_stack, name: str = NAME, bucket_key: bool = True):
    app, stack = new_stack()
    key = kms.Key(stack, "Key", enable_key_rotation=True)
    bucket = s3.Bucket(stack, "Bucket", encryption=s3.BucketEncryption.KMS, encryption_key=key, enforce_ssl=True,
                       server_access_logs_prefix="access/", block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
                       versioned=True)
    topic = sns.Topic(stack, "Topic", master_key=key, enforce_ssl=True)
    check = ModelCheckFunction(stack, "ModelCheck", bucket=bucket, key=key, bucket_key=key if bucket_key else None,
                               model_folders=FOLDERS).function
    deploy = DeployOnApproval(stack, "Deploy", group_name=GROUP, topic=topic, key=key, bucket=bucket,
                              bucket_key=key if bucket_key else None, model_objects=MODELS,
                              instance_type="ml.g5.2xlarge", name=name, model_check=check)
    return app, stack, deploy


@pytest.fixture(scope="module")
def built(new_stack):
    app, stack, deploy = make(new_stack)
    return app, stack, Template.from_stack(stack)


def rule_pattern(template: Template) -> dict:
    (rule,) = template.find_resources("AWS::Events::Rule").values()
    return rule["Properties"]["EventPattern"]


def matches(pattern: dict, event: dict) -> bool:
    """Whether moto's EventBridge delivers ``event`` to a rule with ``pattern``: a rule on the
    default bus, an SQS target, PutEvents, and a look in the queue (moto has no TestEventPattern)."""
    with mock_aws():
        events, sqs = (boto3.client(name, region_name="us-east-1") for name in ("events", "sqs"))
        queue = sqs.create_queue(QueueName="delivered")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events.put_rule(Name="deploy", EventPattern=json.dumps(pattern))
        events.put_targets(Rule="deploy", Targets=[{"Id": "queue", "Arn": queue_arn}])
        sent = events.put_events(Entries=[{"Source": event["source"], "DetailType": event["detail-type"],
                                           "Detail": json.dumps(event["detail"]), "Resources": event["resources"]}])
        assert sent["FailedEntryCount"] == 0
        received = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", [])
        if received:
            assert json.loads(received[0]["Body"])["detail"] == event["detail"]
        return bool(received)


def test_the_rule_matches_an_approval_of_this_group(built):
    assert matches(rule_pattern(built[2]), APPROVED_EVENT)


@pytest.mark.parametrize("change", [
    {"ModelApprovalStatus": "PendingManualApproval"},
    {"ModelApprovalStatus": "Rejected"},
    {"ModelPackageGroupName": "other-models"},
    {"ModelPackageGroupName": GROUP + "-2"},
])
def test_the_rule_ignores_other_groups_and_statuses(built, change):
    event = copy.deepcopy(APPROVED_EVENT)
    event["detail"].update(change)
    assert not matches(rule_pattern(built[2]), event)


def test_the_rule_ignores_other_event_types(built):
    event = copy.deepcopy(APPROVED_EVENT) | {"detail-type": "SageMaker Model State Change"}
    assert not matches(rule_pattern(built[2]), event)


def test_the_rule_starts_the_deploy_state_machine(built):
    template = built[2]
    template.has_resource_properties("AWS::Events::Rule", {
        "Name": f"{NAME}-approved", "State": "ENABLED",
        "Targets": [Match.object_like({"Arn": {"Ref": Match.string_like_regexp("DeployStateMachine")}})],
    })
    template.has_resource_properties("AWS::StepFunctions::StateMachine", {
        "StateMachineName": f"{NAME}-deploy", "TracingConfiguration": {"Enabled": True},
        "DefinitionSubstitutions": Match.object_like({"ModelPackageGroupName": GROUP}),
    })
    (machine,) = template.find_resources("AWS::StepFunctions::StateMachine").values()
    assert set(machine["Properties"]["DefinitionSubstitutions"]) == set(PLACEHOLDERS)


def statements(template: Template, role_fragment: str) -> list[dict]:
    found = []
    for logical_id, policy in template.find_resources("AWS::IAM::Policy").items():
        roles = json.dumps(policy["Properties"]["Roles"])
        if role_fragment in roles:
            found += policy["Properties"]["PolicyDocument"]["Statement"]
    return found


def actions_of(statement: dict) -> list[str]:
    actions = statement["Action"]
    return [actions] if isinstance(actions, str) else actions


def test_the_workflow_role_touches_only_this_endpoint_its_models_and_configs(built):
    found = statements(built[2], "DeployRole")
    by_action = {a: s for s in found for a in actions_of(s)}
    text = json.dumps(by_action["sagemaker:CreateModel"]["Resource"])
    assert f":model/{NAME}-{'?' * 32}\"" in text  # exactly the names resource_name makes
    assert f":endpoint/{NAME}" in json.dumps(by_action["sagemaker:UpdateEndpoint"]["Resource"])
    assert f"model-package/{GROUP}/*" in json.dumps(by_action["sagemaker:DescribeModelPackage"]["Resource"])
    assert by_action["iam:PassRole"]["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}
    everything = {a for s in found for a in actions_of(s)}
    # Nothing that deletes: a failed deployment leaves what served before.
    assert not [a for a in everything if "Delete" in a and not a.startswith("logs:")]  # logs: the machine's log delivery
    assert not [a for a in everything if a.endswith("*") and a != "kms:GenerateDataKey*"]


def test_the_serving_role_reads_only_the_models(built):
    found = statements(built[2], "DeployServingRole")
    reads = [s for s in found if "s3:GetObject" in actions_of(s)]
    assert len(reads) == 1 and f"/{MODELS}" in json.dumps(reads[0]["Resource"])
    listing = [s for s in found if "s3:ListBucket" in actions_of(s)]
    assert listing[0]["Condition"] == {"StringLike": {"s3:prefix": [MODELS]}}
    everything = {a for s in found for a in actions_of(s)}
    assert not [a for a in everything if a.startswith("s3:") and a not in ("s3:GetObject", "s3:ListBucket")]
    assert "kms:Decrypt" in everything and "kms:GenerateDataKey" not in everything


def test_without_a_bucket_key_nothing_decrypts(new_stack):
    _, stack, _ = make(new_stack, bucket_key=False)
    found = statements(Template.from_stack(stack), "DeployServingRole")
    assert not [s for s in found if "kms:Decrypt" in actions_of(s)]


def agnostic_stack() -> tuple[cdk.App, cdk.Stack]:
    """A stack with no account or region: both are tokens at synth."""
    app = cdk.App()
    return app, cdk.Stack(app, "Agnostic")


@pytest.mark.parametrize("env", [True, False], ids=["with-env", "env-agnostic"])
def test_no_unacknowledged_nag_findings(new_stack, nag_findings, env):
    # Env-agnostic: the account and partition show as <AWS::...> in the findings the acknowledgements name.
    app, _, _ = make(new_stack if env else agnostic_stack)
    assert [f for f in nag_findings(app) if "/Deploy/" in f] == []


def test_two_pipelines_in_one_stack_do_not_collide(new_stack):
    app, stack = new_stack()
    key = kms.Key(stack, "Key", enable_key_rotation=True)
    bucket = s3.Bucket(stack, "Bucket", encryption_key=key)
    topic = sns.Topic(stack, "Topic", master_key=key)
    check = ModelCheckFunction(stack, "ModelCheck", bucket=bucket, key=key, bucket_key=key, model_folders=FOLDERS).function
    for construct_id, name in (("A", "team-a"), ("B", "team-b")):
        DeployOnApproval(stack, construct_id, group_name=f"{name}-models", topic=topic, key=key, bucket=bucket,
                         bucket_key=key, model_objects=MODELS, instance_type="ml.g5.2xlarge", name=name, model_check=check)
    template = Template.from_stack(stack)
    names = [r["Properties"]["StateMachineName"] for r in template.find_resources("AWS::StepFunctions::StateMachine").values()]
    rules = [r["Properties"]["Name"] for r in template.find_resources("AWS::Events::Rule").values()]
    assert sorted(names) == ["team-a-deploy", "team-b-deploy"] and sorted(rules) == ["team-a-approved", "team-b-approved"]


def test_the_longest_endpoint_name_gives_names_events_and_step_functions_take(new_stack):
    _, stack, _ = make(new_stack, name="x" * 63)
    template = Template.from_stack(stack)
    ((rule,),) = [list(template.find_resources("AWS::Events::Rule").values())]
    ((machine,),) = [list(template.find_resources("AWS::StepFunctions::StateMachine").values())]
    assert len(rule["Properties"]["Name"]) <= 64 and len(machine["Properties"]["StateMachineName"]) <= 80


@pytest.mark.parametrize("settings, message", [
    ({"endpoint": "bad_name"}, "endpoint name 'bad_name'"),
    ({"endpoint": "x" * 64}, "endpoint name"),
    ({"endpoint": "ok", "instance_type": "ml.m5.large"}, "instance type 'ml.m5.large'"),
])
def test_bad_settings_are_refused_at_synth_with_the_fix(settings, message):
    with pytest.raises(ServingError, match=message):
        build_deploy_definition(DeploySettings(region="us-east-1", **settings))


def test_the_synthesized_definition_is_valid_asl_with_every_placeholder_substituted(built):
    from statelint.linter import Linter

    (machine,) = built[2].find_resources("AWS::StepFunctions::StateMachine").values()
    body = machine["Properties"]["DefinitionString"]
    text = body if isinstance(body, str) else "".join(p if isinstance(p, str) else "0" for p in body["Fn::Join"][1])
    for name in PLACEHOLDERS:
        assert "${" + name + "}" in text  # Step Functions substitutes it from DefinitionSubstitutions
        text = text.replace("${" + name + "}", "arn:aws:sns:us-east-1:123456789012:placeholder")
    assert Linter.validate(json.loads(text)) == []


def test_sagemaker_calls_retry_what_a_throttled_call_is_named():
    """SageMaker's service model declares no ThrottlingException, and an aws-sdk task names an
    error the model does not declare SageMaker.SageMakerException (as infra.training_states.API_RETRY
    says for the training workflow): every SageMaker call retries that, twice, except the endpoint
    lookup, where it also means "no such endpoint" (then CreateEndpoint)."""
    states = build_deploy_definition(DeploySettings(endpoint="ftstack-models", region="us-east-1",
                                                    instance_type="ml.g5.2xlarge"))["States"]
    sagemaker = {name: s for name, s in states.items() if ":aws-sdk:sagemaker:" in s.get("Resource", "")}
    assert {"CreateModel", "CreateEndpointConfig", "FindEndpoint", "CreateEndpoint", "UpdateEndpoint"} <= set(sagemaker)
    for name, state in sagemaker.items():
        retried = {error for retrier in state["Retry"] for error in retrier["ErrorEquals"]}
        assert ("SageMaker.SageMakerException" in retried) == (name != "FindEndpoint"), name
        assert "SageMaker.ThrottlingException" in retried, name


def test_the_model_check_asset_imports_on_its_own(tmp_path):
    """The model-check function's asset, as it is assembled (ASSET_MODULES), runs its handler's
    imports with yaml, torch and transformers unimportable, and every ftstack module it loads is
    the asset's own: a module left out of ASSET_MODULES would fail the first registration."""
    import shutil
    import subprocess
    import sys

    from ftstack.infra import model_check
    from ftstack.infra.assets import lambda_code

    asset = tmp_path / "asset"
    shutil.copytree(lambda_code(model_check.ASSET_MODULES), asset)
    script = f"""
import json, sys
for name in ("yaml", "torch", "transformers"):
    sys.modules[name] = None
sys.path.insert(0, {str(asset)!r})
from ftstack.infra.model_check import handler
try:
    handler({{"check": "neither"}})  # imports what a real check imports, then refuses the event
except ValueError as exc:
    assert "neither" in str(exc), exc
print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items()
      if m is not None and n.split(".")[0] in ("ftstack_train", "ftstack") and getattr(m, "__file__", None))))
"""
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=60,
                          env={"AWS_DEFAULT_REGION": "us-east-1", "PATH": ""})
    assert done.returncode == 0, done.stderr
    files = json.loads(done.stdout)
    assert any(f.endswith("ftstack/s3_model.py") for f in files)
    assert all(f.startswith(str(asset)) for f in files), files
