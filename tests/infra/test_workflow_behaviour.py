"""The workflow as Step Functions runs it: the definition the stack deploys, executed in moto's
interpreter with its real Parameters, ResultSelectors, Catches and Choices.

Nothing in the definition is replaced. Every request it makes is checked against botocore's model
of that API, lengths, patterns and enums included (``aws_contract``). The staging Lambda is the
real handler, run in-process against moto's S3; S3 reads are moto's; SageMaker answers with
responses of the API's real shape (checked against its output model), scripted per scenario:
jobs that complete, fail, stop without a FailureReason, or are refused for capacity or quota.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid

import boto3
import pytest
from moto import mock_aws
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import state_task_service_aws_sdk

from ftstack.infra.definition import PLACEHOLDERS, WorkflowSettings, build_definition, render
from ftstack.infra.model_check import handler as model_check
from ftstack.infra.stage_data.handler import (
    InsufficientGpuMemory, InvalidDataset, InvalidInput, Settings, UnversionedBucket, job_name_prefix, running_execution,
    stage,
)
from ftstack.infra.training_states import poll_seconds
from ftstack_train.manifest import ModelIntegrityError, manifest_bytes

from aws_contract import AwsCalls, AwsError, lambda_invoke, operation, problems, run_execution
from staging_samples import staging_settings

ACCOUNT, REGION, BUCKET = "123456789012", "us-east-1", "ftstack-bucket"
KEY_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
SETTINGS = WorkflowSettings(
    region=REGION, volume_size_gb=500, max_runtime_s=86400, max_wait_s=172800, max_instance_count=4,
    network_isolation=False, subnets=(), security_groups=(), approval_status="PendingManualApproval", quality_threshold=1.5,
    volume_kms_instance_types=("ml.p3.16xlarge", "ml.p3.2xlarge"),
)
VALUES = {
    "Bucket": BUCKET, "KeyArn": KEY_ARN, "BucketKeyArn": KEY_ARN,
    "TrainingRoleArn": f"arn:aws:iam::{ACCOUNT}:role/ftstack-TrainingRole",
    "TrainingImage": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/cdk-hnb659fds-container-assets:abc123",
    "InferenceImage": f"763104351884.dkr.ecr.{REGION}.amazonaws.com/huggingface-pytorch-tgi-inference:2.4.0-tgi2.3.1-gpu-py311-cu124-ubuntu22.04",
    "StagingFunctionArn": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:ftstack-Staging",
    "ModelCheckFunctionArn": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:ftstack-ModelCheck",
    "TopicArn": f"arn:aws:sns:{REGION}:{ACCOUNT}:ftstack-Notifications",
    "ModelPackageGroupName": "ftstack-models",
}
STAGING = staging_settings(BUCKET, key_arn=KEY_ARN)
STATE_MACHINE_ARN = f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:ftstack"
"""The state machine the tests create, whose ARN the staging function is given."""
GOOD_INPUT = {"train_data": f"s3://{BUCKET}/incoming/train.jsonl"}
MODEL_FILES = {"config.json": b'{"model_type": "mpt"}', "model.safetensors": b"\0" * 64}
MANIFEST = manifest_bytes({n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in MODEL_FILES.items()})
MANIFEST_DIGEST = hashlib.sha256(MANIFEST).hexdigest()
"""The SHA-256 of the model's manifest, as the job writes it into final-metrics.json."""
RUN1 = job_name_prefix("ftstack", "run1")
"""The job names of the execution run1 start with this (``ftstack-run1-<digest>``)."""
RECORDS = "".join(json.dumps({"prompt": f"What is {i} + 1?", "response": str(i + 1)}) + "\n" for i in range(40))


def test_the_scripted_values_are_what_aws_takes():
    assert set(VALUES) == set(PLACEHOLDERS)
    model = operation("sagemaker", "CreateTrainingJob").input_shape
    assert problems(model.members["RoleArn"], VALUES["TrainingRoleArn"]) == []
    assert problems(model.members["AlgorithmSpecification"].members["TrainingImage"], VALUES["TrainingImage"]) == []


