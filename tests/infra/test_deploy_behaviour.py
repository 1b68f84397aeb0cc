"""The deploy-on-approval workflow as Step Functions runs it: the definition DeployOnApproval
deploys, executed in moto's interpreter with its real Parameters, Choices and Catches.

Every request is checked against botocore's model of its API (``aws_contract``). The model check
is the real Lambda handler, run in-process against moto's versioned S3 holding a model folder and
its manifest, pinned as the training workflow pins it; SageMaker answers with responses of the API's real shape, scripted per scenario:
a first deployment, an update, an update that fails and rolls back, a package of another group.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from moto import mock_aws

from ftstack.infra.deploy_definition import PLACEHOLDERS, DeploySettings, build_deploy_definition, render
from ftstack.infra.model_check import handler as model_check
from ftstack.s3_model import VERSIONS_SHA256, pin_s3_model
from ftstack.serving import ENV_TENSOR_PARALLEL, production_variant, resource_name, resource_prefix, vllm_environment
from ftstack_train.manifest import ModelIntegrityError, manifest_bytes

from aws_contract import (
    AwsCalls, AwsError, arn_answer, created_config, endpoint_answer, endpoint_missing, lambda_invoke, operation, problems, run_execution,
)
from test_workflow_behaviour import step_functions_as_documented  # noqa: F401 (an autouse fixture)

ACCOUNT, REGION, BUCKET, GROUP, ENDPOINT = "123456789012", "us-east-1", "ftstack-bucket", "ftstack-models", "ftstack-serve"
SETTINGS = DeploySettings(endpoint=ENDPOINT, region=REGION, instance_type="ml.g5.12xlarge", poll_seconds=0)
PACKAGE_ARN = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{GROUP}/3"
IMAGE = f"763104351884.dkr.ecr.{REGION}.amazonaws.com/huggingface-vllm:0.29.0-transformers5.15.0-gpu-py312-cu130-ubuntu24.04-v1.0"
MODEL_PREFIX = "executions/run1/model/ftstack-run1-abc-a0/output/model/"
FILES = {"config.json": b'{"model_type": "mpt"}', "model.safetensors": b"\0" * 64, "chat_template.jinja": b"{{ x }}"}
MANIFEST = manifest_bytes({name: {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)} for name, body in FILES.items()})
DIGEST = hashlib.sha256(MANIFEST).hexdigest()
VALUES = {
    "ModelPackageGroupName": GROUP,
    "ServingRoleArn": f"arn:aws:iam::{ACCOUNT}:role/ftstack-Serving",
    "VerifyFunctionArn": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:ftstack-ModelCheck",
    "TopicArn": f"arn:aws:sns:{REGION}:{ACCOUNT}:ftstack-Notifications",
}
EVENT = {"version": "0", "detail-type": "SageMaker Model Package State Change", "source": "aws.sagemaker",
         "account": ACCOUNT, "region": REGION, "resources": [PACKAGE_ARN],
         "detail": {"ModelPackageGroupName": GROUP, "ModelPackageArn": PACKAGE_ARN, "ModelApprovalStatus": "Approved"}}


def test_the_scripted_values_are_what_aws_takes():
    assert set(VALUES) == set(PLACEHOLDERS)
    shape = operation("sagemaker", "CreateModel").input_shape
    assert problems(shape.members["ExecutionRoleArn"], VALUES["ServingRoleArn"]) == []
    assert problems(shape.members["PrimaryContainer"].members["Image"], IMAGE) == []


REGISTERED: dict[str, str] = {}
"""What the training workflow's CheckModel step returned for the model run() uploads: its
``model_versions_sha256``, which registration records."""


def package(group: str = GROUP, status: str = "Approved", digest: str = DIGEST, versions: str | None = None,
            modified: str | None = None):
    """DescribeModelPackage's answer; ``modified``: its LastModifiedTime (not a required member)."""
    def describe(request: dict) -> dict:
        return ({"LastModifiedTime": modified} if modified else {}) | {
            "ModelPackageName": group, "ModelPackageGroupName": group, "ModelPackageVersion": 3,
            "ModelPackageArn": request["ModelPackageName"], "CreationTime": "2026-11-29T10:00:00Z",
            "ModelPackageStatus": "Completed", "ModelApprovalStatus": status,
            "ModelPackageStatusDetails": {"ValidationStatuses": [], "ImageScanStatuses": []},
            "InferenceSpecification": {
                "Containers": [{"Image": IMAGE, "Environment": vllm_environment(max_model_len=2048),
                                "ModelDataSource": {"S3DataSource": {"S3Uri": f"s3://{BUCKET}/{MODEL_PREFIX}",
                                                                     "S3DataType": "S3Prefix", "CompressionType": "None"}}}],
                "SupportedContentTypes": ["application/json"], "SupportedResponseMIMETypes": ["application/json"]},
            "CustomerMetadataProperties": {"model_manifest_sha256": digest, "training_job": "ftstack-run1-abc-a0",
                                           VERSIONS_SHA256: versions or REGISTERED[VERSIONS_SHA256]},
        }
    return describe


