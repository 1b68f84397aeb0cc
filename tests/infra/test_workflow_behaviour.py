"""The workflow's own logic, executed in moto's Step Functions interpreter: input validation, the
instance-type fallback on capacity errors, the quality gate, the failure and success messages.

The definition is the one the stack deploys. Only its service calls are replaced, each by Pass
states that give the recorded result of the call (or route its recorded error to the state the
Catch names, exactly as Step Functions would); notifications become Pass states that evaluate
the very message expressions of the real task.
"""

from __future__ import annotations

import copy
import json
import time

import boto3
import pytest
from moto import mock_aws

from infra.definition import PLACEHOLDERS, WorkflowSettings, build_definition

SETTINGS = WorkflowSettings(
    region="us-east-1", volume_size_gb=500, max_runtime_s=86400, max_wait_s=172800, max_instance_count=4,
    network_isolation=False, subnets=(), security_groups=(), approval_status="PendingManualApproval", quality_threshold=1.5,
)
VALUES = {name: f"test-{name.lower()}" for name in PLACEHOLDERS} | {"Bucket": "ftstack-bucket"}
STAGED = {
    "train": {"s3_uri": "s3://ftstack-bucket/scratch/run1/data/train/", "records": 950, "bytes": 1000, "sha256": "ab" * 32},
    "test": {"s3_uri": "s3://ftstack-bucket/scratch/run1/data/test/", "records": 50, "bytes": 100, "sha256": "cd" * 32, "source": "split"},
    "dataset_sha256": "ab" * 32,
    "hyperparameters": {"max_duration": "3ep", "model.pretrained_model_name_or_path": "mosaicml/mpt-7b"},
    "base_model": {"name": "mosaicml/mpt-7b", "s3_uri": ""},
    "instance_types": ["ml.p4d.24xlarge", "ml.g5.48xlarge"],
    "instance_count": 1,
    "spot": False,
    "job_name_prefix": "ftstack-run1",
    "output_uri": "s3://ftstack-bucket/executions/run1/model/",
    "output_prefix": "executions/run1/model/",
    "checkpoint_uri": "s3://ftstack-bucket/scratch/run1/checkpoints/",
}
GOOD_INPUT = {"train_data": "s3://ftstack-bucket/incoming/train.jsonl"}
CAPACITY = {"Error": "States.TaskFailed", "Cause": json.dumps({"FailureReason": "CapacityError: Unable to provision requested ML compute capacity."})}
OOM = {"Error": "States.TaskFailed", "Cause": json.dumps({"FailureReason": "AlgorithmError: CUDA out of memory"})}


def substituted(definition: dict) -> dict:
    text = json.dumps(definition)
    for name, value in VALUES.items():
        text = text.replace("${" + name + "}", value)
    return json.loads(text)


def stub_outcomes(definition: dict, name: str, outcomes: list[tuple[str, dict]]) -> None:
    """Replaces task ``name`` by a Choice over ``$.attempt.index`` (or a single outcome) whose
    branches give the recorded result or route the recorded error to the task's Catch."""
    task = definition["States"][name]
    branches = {}
    for i, (kind, value) in enumerate(outcomes):
        if kind == "ok":
            state = {"Type": "Pass", "Result": value, "ResultPath": task.get("ResultPath", "$"), "Next": task["Next"]}
        else:
            catch = next(c for c in task["Catch"] if "States.ALL" in c["ErrorEquals"] or value["Error"] in c["ErrorEquals"])
            state = {"Type": "Pass", "Result": value, "ResultPath": catch["ResultPath"], "Next": catch["Next"]}
        branches[f"{name}Outcome{i}"] = state
    if len(outcomes) == 1:
        definition["States"][name] = next(iter(branches.values()))
        return
    definition["States"][name] = {
        "Type": "Choice",
        "Choices": [{"Variable": "$.attempt.index", "NumericEquals": i, "Next": f"{name}Outcome{i}"} for i in range(len(outcomes))],
    }
    definition["States"].update(branches)


def stub_notifications(definition: dict) -> None:
    for name, state in definition["States"].items():
        if state.get("Resource") == "arn:aws:states:::sns:publish":
            definition["States"][name] = {"Type": "Pass", "Parameters": state["Parameters"], "ResultPath": f"$.sent.{name}", "Next": state["Next"]}