# --- SageMaker, answered with responses of the real shape ---------------------------------------

def job(name: str, status: str, secondary: str, reason: str | None = None) -> dict:
    """A DescribeTrainingJob response; ``reason`` only where SageMaker gives one (Failed jobs)."""
    body = {
        "TrainingJobName": name, "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{name}",
        "ModelArtifacts": {"S3ModelArtifacts": f"s3://{BUCKET}/executions/x/model/{name}/output/model/"},
        "TrainingJobStatus": status, "SecondaryStatus": secondary,
        "StoppingCondition": {"MaxRuntimeInSeconds": 86400}, "CreationTime": "2026-11-29T10:00:00Z",
        "HyperParameters": {"max_duration": "3ep"},
    }
    if reason is not None:
        body["FailureReason"] = reason
    return body


def created(request: dict) -> dict:
    return {"TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{request['TrainingJobName']}"}


def described(*states: tuple[str, str] | tuple[str, str, str]):
    """Describe answers in turn, each for the job named in the request."""
    return [lambda request, s=s: job(request["TrainingJobName"], *s) for s in states]


def quota_refused(request: dict) -> dict:
    raise AwsError("ResourceLimitExceeded", "The account-level service limit 'ml.p4d.24xlarge for training job usage' is 0 "
                   "Instances, with current utilization of 0 Instances and a request delta of 1 Instances.")


CAPACITY = ("Failed", "Failed", "CapacityError: Unable to provision requested ML compute capacity. Please retry using a different ML instance type.")
OOM = ("Failed", "Failed", "AlgorithmError: CUDA out of memory")
COMPLETED = ("Completed", "Completed")
RUNNING = ("InProgress", "Training")


def registered(request: dict) -> dict:
    return {"ModelPackageArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/ftstack-models/1"}


def published(request: dict) -> dict:
    return {"MessageId": str(uuid.uuid4())}


def staging_lambda(settings: Settings = STAGING):
    """The real staging handler, run in-process on the Invoke request against moto's S3; it asks
    moto's Step Functions for the running execution, as the function does."""
    def handler(event: dict) -> dict:
        run = running_execution(event, boto3.client("stepfunctions", region_name=REGION), STATE_MACHINE_ARN)
        return stage(run, settings, boto3.client("s3", region_name=REGION))
    return lambda_invoke(handler, (InvalidInput, InvalidDataset, InsufficientGpuMemory, UnversionedBucket))


MODEL_CHECK = lambda_invoke(model_check, (ModelIntegrityError,), {"AWS_DEFAULT_REGION": REGION})
"""The real model-check handler, in-process against moto's S3."""


def with_model_check(invoke):
    """``invoke`` for the scenario's functions, the real model check for the model-check function."""
    return lambda request: (MODEL_CHECK if request["FunctionName"] == VALUES["ModelCheckFunctionArn"] else invoke)(request)


# --- running it ---------------------------------------------------------------------------------

def definition(settings: WorkflowSettings = SETTINGS) -> str:
    """The deployed definition with the stack's values; only its waits are shortened (minutes
    between polls and retries are the point on AWS, and would only slow the tests down)."""
    built = build_definition(settings)
    for state in built["States"].values():
        if state["Type"] == "Wait":
            assert state["Seconds"] == poll_seconds(settings)
            state["Seconds"] = 0
        for retrier in state.get("Retry", []):
            retrier.update(IntervalSeconds=1, BackoffRate=1.0)
    text = render(built)
    for name, value in VALUES.items():
        text = text.replace("${" + name + "}", value)
    return text


