"""``ftstack deploy``, ``invoke`` and ``undeploy`` against moto, every request checked against
botocore's model of its API (``aws_contract``: lengths, patterns and enums that botocore skips).

moto holds the stack, the bucket with an exported model and its manifest, and a model package
registered as the workflow registers it (created through the SageMaker API). moto's endpoint
configs accept only instance types of years ago (no g5), and it has no UpdateEndpoint: those
endpoint calls are answered with responses of the API's real shape, scripted per scenario.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import boto3
import pytest
from botocore.response import StreamingBody

from ftstack import deploy as deploy_module
from ftstack.s3_model import VERSIONS_SHA256, pin_s3_model
from ftstack.serving import ENV_TENSOR_PARALLEL, invoke_body, production_variant, resource_prefix, vllm_environment
from ftstack_train.manifest import manifest_bytes

from aws_fixtures import BUCKET, REGION, run_cli, stack  # noqa: F401 (stack: a fixture)

sys.path.insert(0, str(Path(__file__).parent / "infra"))  # botocore's contracts, shared with the workflow tests
from aws_contract import AwsCalls, arn_answer, created_config, endpoint_answer, endpoint_missing  # noqa: E402

ACCOUNT, GROUP = "123456789012", "ftstack-models"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/ftstack-Serving"
PREFIX = "executions/run1/model/ftstack-run1-abc-a0/output/model/"
FILES = {"config.json": b'{"model_type": "mpt"}', "model.safetensors": b"\0" * 64, "chat_template.jinja": b"{{ x }}"}
MANIFEST = manifest_bytes({n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in FILES.items()})
IMAGE = f"763104351884.dkr.ecr.{REGION}.amazonaws.com/huggingface-vllm:0.29.0-transformers5.15.0-gpu-py312-cu130-ubuntu24.04-v1.0"


def register(boto, status: str = "Approved", digest: str | None = None) -> str:
    """A package as the workflow registers it, over a model folder in the (versioned) bucket, with
    the object versions its CheckModel step pinned."""
    s3 = boto.client("s3")
    for name, body in {**FILES, "model-manifest.json": MANIFEST}.items():
        s3.put_object(Bucket=BUCKET, Key=PREFIX + name, Body=body)
    manifest = hashlib.sha256(MANIFEST).hexdigest()
    versions = pin_s3_model(s3, f"s3://{BUCKET}/{PREFIX}", manifest)[VERSIONS_SHA256]
    sagemaker = boto.client("sagemaker")
    sagemaker.create_model_package_group(ModelPackageGroupName=GROUP)
    return sagemaker.create_model_package(
        ModelPackageGroupName=GROUP, ModelApprovalStatus=status,
        CustomerMetadataProperties={"model_manifest_sha256": digest or manifest, VERSIONS_SHA256: versions},
        InferenceSpecification={
            "Containers": [{"Image": IMAGE, "Environment": vllm_environment(max_model_len=2048),
                            "ModelDataSource": {"S3DataSource": {"S3Uri": f"s3://{BUCKET}/{PREFIX}", "S3DataType": "S3Prefix",
                                                                 "CompressionType": "None"}}}],
            "SupportedContentTypes": ["application/json"], "SupportedResponseMIMETypes": ["application/json"]},
    )["ModelPackageArn"]


def endpoint(status: str, config: str | None = None, reason: str | None = None):
    """A DescribeEndpoint answer; ``config`` None: the config the command created last."""
    return endpoint_answer(status, config or created_config(lambda: contract), reason,
                           arn=f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/x")


missing = endpoint_missing


def arn(kind: str, key: str, resource: str):
    return arn_answer(kind, key, f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:{resource}")


contract: AwsCalls


@pytest.fixture
def calls(monkeypatch):
    """Records (and answers, where scripted) every call of the command, on the session it makes."""
    global contract
    contract = AwsCalls({
        ("sagemaker", "CreateEndpointConfig"): [arn("EndpointConfig", "EndpointConfigName", "endpoint-config")],
        ("sagemaker", "CreateEndpoint"): [arn("Endpoint", "EndpointName", "endpoint")],
        ("sagemaker", "UpdateEndpoint"): [arn("Endpoint", "EndpointName", "endpoint")],
        ("sagemaker", "DeleteEndpoint"): [lambda request: {}],
        ("sagemaker", "DeleteEndpointConfig"): [lambda request: {}],
    })
    made = deploy_module.session

    def hooked(region):
        boto = made(region)
        emitter = boto._session.get_component("event_emitter")
        emitter.register("before-parameter-build", contract._record)
        emitter.register("before-call", contract._answer)
        return boto

    monkeypatch.setattr(deploy_module, "session", hooked)
    yield contract
    assert contract.problems() == []


def deploy(capsys, arn_: str, *more: str) -> tuple[int, str, str]:
    return run_cli(capsys, "deploy", arn_, "--role", ROLE, "--poll", "0", *more)


def test_deploy_creates_model_config_and_endpoint_after_checking_the_files(stack, calls, capsys):
    package = register(stack[0])
    calls.answers[("sagemaker", "DescribeEndpoint")] = [missing, endpoint("Creating"), endpoint("InService")]
    code, out, err = deploy(capsys, package)
    assert code == 0, err
    assert "3 files are the registered versions and match the registered manifest" in out and "is InService" in out
    assert f'ftstack invoke {GROUP} "What is the capital of Greece?"' in out
    (model,) = calls.of("sagemaker", "CreateModel")
    name = model.params["ModelName"]
    assert name.startswith(resource_prefix(GROUP) + "-") and model.params["ExecutionRoleArn"] == ROLE
    assert model.params["PrimaryContainer"]["Environment"] == vllm_environment(max_model_len=2048) | {ENV_TENSOR_PARALLEL: "1"}
    assert model.params["PrimaryContainer"]["ModelDataSource"]["S3DataSource"]["S3Uri"] == f"s3://{BUCKET}/{PREFIX}"
    (config,) = calls.of("sagemaker", "CreateEndpointConfig")
    assert config.params["ProductionVariants"] == [production_variant("ml.g5.2xlarge") | {"ModelName": name}]
    (create,) = calls.of("sagemaker", "CreateEndpoint")
    assert create.params == {"EndpointName": GROUP, "EndpointConfigName": name}
    # The files were checked before anything was created.
    order = [c.operation for c in calls.calls]
    assert order.index("ListObjectVersions") < order.index("CreateModel")


def test_deploy_updates_an_existing_endpoint(stack, calls, capsys):
    package = register(stack[0])
    calls.answers[("sagemaker", "DescribeEndpoint")] = [endpoint("InService", "old-config"), endpoint("Updating", "old-config"),
                                                        endpoint("InService")]
    code, out, err = deploy(capsys, package, "--endpoint", "mpt7b-chat", "--instance-type", "ml.g5.12xlarge")
    assert code == 0, err
    (update,) = calls.of("sagemaker", "UpdateEndpoint")
    assert update.params["EndpointName"] == "mpt7b-chat" and "updating from old-config" in out
    assert calls.of("sagemaker", "CreateEndpoint") == []
    assert calls.of("sagemaker", "CreateModel")[0].params["PrimaryContainer"]["Environment"][ENV_TENSOR_PARALLEL] == "4"


def test_a_failed_update_says_the_old_config_still_serves(stack, calls, capsys):
    package = register(stack[0])
    calls.answers[("sagemaker", "DescribeEndpoint")] = [endpoint("InService", "old-config"), endpoint("Updating", "old-config"),
                                                        endpoint("InService", "old-config", "health check failed")]
    code, _, err = deploy(capsys, package)
    assert code == 2
    assert "failed (health check failed); the endpoint still serves its previous config old-config" in err
    assert calls.of("sagemaker", "DeleteEndpoint") == []


@pytest.mark.parametrize("status, digest, message", [
    ("PendingManualApproval", None, "is PendingManualApproval; approve it first (ftstack approve"),
    ("Approved", "0" * 64, "is not the registered"),
])
def test_deploy_refuses_an_unapproved_or_altered_model_before_creating_anything(stack, calls, capsys, status, digest, message):
    package = register(stack[0], status=status, digest=digest)
    code, _, err = deploy(capsys, package)
    assert code == 2 and message in err
    assert [c for c in calls.calls if c.service == "sagemaker" and c.operation.startswith("Create")] == []


def test_deploy_refuses_weights_overwritten_with_others_of_the_same_size(stack, calls, capsys):
    package = register(stack[0])
    stack[0].client("s3").put_object(Bucket=BUCKET, Key=PREFIX + "model.safetensors", Body=b"\1" * 64)
    code, _, err = deploy(capsys, package)
    assert code == 2
    assert "(model.safetensors written more than once): objects were added, deleted or overwritten after registration" in err
    assert [c for c in calls.calls if c.service == "sagemaker" and c.operation.startswith("Create")] == []


@pytest.mark.parametrize("argv, message", [
    (["deploy", "not-an-arn"], "is not a model package ARN"),
    (["deploy", f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{GROUP}/1", "--endpoint", "bad_name"], "endpoint name 'bad_name'"),
    (["deploy", f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{GROUP}/1", "--instance-type", "ml.m5.xlarge"],
     "instance type 'ml.m5.xlarge'"),
])
def test_bad_arguments_are_refused_with_the_fix(stack, calls, capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and calls.calls == []


def test_without_a_role_the_stack_must_have_a_serving_role(stack, calls, capsys):
    package = register(stack[0])
    code, _, err = run_cli(capsys, "deploy", package, "--poll", "0", "--stack", "team-a")  # deployed before the output existed
    assert code == 2 and "has no ServingRoleArn output" in err and "--role ARN" in err


def test_invoke_sends_a_chat_request_and_prints_the_answer(stack, calls, capsys):
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Athens"}}]}
    calls.answers[("sagemaker-runtime", "InvokeEndpoint")] = [
        lambda request: {"Body": StreamingBody(io.BytesIO(json.dumps(answer).encode()), len(json.dumps(answer))),
                         "ContentType": "application/json"}]
    code, out, err = run_cli(capsys, "invoke", GROUP, "What is the capital of Greece?")
    assert (code, out) == (0, "Athens\n"), err
    (call,) = calls.of("sagemaker-runtime", "InvokeEndpoint")
    assert json.loads(call.params["Body"]) == invoke_body("What is the capital of Greece?")


def test_invoke_reports_an_answer_that_is_not_a_chat_completion(stack, calls, capsys):
    code, _, err = run_cli(capsys, "invoke", GROUP, "hi")  # moto's canned body
    assert code == 2 and f"endpoint {GROUP}: the answer is not a chat completion" in err


def test_undeploy_deletes_the_endpoint_and_its_config_but_not_the_package(stack, calls, capsys):
    package = register(stack[0])
    calls.answers[("sagemaker", "DescribeEndpoint")] = [endpoint("InService", "ftstack-models-abc")]
    code, out, err = run_cli(capsys, "undeploy", GROUP)
    assert code == 0, err
    assert [c.params for c in calls.of("sagemaker", "DeleteEndpoint")] == [{"EndpointName": GROUP}]
    assert [c.params for c in calls.of("sagemaker", "DeleteEndpointConfig")] == [{"EndpointConfigName": "ftstack-models-abc"}]
    assert boto3.client("sagemaker", region_name=REGION).describe_model_package(ModelPackageName=package)["ModelApprovalStatus"] == "Approved"
    assert "the model package is kept" in out


def test_undeploy_of_a_missing_endpoint_says_so(stack, calls, capsys):
    calls.answers[("sagemaker", "DescribeEndpoint")] = [missing]
    code, _, err = run_cli(capsys, "undeploy", "nothing-here")
    assert code == 2 and "endpoint nothing-here not found" in err


def test_a_failed_endpoint_is_reported_with_the_fix_before_anything_is_created(stack, calls, capsys):
    """SageMaker cannot update a Failed endpoint: deploy says so and creates no model or config
    that would be left behind."""
    package = register(stack[0])
    calls.answers[("sagemaker", "DescribeEndpoint")] = [endpoint("Failed", "old-config", "CUDA out of memory")]
    code, _, err = deploy(capsys, package)
    assert code == 2 and "is Failed (CUDA out of memory)" in err and f"ftstack undeploy {GROUP}" in err
    assert [c for c in calls.calls if c.operation.startswith("Create")] == []


@pytest.mark.parametrize("status", ["Creating", "Updating", "SystemUpdating", "RollingBack"])
def test_an_endpoint_being_changed_is_reported_before_anything_is_created(stack, calls, capsys, status):
    """SageMaker refuses to update an endpoint that is being created or updated ("Cannot update
    in-progress endpoint"): deploy says so first, instead of leaving a model and config behind."""
    package = register(stack[0])
    calls.answers[("sagemaker", "DescribeEndpoint")] = [endpoint(status, "old-config")]
    code, _, err = deploy(capsys, package)
    assert code == 2 and f"endpoint {GROUP} is {status}" in err and "aws sagemaker wait endpoint-in-service" in err
    assert [c for c in calls.calls if c.operation.startswith("Create")] == []