def run(definition: dict, execution_input: dict) -> tuple[dict, list[dict]]:
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        client = boto3.client("stepfunctions", region_name="us-east-1")
        arn = client.create_state_machine(name="ftstack", definition=json.dumps(definition), roleArn="arn:aws:iam::123456789012:role/sfn")["stateMachineArn"]
        execution = client.start_execution(stateMachineArn=arn, name="run1", input=json.dumps(execution_input))["executionArn"]
        deadline = time.monotonic() + 30
        while (described := client.describe_execution(executionArn=execution))["status"] == "RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        events = client.get_execution_history(executionArn=execution, maxResults=1000)["events"]
    return described, events


def exited(events: list[dict], state: str) -> list[dict]:
    return [json.loads(e["stateExitedEventDetails"]["output"]) for e in events
            if "stateExitedEventDetails" in e and e["stateExitedEventDetails"]["name"] == state]


def entered(events: list[dict]) -> list[str]:
    return [e["stateEnteredEventDetails"]["name"] for e in events if "stateEnteredEventDetails" in e]


def scenario(train: list[tuple[str, dict]], metrics: dict | None = None, settings: WorkflowSettings = SETTINGS,
             staging: tuple[str, dict] = ("ok", {"value": STAGED})) -> dict:
    definition = substituted(build_definition(settings))
    stub_outcomes(definition, "StageData", [staging])
    stub_outcomes(definition, "Train", train)
    stub_outcomes(definition, "DescribeFailedJob", [("ok", {"reason": "AlgorithmError: CUDA out of memory"})])
    stub_outcomes(definition, "ReadMetrics", [("ok", {"document": metrics or {"final": {"eval_cross_entropy": 1.2}}})])
    stub_outcomes(definition, "Register", [("ok", {"arn": "arn:aws:sagemaker:us-east-1:123456789012:model-package/ftstack-models/1"})])
    stub_notifications(definition)
    return definition


TRAINED = ("ok", {"name": "ftstack-run1-a0", "arn": "arn:aws:sagemaker:us-east-1:123456789012:training-job/ftstack-run1-a0"})


def test_happy_path_trains_gates_registers_and_notifies():
    described, events = run(scenario([TRAINED]), GOOD_INPUT)
    assert described["status"] == "SUCCEEDED", described
    states = entered(events)
    assert states.index("Train") < states.index("QualityGate") < states.index("Register") < states.index("NotifySuccess")
    (job,) = [out["job"] for out in exited(events, "PrepareAttempt")]
    assert job["name"] == "ftstack-run1-a0" and job["instance_type"] == "ml.p4d.24xlarge"
    assert job["stopping"] == {"MaxRuntimeInSeconds": 86400} and job["encrypt_traffic"] is False
    assert [c["ChannelName"] for c in job["channels"]["list"]] == ["train", "test"]
    (model,) = [out["model"] for out in exited(events, "LocateModel")]
    assert model == {
        "uri": "s3://ftstack-bucket/executions/run1/model/ftstack-run1-a0/output/model/",
        "metrics_key": "executions/run1/model/ftstack-run1-a0/output/model/metrics.json",
        "metrics_uri": "s3://ftstack-bucket/executions/run1/model/ftstack-run1-a0/output/model/metrics.json",
    }
    message = exited(events, "NotifySuccess")[0]["sent"]["NotifySuccess"]["Message"]
    assert "model-package/ftstack-models/1" in message and "1.2" in message and "ftstack-run1-a0" in message


def test_capacity_error_retries_with_a_new_name_on_the_next_instance_type():
    described, events = run(scenario([("error", CAPACITY), TRAINED]), GOOD_INPUT)
    assert described["status"] == "SUCCEEDED", described
    jobs = [out["job"] for out in exited(events, "PrepareAttempt")]
    assert [(j["name"], j["instance_type"]) for j in jobs] == [("ftstack-run1-a0", "ml.p4d.24xlarge"), ("ftstack-run1-a1", "ml.g5.48xlarge")]


def test_capacity_errors_on_every_instance_type_fail_with_a_notification():
    described, events = run(scenario([("error", CAPACITY), ("error", CAPACITY)]), GOOD_INPUT)
    assert described["status"] == "FAILED" and described["error"] == "TrainingFailed"
    assert "Register" not in entered(events)
    message = exited(events, "NotifyTrainingFailed")[0]["sent"]["NotifyTrainingFailed"]["Message"]
    assert "ftstack-run1-a1" in message and "logStreamNameFilter$3Dftstack-run1-a1" in message