@pytest.fixture(autouse=True)
def step_functions_as_documented(monkeypatch):
    """Two things Step Functions does that moto's interpreter does not."""
    # Error names: moto names aws-sdk errors of services missing from its table after the
    # lower-case service ("sagemaker.ResourceLimitExceededException"); Step Functions uses the
    # SDK's service name.
    monkeypatch.setitem(state_task_service_aws_sdk._SERVICE_ERROR_NAMES, "sagemaker", "SageMaker")
    # Bodies: an aws-sdk task returns a streamed body (S3 GetObject's Body) as a string (the
    # Step Functions guide, "Use AWS SDK service integrations"); moto leaves the stream.
    original = state_task_service_aws_sdk.StateTaskServiceAwsSdk._eval_service_task

    def read_bodies(self, env, *args, **kwargs):
        original(self, env, *args, **kwargs)
        response = env.stack[-1]
        for key, value in list(response.items()):
            if hasattr(value, "read"):
                response[key] = value.read().decode("utf-8")

    monkeypatch.setattr(state_task_service_aws_sdk.StateTaskServiceAwsSdk, "_eval_service_task", read_bodies)


def run(sagemaker: dict, execution_input: dict, *, name: str = "run1", final_metrics: dict | None = None,
        settings: WorkflowSettings = SETTINGS, staging: Settings = STAGING,
        objects: dict[str, bytes] | None = None, versioned: bool = True) -> tuple[dict, list[dict], AwsCalls]:
    answers = {
        ("lambda", "Invoke"): [with_model_check(invoke) for invoke in sagemaker.get("invoke", [staging_lambda(staging)])],
        ("sagemaker", "CreateTrainingJob"): sagemaker.get("create", [created]),
        ("sagemaker", "DescribeTrainingJob"): sagemaker.get("describe", described(RUNNING, COMPLETED)),
        ("sagemaker", "CreateModelPackage"): [registered],
        ("sns", "Publish"): [published],
    }
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}), AwsCalls(answers) as calls:
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET)
        if versioned:
            s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        metrics = {"eval_cross_entropy": 1.2, "eval_perplexity": 3.32, "step": 90, "model_manifest_sha256": MANIFEST_DIGEST} \
            if final_metrics is None else final_metrics
        prefix = f"executions/{name}/model/"
        for attempt in range(3):  # each attempt's model, as its job exports it
            model = f"{prefix}{stage_name(name, attempt)}/output/model/"
            for file, body in {**MODEL_FILES, "model-manifest.json": MANIFEST, "final-metrics.json": json.dumps(metrics).encode()}.items():
                s3.put_object(Bucket=BUCKET, Key=model + file, Body=body)
        for key, body in {"incoming/train.jsonl": RECORDS.encode(), **(objects or {})}.items():
            s3.put_object(Bucket=BUCKET, Key=key, Body=body)
        sfn = boto3.client("stepfunctions", region_name=REGION)
        arn = sfn.create_state_machine(name="ftstack", definition=definition(settings), roleArn=f"arn:aws:iam::{ACCOUNT}:role/sfn")["stateMachineArn"]
        assert arn == STATE_MACHINE_ARN
        result, events, _ = run_execution(sfn, arn, name, execution_input)
    assert calls.problems() == []
    return result, events, calls


def stage_name(execution: str, attempt: int) -> str:
    return f"{job_name_prefix(STAGING.job_prefix, execution)}-a{attempt}"


def entered(events: list[dict]) -> list[str]:
    return [e["stateEnteredEventDetails"]["name"] for e in events if "stateEnteredEventDetails" in e]


def messages(calls: AwsCalls) -> list[str]:
    return [c.params["Message"] for c in calls.of("sns", "Publish")]


# --- scenarios ----------------------------------------------------------------------------------