def endpoint(status: str, config: str | None = None, reason: str | None = None):
    """DescribeEndpoint answers: ``config`` None means the config this execution created."""
    return endpoint_answer(status, config or created_config(lambda: calls_made), reason,
                           arn=f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{ENDPOINT}")


missing = endpoint_missing


def arn_of(kind: str, key: str, resource: str):
    return arn_answer(kind, key, f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:{resource}")


invoke_model_check = lambda_invoke(model_check, (ModelIntegrityError,), {"AWS_DEFAULT_REGION": REGION})
"""The real handler on the Invoke request, against moto's S3."""


calls_made: AwsCalls


def newest(arn: str = PACKAGE_ARN):
    """ListModelPackages' answer: ``arn`` is the group's newest approved package."""
    return lambda request: {"ModelPackageSummaryList": [
        {"ModelPackageArn": arn, "CreationTime": "2026-11-29T10:00:00Z", "ModelPackageStatus": "Completed",
         "ModelPackageGroupName": request["ModelPackageGroupName"], "ModelApprovalStatus": "Approved"}]}


def run(answers: dict, *, change: Callable[[Any], None] | None = None, event: dict = EVENT) -> tuple[dict, list[dict], AwsCalls]:
    """Runs the workflow on ``event`` with the model uploaded and pinned as the training workflow
    leaves it, after ``change(s3)`` (if given) has done to the folder what someone did since."""
    global calls_made
    scripted = {
        ("lambda", "Invoke"): [invoke_model_check],
        ("sagemaker", "DescribeModelPackage"): [package()],
        ("sagemaker", "ListModelPackages"): [newest()],
        ("sagemaker", "CreateModel"): [arn_of("Model", "ModelName", "model")],
        ("sagemaker", "CreateEndpointConfig"): [arn_of("EndpointConfig", "EndpointConfigName", "endpoint-config")],
        ("sagemaker", "CreateEndpoint"): [arn_of("Endpoint", "EndpointName", "endpoint")],
        ("sagemaker", "UpdateEndpoint"): [arn_of("Endpoint", "EndpointName", "endpoint")],
        ("sns", "Publish"): [lambda request: {"MessageId": "m-1"}],
    } | answers
    built = build_deploy_definition(SETTINGS)
    for state in built["States"].values():  # seconds between retries are the point on AWS, not here
        for retrier in state.get("Retry", []):
            retrier.update(IntervalSeconds=1, BackoffRate=1.0)
    text = render(built)
    for name, value in VALUES.items():
        text = text.replace("${" + name + "}", value)
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}), AwsCalls(scripted) as calls:
        calls_made = calls
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        for name, body in {**FILES, "model-manifest.json": MANIFEST, "final-metrics.json": b"{}"}.items():
            s3.put_object(Bucket=BUCKET, Key=MODEL_PREFIX + name, Body=body)
        REGISTERED[VERSIONS_SHA256] = pin_s3_model(s3, f"s3://{BUCKET}/{MODEL_PREFIX}", DIGEST)[VERSIONS_SHA256]
        if change:
            change(s3)
        sfn = boto3.client("stepfunctions", region_name=REGION)
        machine = sfn.create_state_machine(name=f"{ENDPOINT}-deploy", definition=text, roleArn=f"arn:aws:iam::{ACCOUNT}:role/sfn")
        result, events, execution = run_execution(sfn, machine["stateMachineArn"], "approval-3", event)
    assert calls.problems() == []
    return result | {"executionArn": execution}, events, calls


def sagemaker(calls: AwsCalls) -> list[str]:
    """The SageMaker operations the workflow called, in order."""
    return [c.operation for c in calls.calls if c.service == "sagemaker"]


def message(calls: AwsCalls) -> str:
    (publish,) = calls.of("sns", "Publish")
    return publish.params["Message"]