def test_other_training_failures_are_not_retried_and_report_the_failure_reason():
    described, events = run(scenario([("error", OOM), TRAINED]), GOOD_INPUT)
    assert described["status"] == "FAILED" and described["error"] == "TrainingFailed"
    assert described["cause"] == "AlgorithmError: CUDA out of memory"
    assert len(exited(events, "PrepareAttempt")) == 1
    message = exited(events, "NotifyTrainingFailed")[0]["sent"]["NotifyTrainingFailed"]["Message"]
    assert "CUDA out of memory" in message and "ml.p4d.24xlarge" in message


@pytest.mark.parametrize(("metrics", "error"), [
    ({"final": {"eval_cross_entropy": 1.9}}, "QualityGateFailed"),
    ({"final": {}}, "MetricsMissing"),
    ({"final": {"eval_cross_entropy": None}}, "MetricsMissing"),
])
def test_quality_gate_fails_without_registering(metrics, error):
    described, events = run(scenario([TRAINED], metrics=metrics), GOOD_INPUT)
    assert described["status"] == "FAILED" and described["error"] == error, described
    if error == "MetricsMissing":
        assert described["cause"].startswith("s3://ftstack-bucket/executions/run1/model/ftstack-run1-a0/output/model/metrics.json ")
    assert "Register" not in entered(events)
    assert "NotifyError" in entered(events)


def test_without_a_threshold_there_is_no_gate():
    settings = WorkflowSettings(**{**SETTINGS.__dict__, "quality_threshold": None})
    described, events = run(scenario([TRAINED], metrics={"final": {"eval_cross_entropy": 9.0}}, settings=settings), GOOD_INPUT)
    assert described["status"] == "SUCCEEDED"
    assert "QualityGate" not in entered(events)


def test_spot_multi_node_and_model_channel_shape_the_job():
    staged = copy.deepcopy(STAGED) | {"spot": True, "instance_count": 2, "base_model": {"name": "s3://ftstack-bucket/base-models/mpt/", "s3_uri": "s3://ftstack-bucket/base-models/mpt/"}}
    described, events = run(scenario([TRAINED], staging=("ok", {"value": staged})), GOOD_INPUT)
    assert described["status"] == "SUCCEEDED"
    job = exited(events, "AddModelChannel")[0]["job"]
    assert job["stopping"] == {"MaxRuntimeInSeconds": 86400, "MaxWaitTimeInSeconds": 172800}
    assert job["encrypt_traffic"] is True
    assert job["channels"]["list"][-1]["ChannelName"] == "model"
    assert job["channels"]["list"][-1]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://ftstack-bucket/base-models/mpt/"


BAD_INPUTS = [
    ({}, "train_data is required"),
    ({"train_data": 3}, "train_data is required"),
    ({"train_data": "s3://other-bucket/incoming/x.jsonl"}, "train_data must be under s3://ftstack-bucket/incoming/"),
    ({"train_data": "s3://ftstack-bucket/elsewhere/x.jsonl"}, "train_data must be under"),
    (GOOD_INPUT | {"test_data": "https://example.com/x"}, "test_data must be"),
    (GOOD_INPUT | {"test_split": 0.9}, "test_split must be"),
    (GOOD_INPUT | {"test_split": 0}, "test_split must be"),
    (GOOD_INPUT | {"test_split": "0.1"}, "test_split must be"),
    (GOOD_INPUT | {"test_split": 0.1, "test_data": "s3://ftstack-bucket/incoming/t.jsonl"}, "not both"),
    (GOOD_INPUT | {"base_model": 7}, "base_model must be"),
    (GOOD_INPUT | {"hyperparameters": "lr=1"}, "hyperparameters must be an object"),
    (GOOD_INPUT | {"instance_type": "p4d.24xlarge"}, "instance_type must be"),
    (GOOD_INPUT | {"instance_count": 0}, "instance_count must be"),
    (GOOD_INPUT | {"instance_count": 5}, "instance_count must be"),
    (GOOD_INPUT | {"spot": "yes"}, "spot must be"),
]


@pytest.mark.parametrize(("execution_input", "message"), BAD_INPUTS)
def test_bad_input_fails_at_once_naming_the_field(execution_input, message):
    described, events = run(scenario([TRAINED]), execution_input)
    assert described["status"] == "FAILED" and described["error"] == "InvalidInput"
    assert message in described["cause"]
    assert "StageData" not in entered(events)


def test_staging_errors_keep_their_name_and_message():
    failure = ("error", {"Error": "InvalidDataset", "Cause": "train.jsonl:3: field 'prompt': is empty"})
    described, events = run(scenario([TRAINED], staging=failure), GOOD_INPUT)
    assert described["status"] == "FAILED" and described["error"] == "InvalidDataset"
    assert "train.jsonl:3" in described["cause"]
    assert "Train" not in entered(events)