def test_happy_path_trains_polls_gates_registers_and_notifies():
    result, events, calls = run({}, GOOD_INPUT)
    assert result["status"] == "SUCCEEDED", result
    (create,) = calls.of("sagemaker", "CreateTrainingJob")
    request = create.params
    assert request["TrainingJobName"] == f"{RUN1}-a0"
    assert request["ResourceConfig"] == {"InstanceType": "ml.p4d.24xlarge", "InstanceCount": 1, "VolumeSizeInGB": 500}
    assert request["OutputDataConfig"] == {"S3OutputPath": f"s3://{BUCKET}/executions/run1/model/", "KmsKeyId": KEY_ARN, "CompressionType": "NONE"}
    assert request["AlgorithmSpecification"]["EnableSageMakerMetricsTimeSeries"] is True
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["train", "test"]
    # The channels are the folder the staging invocation returned, one of its own (issue 11, item 8).
    train, test = (c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"])
    assert re.fullmatch(f"s3://{BUCKET}/scratch/run1/data/[0-9a-f]{{32}}/train/", train) and test == train[:-6] + "test/"
    assert request["Tags"] == [{"Key": "ftstack:execution", "Value": "run1"}]
    assert len(calls.of("sagemaker", "DescribeTrainingJob")) == 2  # InProgress, then Completed
    states = entered(events)
    assert states.index("PollJob") < states.index("QualityGate") < states.index("Register") < states.index("NotifySuccess")
    (register,) = calls.of("sagemaker", "CreateModelPackage")
    package = register.params
    assert package["InferenceSpecification"]["Containers"][0]["ModelDataSource"]["S3DataSource"]["S3Uri"] == \
        f"s3://{BUCKET}/executions/run1/model/{RUN1}-a0/output/model/"
    assert package["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"].endswith(f"/{RUN1}-a0/output/model/metrics.json")
    assert package["CustomerMetadataProperties"]["eval_cross_entropy"] == "1.2"
    assert package["CustomerMetadataProperties"]["model_manifest_sha256"] == MANIFEST_DIGEST
    # The model's object versions as the job left them, pinned for deployment (ftstack.s3_model).
    model = f"s3://{BUCKET}/executions/run1/model/{RUN1}-a0/output/model/"
    (check,) = [c for c in calls.of("lambda", "Invoke") if c.params["FunctionName"] == VALUES["ModelCheckFunctionArn"]]
    assert json.loads(check.params["Payload"]) == {"check": "registration", "model_uri": model, "manifest_sha256": MANIFEST_DIGEST}
    versions = package["CustomerMetadataProperties"]["model_versions_sha256"]
    assert re.fullmatch("[0-9a-f]{64}", versions)
    assert states.index("ReadMetrics") < states.index("CheckModel") < states.index("QualityGate")
    (message,) = messages(calls)
    assert "model-package/ftstack-models/1" in message and "1.2" in message and f"{RUN1}-a0" in message


@pytest.mark.parametrize("name", [
    str(uuid.UUID(int=7)),                      # what the console generates: 36 characters
    "nightly_run_2026_11_29",                   # underscores are allowed in execution names, not in job names
    "x" * 80,                                   # the longest execution name
    "Run-With.Dots_and-UPPER-" + "9" * 56,      # 80 characters of everything allowed
])
def test_long_and_odd_execution_names_make_valid_requests_end_to_end(name):
    result, _, calls = run({}, GOOD_INPUT, name=name)
    assert result["status"] == "SUCCEEDED", result
    (create,) = calls.of("sagemaker", "CreateTrainingJob")
    (register,) = calls.of("sagemaker", "CreateModelPackage")
    token = register.params["ClientToken"]
    assert len(token) == 32 and token == stage_token(create.params["TrainingJobName"])


def stage_token(job_name: str) -> str:
    import hashlib

    return hashlib.md5(job_name.encode()).hexdigest()


def test_volume_key_only_for_instance_types_with_an_ebs_volume():
    result, _, calls = run({"create": [quota_refused, created]}, GOOD_INPUT | {"instance_type": "ml.p3.16xlarge"},
                           staging=STAGING)
    assert result["status"] == "SUCCEEDED", result
    first, second = (c.params["ResourceConfig"] for c in calls.of("sagemaker", "CreateTrainingJob"))
    assert first == {"InstanceType": "ml.p3.16xlarge", "InstanceCount": 1, "VolumeSizeInGB": 500, "VolumeKmsKeyId": KEY_ARN}
    assert second == {"InstanceType": "ml.g5.48xlarge", "InstanceCount": 1, "VolumeSizeInGB": 500}


def test_capacity_error_in_the_job_moves_on_to_the_next_instance_type_under_a_new_name():
    result, _, calls = run({"describe": described(CAPACITY, CAPACITY, RUNNING, COMPLETED)}, GOOD_INPUT)
    assert result["status"] == "SUCCEEDED", result
    jobs = [(c.params["TrainingJobName"], c.params["ResourceConfig"]["InstanceType"]) for c in calls.of("sagemaker", "CreateTrainingJob")]
    assert jobs == [(f"{RUN1}-a0", "ml.p4d.24xlarge"), (f"{RUN1}-a1", "ml.g5.48xlarge")]


def test_zero_quota_falls_back_at_once_and_names_the_quota_to_raise():
    result, events, calls = run({"create": [quota_refused]}, GOOD_INPUT)
    assert result["status"] == "FAILED" and result["error"] == "TrainingFailed"
    assert len(calls.of("sagemaker", "CreateTrainingJob")) == 2  # one per instance type, no retries
    assert calls.of("sagemaker", "DescribeTrainingJob") == []
    (message,) = messages(calls)
    assert 'Service Quotas quota "ml.p4d.24xlarge for training job usage" (Amazon SageMaker, us-east-1)' in message
    assert '"ml.g5.48xlarge for training job usage"' in message
    assert "ResourceLimitExceeded" in message


def test_zero_spot_quota_names_the_spot_quota():
    result, _, calls = run({"create": [quota_refused]}, GOOD_INPUT | {"spot": True})
    assert result["status"] == "FAILED"
    (message,) = messages(calls)
    assert '"ml.p4d.24xlarge for spot training job usage"' in message


@pytest.mark.parametrize("secondary", ["MaxRuntimeExceeded", "MaxWaitTimeExceeded", "Stopped"])
def test_a_stopped_job_without_failure_reason_is_reported_with_what_to_do(secondary):
    result, events, calls = run({"describe": described(RUNNING, ("Stopped", secondary))}, GOOD_INPUT)
    assert result["status"] == "FAILED" and result["error"] == "TrainingFailed", result
    (message,) = messages(calls)
    assert f"Stopped ({secondary})" in message
    assert "max_runtime_hours" in message and '"resume_from": "run1"' in message
    assert "Register" not in entered(events)


def test_other_training_failures_are_not_retried_and_report_the_failure_reason():
    result, _, calls = run({"describe": described(RUNNING, OOM)}, GOOD_INPUT)
    assert result["status"] == "FAILED" and result["error"] == "TrainingFailed"
    assert result["cause"] == "AlgorithmError: CUDA out of memory"
    assert len(calls.of("sagemaker", "CreateTrainingJob")) == 1
    (message,) = messages(calls)
    assert "CUDA out of memory" in message and "ml.p4d.24xlarge" in message and "Failed (Failed)" in message
    assert "). Reason: AlgorithmError" in message
    assert f"logStreamNameFilter$3D{RUN1}-a0" in message


def test_an_api_error_that_is_not_a_quota_is_reported_not_retried_on_another_type():
    def refused(request):
        raise AwsError("ValidationException", "Invalid VolumeKmsKeyId for instance type with local storage")

    result, _, calls = run({"create": [refused]}, GOOD_INPUT)
    assert result["status"] == "FAILED"
    creates = calls.of("sagemaker", "CreateTrainingJob")
    assert len(creates) == 3 and {c.params["TrainingJobName"] for c in creates} == {f"{RUN1}-a0"}  # two quick retries
    (message,) = messages(calls)
    assert "Invalid VolumeKmsKeyId" in message


@pytest.mark.parametrize(("final", "error"), [
    ({"eval_cross_entropy": 1.9, "model_manifest_sha256": MANIFEST_DIGEST}, "QualityGateFailed"),
    ({}, "MetricsMissing"),
    ({"eval_cross_entropy": None, "model_manifest_sha256": MANIFEST_DIGEST}, "MetricsMissing"),
    ({"eval_cross_entropy": 1.2}, "MetricsMissing"),  # no manifest digest: nothing to verify the model by
])
def test_quality_gate_fails_without_registering(final, error):
    result, events, calls = run({}, GOOD_INPUT, final_metrics=final)
    assert result["status"] == "FAILED" and result["error"] == error, result
    if error == "MetricsMissing":
        assert result["cause"].startswith(f"s3://{BUCKET}/executions/run1/model/{RUN1}-a0/output/model/final-metrics.json ")
    assert calls.of("sagemaker", "CreateModelPackage") == []


def test_without_a_threshold_there_is_no_gate():
    settings = WorkflowSettings(**{**SETTINGS.__dict__, "quality_threshold": None})
    result, events, _ = run({}, GOOD_INPUT, final_metrics={"eval_cross_entropy": 9.0, "model_manifest_sha256": MANIFEST_DIGEST},
                            settings=settings)
    assert result["status"] == "SUCCEEDED"
    assert "QualityGate" not in entered(events)


def test_spot_multi_node_model_channel_and_vpc_shape_the_job():
    settings = WorkflowSettings(**{**SETTINGS.__dict__, "subnets": ("subnet-0abc",), "security_groups": ("sg-0abc",),
                                   "network_isolation": True})
    base = f"s3://{BUCKET}/base-models/mpt/"
    result, _, calls = run({}, GOOD_INPUT | {"spot": True, "instance_count": 2, "base_model": base}, settings=settings,
                           objects={"base-models/mpt/config.json": b"{}"})
    assert result["status"] == "SUCCEEDED", result
    (create,) = calls.of("sagemaker", "CreateTrainingJob")
    request = create.params
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400, "MaxWaitTimeInSeconds": 172800}
    assert request["EnableManagedSpotTraining"] is True and request["EnableInterContainerTrafficEncryption"] is True
    assert request["ResourceConfig"]["InstanceCount"] == 2
    assert request["InputDataConfig"][-1]["ChannelName"] == "model"
    assert request["InputDataConfig"][-1]["DataSource"]["S3DataSource"]["S3Uri"] == base
    assert request["VpcConfig"] == {"Subnets": ["subnet-0abc"], "SecurityGroupIds": ["sg-0abc"]}
    assert request["EnableNetworkIsolation"] is True