def test_a_first_approval_creates_the_model_config_and_endpoint_and_says_how_to_invoke_it():
    result, _, calls = run({("sagemaker", "DescribeEndpoint"): [missing, endpoint("Creating"), endpoint("InService")]})
    assert result["status"] == "SUCCEEDED", result
    (model,) = calls.of("sagemaker", "CreateModel")
    name = model.params["ModelName"]
    assert re.fullmatch(f"{resource_prefix(ENDPOINT)}-[0-9a-f]{{32}}", name)
    container = model.params["PrimaryContainer"]
    assert container["Image"] == IMAGE
    assert container["ModelDataSource"]["S3DataSource"] == {"S3Uri": f"s3://{BUCKET}/{MODEL_PREFIX}", "S3DataType": "S3Prefix",
                                                            "CompressionType": "None"}
    # The package's environment, with one tensor-parallel shard per GPU of the instance type (4 x A10G).
    assert container["Environment"] == vllm_environment(max_model_len=2048) | {ENV_TENSOR_PARALLEL: "4"}
    assert model.params["ExecutionRoleArn"] == VALUES["ServingRoleArn"] and model.params["EnableNetworkIsolation"] is True
    (config,) = calls.of("sagemaker", "CreateEndpointConfig")
    (variant,) = config.params["ProductionVariants"]
    assert config.params["EndpointConfigName"] == name
    assert variant == production_variant("ml.g5.12xlarge") | {"ModelName": name}  # the CUDA 13 host image included
    (create,) = calls.of("sagemaker", "CreateEndpoint")
    assert create.params == {"EndpointName": ENDPOINT, "EndpointConfigName": name}
    assert calls.of("sagemaker", "UpdateEndpoint") == []
    text = message(calls)
    assert PACKAGE_ARN in text and f"endpoint {ENDPOINT}" in text
    assert f"aws sagemaker-runtime invoke-endpoint --region {REGION} --endpoint-name {ENDPOINT}" in text


def test_a_later_approval_updates_the_endpoint_to_a_config_of_its_own():
    old = resource_name(ENDPOINT, "an earlier execution")
    result, _, calls = run({("sagemaker", "DescribeEndpoint"): [
        endpoint("InService", old), endpoint("Updating", old), endpoint("InService")]})
    assert result["status"] == "SUCCEEDED", result
    (update,) = calls.of("sagemaker", "UpdateEndpoint")
    assert update.params["EndpointName"] == ENDPOINT and update.params["EndpointConfigName"] != old
    assert calls.of("sagemaker", "CreateEndpoint") == []
    assert "serves at endpoint" in message(calls)


def test_a_failed_update_is_reported_and_the_old_endpoint_keeps_serving():
    old = resource_name(ENDPOINT, "an earlier execution")
    reason = "The primary container for production variant AllTraffic did not pass the ping health check."
    result, _, calls = run({("sagemaker", "DescribeEndpoint"): [
        endpoint("InService", old), endpoint("Updating", old), endpoint("InService", old, reason)]})
    assert result["status"] == "FAILED" and result["error"] == "EndpointFailed", result
    assert reason in message(calls) and "serves as it did" in message(calls)
    # Nothing was deleted or changed after the rollback: the old config still serves.
    assert [op for op in sagemaker(calls) if op.startswith("Delete")] == []
    assert len(calls.of("sagemaker", "UpdateEndpoint")) == 1


def test_a_failed_first_endpoint_is_reported_with_its_reason():
    result, _, calls = run({("sagemaker", "DescribeEndpoint"): [
        missing, endpoint("Creating"), endpoint("Failed", reason="CUDA out of memory")]})
    assert result["status"] == "FAILED" and result["cause"] == "CUDA out of memory", result
    assert "CUDA out of memory" in message(calls)


def test_an_approval_in_another_group_is_ignored():
    result, _, calls = run({("sagemaker", "DescribeModelPackage"): [package(group="other-models")]},
                           event=EVENT | {"detail": EVENT["detail"] | {"ModelPackageGroupName": "other-models"}})
    assert result["status"] == "SUCCEEDED"
    assert sagemaker(calls) == ["DescribeModelPackage"] and calls.of("lambda", "Invoke") == []


def test_a_package_rejected_since_the_event_is_ignored():
    result, _, calls = run({("sagemaker", "DescribeModelPackage"): [package(status="Rejected")]})
    assert result["status"] == "SUCCEEDED"
    assert sagemaker(calls) == ["DescribeModelPackage"] and calls.of("lambda", "Invoke") == []