BAD_INPUTS = [
    ({}, "train_data is required"),
    ({"train_data": 3}, "train_data is required"),
    ({"train_data": "s3://other-bucket/incoming/x.jsonl"}, f"train_data must be under s3://{BUCKET}/incoming/"),
    ({"train_data": f"s3://{BUCKET}/elsewhere/x.jsonl"}, "train_data must be under"),
    (GOOD_INPUT | {"test_data": "https://example.com/x"}, "test_data must be"),
    (GOOD_INPUT | {"test_split": 0.9}, "test_split must be"),
    (GOOD_INPUT | {"test_split": 0}, "test_split must be"),
    (GOOD_INPUT | {"test_split": "0.1"}, "test_split must be"),
    (GOOD_INPUT | {"test_split": 0.1, "test_data": f"s3://{BUCKET}/incoming/t.jsonl"}, "not both"),
    (GOOD_INPUT | {"base_model": 7}, "base_model must be"),
    (GOOD_INPUT | {"hyperparameters": "lr=1"}, "hyperparameters must be an object"),
    (GOOD_INPUT | {"instance_type": "p4d.24xlarge"}, "instance_type must be"),
    (GOOD_INPUT | {"instance_count": 0}, "instance_count must be"),
    (GOOD_INPUT | {"instance_count": 5}, "instance_count must be"),
    (GOOD_INPUT | {"spot": "yes"}, "spot must be"),
    (GOOD_INPUT | {"force": "yes"}, "force must be"),
]


@pytest.mark.parametrize(("execution_input", "message"), BAD_INPUTS)
def test_bad_input_fails_at_once_naming_the_field(execution_input, message):
    result, events, calls = run({}, execution_input)
    assert result["status"] == "FAILED" and result["error"] == "InvalidInput"
    assert message in result["cause"]
    assert [c for c in calls.calls if c.service in ("lambda", "sagemaker")] == []


def test_staging_errors_keep_their_name_and_message():
    bad = RECORDS + json.dumps({"prompt": "", "response": "x"}) + "\n"
    result, events, calls = run({}, GOOD_INPUT, objects={"incoming/train.jsonl": bad.encode()})
    assert result["status"] == "FAILED" and result["error"] == "InvalidDataset", result
    assert "train.jsonl:41" in result["cause"]
    assert calls.of("sagemaker", "CreateTrainingJob") == []
    (message,) = messages(calls)
    assert "InvalidDataset" in message


def test_a_bucket_without_versioning_fails_in_staging_before_any_job_is_paid_for():
    """The model check after training registers a model only from a versioned bucket; a brought
    bucket without versioning is refused before the job, with the fix."""
    result, _, calls = run({}, GOOD_INPUT, versioned=False)
    assert result["status"] == "FAILED" and result["error"] == "UnversionedBucket", result
    assert f"bucket {BUCKET}: versioning is off" in result["cause"] and "turn on versioning" in result["cause"]
    assert calls.of("sagemaker", "CreateTrainingJob") == []
    (message,) = messages(calls)
    assert "UnversionedBucket" in message