def put(name: str, body: bytes) -> Callable[[Any], None]:
    return lambda s3: s3.put_object(Bucket=BUCKET, Key=MODEL_PREFIX + name, Body=body)


CHANGED = "objects were added, deleted or overwritten after registration"


@pytest.mark.parametrize("change, digest, found", [
    (None, "0" * 64, "is not the registered"),                                                # another manifest registered
    # Other weights of the same shape: the same size, so only the object's version tells.
    (put("model.safetensors", b"\1" * 64), DIGEST, f"(model.safetensors written more than once): {CHANGED}"),
    (put("model.safetensors", b"\0" * 63), DIGEST, "(model.safetensors written more than once)"),
    (put("extra.safetensors", b"\0"), DIGEST, CHANGED),                                        # a file slipped in
    (lambda s3: s3.delete_object(Bucket=BUCKET, Key=MODEL_PREFIX + "config.json"), DIGEST, "(config.json written more than once)"),
])
def test_a_model_that_is_not_what_was_registered_is_not_deployed(change, digest, found):
    result, _, calls = run({("sagemaker", "DescribeModelPackage"): [package(digest=digest)]}, change=change)
    assert result["status"] == "FAILED" and result["error"] == "ModelIntegrityError", result
    assert found in message(calls)
    assert sagemaker(calls) == ["DescribeModelPackage", "ListModelPackages"]  # nothing created


def test_the_model_check_is_asked_for_the_registered_versions():
    result, _, calls = run({("sagemaker", "DescribeEndpoint"): [missing, endpoint("InService")]})
    assert result["status"] == "SUCCEEDED", result
    (check,) = calls.of("lambda", "Invoke")
    assert json.loads(check.params["Payload"]) == {
        "check": "deployment", "model_uri": f"s3://{BUCKET}/{MODEL_PREFIX}", "manifest_sha256": DIGEST,
        VERSIONS_SHA256: REGISTERED[VERSIONS_SHA256]}


def test_a_refused_update_is_reported_without_touching_the_endpoint():
    def refused(request):  # an update is blue/green: it needs the instances twice over for a while
        raise AwsError("ResourceLimitExceeded", "The account-level service limit 'ml.g5.12xlarge for endpoint usage' is 1 "
                       "Instances, with current utilization of 1 Instances and a request delta of 1 Instances.")

    old = resource_name(ENDPOINT, "an earlier execution")
    result, _, calls = run({("sagemaker", "DescribeEndpoint"): [endpoint("InService", old)],
                            ("sagemaker", "UpdateEndpoint"): [refused]})
    assert result["status"] == "FAILED"
    assert "ml.g5.12xlarge for endpoint usage" in message(calls) and f"ftstack deploy {PACKAGE_ARN}" in message(calls)
    assert len(calls.of("sagemaker", "UpdateEndpoint")) == 1


# --- several deployments at once ------------------------------------------------------------------

def already_exists(kind: str):
    def refuse(request: dict) -> dict:
        name = request.get("ModelName") or request.get("EndpointName")
        raise AwsError("ValidationException", f'Cannot create already existing {kind} "arn:aws:sagemaker:{REGION}:{ACCOUNT}:{kind}/{name}".')
    return refuse


def test_the_names_are_the_package_changes_so_a_duplicate_event_serves_the_same_and_updates_nothing():
    """SageMaker may send several events for one change of a package: each execution names the
    model and config after that change. One that finds them made (by the other execution, or by a
    call of its own that failed after it took effect) goes on with them, and finding the endpoint
    on that config already, waits for it to serve, as the other does."""
    names = []
    for answers in ({}, {("sagemaker", "DescribeModelPackage"): [package(modified="2026-11-29T11:00:00Z")]},
                    {("sagemaker", "DescribeModelPackage"): [package(modified="2026-11-29T12:00:00Z")]}):
        _, _, calls = run(answers | {("sagemaker", "DescribeEndpoint"): [missing, endpoint("InService")]})
        names.append(calls.of("sagemaker", "CreateModel")[0].params["ModelName"])
    assert len(set(names)) == 3  # each change (created; approved at 11:00; approved again at 12:00) its own
    result, _, calls = run({("sagemaker", "CreateModel"): [already_exists("model")],
                            ("sagemaker", "CreateEndpointConfig"): [already_exists("endpoint-config")],
                            ("sagemaker", "DescribeEndpoint"): [endpoint("Updating"), endpoint("InService")]})
    assert result["status"] == "SUCCEEDED", result
    assert calls.of("sagemaker", "CreateModel")[0].params["ModelName"] == names[0]  # the same change, the same name
    assert calls.of("sagemaker", "UpdateEndpoint") == [] and calls.of("sagemaker", "CreateEndpoint") == []
    assert "serves at endpoint" in message(calls)