DOOMED = {"base_model": "mosaicml/mpt-7b", "instance_type": "ml.g5.12xlarge",
          "hyperparameters": {"max_seq_len": 2048, "device_train_microbatch_size": 8,
                              "fsdp_config.activation_checkpointing": False}}
"""MPT-7B at 2048 tokens, micro batch 8, no activation checkpointing: about 97 GiB a GPU."""


def test_a_run_that_fits_no_instance_type_fails_in_staging_with_the_estimate_in_the_notification():
    staging = staging_settings(BUCKET, key_arn=KEY_ARN, fallback_instance_types=[])
    result, _, calls = run({"invoke": [staging_lambda(staging)]}, GOOD_INPUT | DOOMED, staging=staging)
    assert result["status"] == "FAILED" and result["error"] == "InsufficientGpuMemory", result
    assert "ml.g5.12xlarge (4 x A10G" in result["cause"] and "activations kept for backward" in result["cause"]
    assert calls.of("sagemaker", "CreateTrainingJob") == []
    (message,) = messages(calls)
    assert message.startswith("Execution run1 failed: InsufficientGpuMemory.")
    assert "> budget 18.0 GiB" in message and '\\"force\\": true' in message


def test_force_starts_the_run_the_estimate_would_stop():
    staging = staging_settings(BUCKET, key_arn=KEY_ARN, fallback_instance_types=[])
    result, _, calls = run({"invoke": [staging_lambda(staging)]}, GOOD_INPUT | DOOMED | {"force": True}, staging=staging)
    assert result["status"] == "SUCCEEDED", result
    (create,) = calls.of("sagemaker", "CreateTrainingJob")
    assert create.params["ResourceConfig"]["InstanceType"] == "ml.g5.12xlarge"


def test_staging_throttled_by_its_reserved_concurrency_waits_its_turn():
    def throttled(request):
        raise AwsError("TooManyRequestsException", "Rate Exceeded.", status=429)

    result, _, calls = run({"invoke": [throttled] * 5 + [staging_lambda()]}, GOOD_INPUT)
    assert result["status"] == "SUCCEEDED", result
    staging = [c for c in calls.of("lambda", "Invoke") if c.params["FunctionName"] == VALUES["StagingFunctionArn"]]
    assert len(staging) == 6