@pytest.mark.parametrize("refused", ["CreateModel", "CreateEndpointConfig"])
def test_a_create_refused_for_another_reason_is_reported(refused):
    def quota(request):
        raise AwsError("ResourceLimitExceeded", "The account-level service limit 'Number of models' is 1000 Models")

    result, _, calls = run({("sagemaker", refused): [quota]})
    assert result["status"] == "FAILED", result
    assert "'Number of models'" in message(calls) and calls.of("sagemaker", "CreateEndpoint") == []


@pytest.mark.parametrize("busy", ["Updating", "RollingBack", "SystemUpdating"])
def test_an_endpoint_being_updated_by_another_deployment_is_waited_for_then_updated(busy):
    old = resource_name(ENDPOINT, "an earlier execution")
    result, _, calls = run({("sagemaker", "DescribeEndpoint"): [
        endpoint(busy, old), endpoint("InService", old), endpoint("InService")]})
    assert result["status"] == "SUCCEEDED", result
    assert sagemaker(calls).count("ListModelPackages") == 2  # still the newest once the endpoint was free
    (update,) = calls.of("sagemaker", "UpdateEndpoint")
    assert update.params["EndpointConfigName"] == calls.of("sagemaker", "CreateEndpointConfig")[0].params["EndpointConfigName"]


def test_a_package_no_longer_the_newest_once_the_endpoint_is_free_is_not_deployed():
    newer = PACKAGE_ARN[:-1] + "4"
    result, _, calls = run({("sagemaker", "DescribeEndpoint"): [endpoint("Creating", "another")],
                            ("sagemaker", "ListModelPackages"): [newest(), newest(newer)]})
    assert result["status"] == "SUCCEEDED", result
    assert calls.of("sagemaker", "UpdateEndpoint") == [] and calls.of("sagemaker", "CreateEndpoint") == []


def test_a_deployment_a_newer_package_took_over_from_ends_quietly():
    """A newer package's deployment waited for this one, then updated the endpoint before this
    one saw it serve: not a failure of this one."""
    newer = PACKAGE_ARN[:-1] + "4"
    result, _, calls = run({("sagemaker", "DescribeEndpoint"): [missing, endpoint("InService", "newer-config")],
                            ("sagemaker", "ListModelPackages"): [newest(), newest(newer)]})
    assert result["status"] == "SUCCEEDED", result
    assert calls.of("sns", "Publish") == []


def test_an_endpoint_on_another_config_without_a_reason_is_a_failure_while_the_package_is_the_newest():
    result, _, calls = run({("sagemaker", "DescribeEndpoint"): [missing, endpoint("InService", "other-config")]})
    assert result["status"] == "FAILED" and result["error"] == "EndpointFailed", result
    assert "the endpoint is InService on config other-config" in message(calls)


def test_an_answer_without_its_optional_config_name_is_reported_not_left_to_a_runtime_error():
    """EndpointConfigName is not a required member of DescribeEndpoint's answer: the workflow asks
    whether it is there before it reads it, and notifies."""
    def bare(request):
        return {k: v for k, v in endpoint("InService")(request).items() if k != "EndpointConfigName"}

    result, _, calls = run({("sagemaker", "DescribeEndpoint"): [missing, bare]})
    assert result["status"] == "FAILED" and result["error"] == "EndpointFailed", result
    assert "the endpoint is InService, not on config" in message(calls)


@pytest.mark.parametrize("refusal", [
    ("UpdateEndpoint", AwsError("ValidationException", f'Cannot update in-progress endpoint "arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{ENDPOINT}".')),
    ("CreateEndpoint", None),
])
def test_an_endpoint_taken_between_the_lookup_and_the_call_is_waited_for(refusal):
    operation_name, error = refusal
    old = resource_name(ENDPOINT, "an earlier execution")
    first = [endpoint("InService", old)] if operation_name == "UpdateEndpoint" else [missing]

    def refuse(request):
        raise error

    # Three refusals: a ValidationException is a SageMakerException to Step Functions, tried three times.
    answers = {("sagemaker", "DescribeEndpoint"): first + [endpoint("InService", "another"), endpoint("InService")],
               ("sagemaker", operation_name): [refuse if error else already_exists("endpoint")] * 3 + [
                   arn_of("Endpoint", "EndpointName", "endpoint")]}
    if operation_name == "CreateEndpoint":
        answers[("sagemaker", "UpdateEndpoint")] = [arn_of("Endpoint", "EndpointName", "endpoint")]
    result, _, calls = run(answers)
    assert result["status"] == "SUCCEEDED", result
    assert sagemaker(calls)[-2:] == ["UpdateEndpoint", "DescribeEndpoint"]


def test_a_throttled_endpoint_lookup_is_asked_again():
    def throttled(request):  # as Step Functions names it: SageMaker's model declares no ThrottlingException
        raise AwsError("SageMakerException", "Rate exceeded")

    result, _, calls = run({("sagemaker", "DescribeEndpoint"): [throttled, missing, endpoint("InService")]})
    assert result["status"] == "SUCCEEDED", result
    assert len(calls.of("sagemaker", "CreateEndpoint")) == 1


def test_an_endpoint_lookup_refused_for_another_reason_creates_no_endpoint():
    def denied(request):
        raise AwsError("AccessDeniedException", "not authorized to perform: sagemaker:DescribeEndpoint")

    result, _, calls = run({("sagemaker", "DescribeEndpoint"): [denied]})
    assert result["status"] == "FAILED" and result["error"] == "DescribeEndpointFailed", result
    assert "not authorized" in message(calls)
    assert calls.of("sagemaker", "CreateEndpoint") == [] and calls.of("sagemaker", "UpdateEndpoint") == []


def test_a_package_ftstack_did_not_register_is_not_deployed():
    def foreign(request):
        body = package()(request)
        del body["CustomerMetadataProperties"]
        return body

    result, _, calls = run({("sagemaker", "DescribeModelPackage"): [foreign]})
    assert result["status"] == "FAILED" and result["error"] == "NotDeployable", result
    assert "model_manifest_sha256" in message(calls)
    assert sagemaker(calls) == ["DescribeModelPackage", "ListModelPackages"] and calls.of("lambda", "Invoke") == []


def test_a_package_registered_without_pinned_versions_is_not_deployed():
    def unpinned(request):
        body = package()(request)
        del body["CustomerMetadataProperties"][VERSIONS_SHA256]
        return body

    result, _, calls = run({("sagemaker", "DescribeModelPackage"): [unpinned]})
    assert result["status"] == "FAILED" and result["error"] == "NotDeployable", result
    assert VERSIONS_SHA256 in message(calls)
    assert sagemaker(calls) == ["DescribeModelPackage", "ListModelPackages"] and calls.of("lambda", "Invoke") == []


def test_an_endpoint_left_failed_by_an_earlier_deployment_is_reported_with_the_fix():
    """SageMaker refuses UpdateEndpoint on a Failed endpoint: the run says so and how to recover,
    and calls no update that would only be refused."""
    old = resource_name(ENDPOINT, "an earlier execution")
    result, _, calls = run({("sagemaker", "DescribeEndpoint"): [endpoint("Failed", old, "CUDA out of memory")]})
    assert result["status"] == "FAILED" and result["error"] == "EndpointFailed", result
    assert f"ftstack undeploy {ENDPOINT}" in message(calls)
    assert calls.of("sagemaker", "UpdateEndpoint") == [] and calls.of("sagemaker", "CreateEndpoint") == []


def test_a_change_to_an_approved_package_that_is_not_the_newest_deploys_nothing():
    """SageMaker sends the state change event for any change of a package (a new description of
    version 3, say), not only its approval: while version 5 is the group's newest approved
    package, the endpoint keeps serving it."""
    result, events, calls = run({("sagemaker", "ListModelPackages"): [newest(PACKAGE_ARN[:-1] + "5")]})
    assert result["status"] == "SUCCEEDED"
    (listed,) = calls.of("sagemaker", "ListModelPackages")
    assert listed.params == {"ModelPackageGroupName": GROUP, "ModelApprovalStatus": "Approved", "SortBy": "CreationTime",
                             "SortOrder": "Descending", "MaxResults": 1}
    assert [c for c in calls.calls if c.operation in ("CreateModel", "CreateEndpoint", "UpdateEndpoint", "Invoke")] == []
