"""The fine-tuning workflow as Amazon States Language, built as plain data.

The definition is a dict with ``${Name}`` placeholders for the resources the stack creates (see
``PLACEHOLDERS``); ``infra.workflow`` hands it to Step Functions with the real values, and the tests
run the same dict in moto's interpreter with stand-ins for the service calls.

Validate input -> stage data (Lambda) -> train (SageMaker, ``.sync``; new job name and next instance
type on capacity errors) -> read metrics -> quality gate -> register (idempotent per job) -> notify.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftstack_train.contract import DEFAULT_ROOT, METRICS_FILE, MODEL_CHANNEL, TEST_CHANNEL, TRAIN_CHANNEL, SageMakerPaths
from ftstack_train.metrics import METRIC_DEFINITIONS

from .layout import JOB_MODEL_DIR

CONTAINER_PATHS = SageMakerPaths(Path(DEFAULT_ROOT))
"""The training container's folders, where SageMaker puts them."""

PLACEHOLDERS = (
    "Bucket", "KeyArn", "TrainingRoleArn", "TrainingImage", "InferenceImage", "StagingFunctionArn",
    "TopicArn", "ModelPackageGroupName",
)

CAPACITY_ERRORS = ("*CapacityError*", "*InsufficientInstanceCapacity*", "*InsufficientCapacity*")
"""How a training job that got no instances of its type reads in the failure cause."""

RETRYABLE_API_ERRORS = ["SageMaker.ThrottlingException", "ThrottlingException", "SageMaker.ResourceLimitExceededException"]
"""Rejected at CreateTrainingJob, so no job of that name exists: retrying the same name is safe."""

EVAL_CE = "$.metrics.document.final.eval_cross_entropy"
"""The final eval cross-entropy in the job's metrics.json, once read."""

LAMBDA_ERRORS = ["Lambda.ServiceException", "Lambda.AWSLambdaException", "Lambda.SdkClientException", "Lambda.TooManyRequestsException"]


@dataclass(frozen=True)
class WorkflowSettings:
    """What the definition needs from the deployment's configuration."""

    region: str
    volume_size_gb: int
    max_runtime_s: int
    max_wait_s: int
    max_instance_count: int
    network_isolation: bool
    subnets: tuple[str, ...]
    security_groups: tuple[str, ...]
    approval_status: str
    quality_threshold: float | None


def _input_checks(max_instance_count: int) -> list[tuple[str, dict[str, Any], str]]:
    """(field, condition that makes the input invalid, message) in the order they are checked."""
    def present(path: str) -> dict[str, Any]:
        return {"Variable": path, "IsPresent": True}

    def missing_or(path: str, *bad: dict[str, Any]) -> dict[str, Any]:
        return {"Or": [{"Not": present(path)}, *bad]}

    def when_present(path: str, *bad: dict[str, Any]) -> dict[str, Any]:
        return {"And": [present(path), {"Or": list(bad)} if len(bad) > 1 else bad[0]]}

    incoming = "s3://${Bucket}/incoming/*"
    return [
        ("train_data", missing_or("$.train_data", {"Not": {"Variable": "$.train_data", "IsString": True}}),
         "train_data is required: the s3:// URI of the training JSONL, uploaded under s3://${Bucket}/incoming/"),
        ("train_data", {"Not": {"Variable": "$.train_data", "StringMatches": incoming}},
         "train_data must be under s3://${Bucket}/incoming/; upload the file there"),
        ("test_data", when_present("$.test_data", {"Not": {"Variable": "$.test_data", "IsString": True}},
                                   {"Not": {"Variable": "$.test_data", "StringMatches": incoming}}),
         "test_data must be an s3:// URI under s3://${Bucket}/incoming/"),
        ("test_split", when_present("$.test_split", {"Not": {"Variable": "$.test_split", "IsNumeric": True}},
                                    {"Variable": "$.test_split", "NumericLessThanEquals": 0},
                                    {"Variable": "$.test_split", "NumericGreaterThan": 0.5}),
         "test_split must be a number above 0 and at most 0.5, e.g. 0.05"),
        ("test_split", {"And": [present("$.test_data"), present("$.test_split")]},
         "give test_data or test_split, not both"),
        ("base_model", when_present("$.base_model", {"Not": {"Variable": "$.base_model", "IsString": True}}),
         "base_model must be a string: a hub id such as mosaicml/mpt-7b or an s3:// URI"),
        ("hyperparameters", when_present("$.hyperparameters", {"Variable": "$.hyperparameters", "IsString": True},
                                         {"Variable": "$.hyperparameters", "IsNumeric": True},
                                         {"Variable": "$.hyperparameters", "IsBoolean": True},
                                         {"Variable": "$.hyperparameters", "IsNull": True}),
         "hyperparameters must be an object of names to values, e.g. {\"optimizer.lr\": \"1e-5\"}"),
        ("instance_type", when_present("$.instance_type", {"Not": {"Variable": "$.instance_type", "IsString": True}},
                                       {"Not": {"Variable": "$.instance_type", "StringMatches": "ml.*"}}),
         "instance_type must be a SageMaker instance type, e.g. ml.p4d.24xlarge"),
        ("instance_count", when_present("$.instance_count", {"Not": {"Variable": "$.instance_count", "IsNumeric": True}},
                                        {"Variable": "$.instance_count", "NumericLessThan": 1},
                                        {"Variable": "$.instance_count", "NumericGreaterThan": max_instance_count}),
         f"instance_count must be a whole number from 1 to {max_instance_count}"),
        ("spot", when_present("$.spot", {"Not": {"Variable": "$.spot", "IsBoolean": True}}),
         "spot must be true or false"),
    ]


def _state_name(field: str, index: int) -> str:
    return f"InvalidInput{index:02d}_{field}"


def _catch_all(next_state: str) -> list[dict[str, Any]]:
    return [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": next_state}]


def _channel(name: str, uri_path: str) -> dict[str, Any]:
    return {
        "ChannelName": name,
        "ContentType": "application/jsonlines" if name != MODEL_CHANNEL else "application/octet-stream",
        "InputMode": "File",
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3DataDistributionType": "FullyReplicated", "S3Uri.$": uri_path}},
    }


def _job_setup_states(s: WorkflowSettings) -> dict[str, Any]:
    """Per-attempt values: job name, instance type, stopping condition, channels, encryption."""
    data_channels = [_channel(TRAIN_CHANNEL, "$.staged.train.s3_uri"), _channel(TEST_CHANNEL, "$.staged.test.s3_uri")]
    return {
        "PrepareAttempt": {
            "Type": "Pass",
            "Parameters": {
                "name.$": "States.Format('{}-a{}', $.staged.job_name_prefix, $.attempt.index)",
                "instance_type.$": "States.ArrayGetItem($.staged.instance_types, $.attempt.index)",
                "encrypt_traffic": False,
                "stopping": {"MaxRuntimeInSeconds": s.max_runtime_s},
                "channels": {"list": data_channels},  # Pass states build objects, not bare arrays
            },
            "ResultPath": "$.job",
            "Next": "MultiNode?",
        },
        "MultiNode?": {
            "Type": "Choice",
            "Choices": [{"Variable": "$.staged.instance_count", "NumericGreaterThan": 1, "Next": "EncryptInterNodeTraffic"}],
            "Default": "Spot?",
        },
        "EncryptInterNodeTraffic": {"Type": "Pass", "Result": True, "ResultPath": "$.job.encrypt_traffic", "Next": "Spot?"},
        "Spot?": {
            "Type": "Choice",
            "Choices": [{"Variable": "$.staged.spot", "BooleanEquals": True, "Next": "SpotStoppingCondition"}],
            "Default": "ModelChannel?",
        },
        "SpotStoppingCondition": {
            "Type": "Pass",
            "Result": {"MaxRuntimeInSeconds": s.max_runtime_s, "MaxWaitTimeInSeconds": s.max_wait_s},
            "ResultPath": "$.job.stopping",
            "Next": "ModelChannel?",
        },
        "ModelChannel?": {
            "Type": "Choice",
            "Choices": [{"Not": {"Variable": "$.staged.base_model.s3_uri", "StringEquals": ""}, "Next": "AddModelChannel"}],
            "Default": "Train",
        },
        "AddModelChannel": {
            "Type": "Pass",
            "Parameters": {"list": data_channels + [_channel(MODEL_CHANNEL, "$.staged.base_model.s3_uri")]},
            "ResultPath": "$.job.channels",
            "Next": "Train",
        },
    }


def _train_state(s: WorkflowSettings) -> dict[str, Any]:
    params: dict[str, Any] = {
        "TrainingJobName.$": "$.job.name",
        "RoleArn": "${TrainingRoleArn}",
        "AlgorithmSpecification": {
            "TrainingImage": "${TrainingImage}",
            "TrainingInputMode": "File",
            "MetricDefinitions": [{"Name": d.name, "Regex": d.regex} for d in METRIC_DEFINITIONS],
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "HyperParameters.$": "$.staged.hyperparameters",
        "InputDataConfig.$": "$.job.channels.list",
        "OutputDataConfig": {"S3OutputPath.$": "$.staged.output_uri", "KmsKeyId": "${KeyArn}", "CompressionType": "NONE"},
        "ResourceConfig": {
            "InstanceType.$": "$.job.instance_type",
            "InstanceCount.$": "$.staged.instance_count",
            "VolumeSizeInGB": s.volume_size_gb,
            "VolumeKmsKeyId": "${KeyArn}",
        },
        "StoppingCondition.$": "$.job.stopping",
        "EnableManagedSpotTraining.$": "$.staged.spot",
        "CheckpointConfig": {"S3Uri.$": "$.staged.checkpoint_uri", "LocalPath": str(CONTAINER_PATHS.checkpoints)},
        "EnableInterContainerTrafficEncryption.$": "$.job.encrypt_traffic",
        "EnableNetworkIsolation": s.network_isolation,
        "Tags": [{"Key": "ftstack:execution", "Value.$": "$$.Execution.Name"}],
    }
    if s.subnets:
        params["VpcConfig"] = {"Subnets": list(s.subnets), "SecurityGroupIds": list(s.security_groups)}
    return {
        "Type": "Task",
        "Resource": "arn:aws:states:::sagemaker:createTrainingJob.sync",
        "Parameters": params,
        "ResultSelector": {"name.$": "$.TrainingJobName", "arn.$": "$.TrainingJobArn"},
        "ResultPath": "$.training",
        "Retry": [{"ErrorEquals": RETRYABLE_API_ERRORS, "IntervalSeconds": 30, "BackoffRate": 2.0, "MaxAttempts": 6}],
        "Catch": _catch_all("CapacityProblem?"),
        "Next": "LocateModel",
    }


def _failure_states(s: WorkflowSettings) -> dict[str, Any]:
    logs = (
        f"https://{s.region}.console.aws.amazon.com/cloudwatch/home?region={s.region}"
        "#logsV2:log-groups/log-group/$252Faws$252Fsagemaker$252FTrainingJobs$3FlogStreamNameFilter$3D{}"
    )
    return {
        "CapacityProblem?": {
            "Type": "Choice",
            "Choices": [{"Or": [{"Variable": "$.error.Cause", "StringMatches": p} for p in CAPACITY_ERRORS], "Next": "NextInstanceType"}],
            "Default": "DescribeFailedJob",
        },
        "NextInstanceType": {
            "Type": "Pass",
            "Parameters": {"index.$": "States.MathAdd($.attempt.index, 1)", "count.$": "States.ArrayLength($.staged.instance_types)"},
            "ResultPath": "$.attempt",
            "Next": "InstanceTypeLeft?",
        },
        "InstanceTypeLeft?": {
            "Type": "Choice",
            "Choices": [{"Variable": "$.attempt.index", "NumericLessThanPath": "$.attempt.count", "Next": "PrepareAttempt"}],
            "Default": "DescribeFailedJob",
        },
        "DescribeFailedJob": {
            "Type": "Task",
            "Resource": "arn:aws:states:::aws-sdk:sagemaker:describeTrainingJob",
            "Parameters": {"TrainingJobName.$": "$.job.name"},
            "ResultSelector": {"reason.$": "$.FailureReason"},
            "ResultPath": "$.failure",
            "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.describe_error", "Next": "FailureFromError"}],
            "Next": "NotifyTrainingFailed",
        },
        "FailureFromError": {
            "Type": "Pass",
            "Parameters": {"reason.$": "$.error.Cause"},
            "ResultPath": "$.failure",
            "Next": "NotifyTrainingFailed",
        },
        "NotifyTrainingFailed": {
            "Type": "Task",
            "Resource": "arn:aws:states:::sns:publish",
            "Parameters": {
                "TopicArn": "${TopicArn}",
                "Subject": "ftstack: training failed",
                "Message.$": "States.Format('Execution {} failed in training job {} ({}).\\n\\nReason: {}\\n\\nLogs: "
                + logs + "', $$.Execution.Name, $.job.name, $.job.instance_type, $.failure.reason, $.job.name)",
            },
            "ResultPath": None,
            "Next": "TrainingFailed",
        },
        "TrainingFailed": {"Type": "Fail", "Error": "TrainingFailed", "CausePath": "$.failure.reason"},
        "NotifyError": {
            "Type": "Task",
            "Resource": "arn:aws:states:::sns:publish",
            "Parameters": {
                "TopicArn": "${TopicArn}",
                "Subject": "ftstack: run failed",
                "Message.$": "States.Format('Execution {} failed: {}\\n\\n{}', $$.Execution.Name, $.error.Error, $.error.Cause)",
            },
            "ResultPath": None,
            "Next": "Failed",
        },
        "Failed": {"Type": "Fail", "ErrorPath": "$.error.Error", "CausePath": "$.error.Cause"},
    }


def _result_states(s: WorkflowSettings) -> dict[str, Any]:
    states: dict[str, Any] = {
        "LocateModel": {  # the one place that spells out where the job's model and metrics.json are
            "Type": "Pass",
            "Parameters": {
                "uri.$": f"States.Format('{{}}{{}}/{JOB_MODEL_DIR}', $.staged.output_uri, $.job.name)",
                "metrics_key.$": f"States.Format('{{}}{{}}/{JOB_MODEL_DIR}{METRICS_FILE}', $.staged.output_prefix, $.job.name)",
                "metrics_uri.$": f"States.Format('{{}}{{}}/{JOB_MODEL_DIR}{METRICS_FILE}', $.staged.output_uri, $.job.name)",
            },
            "ResultPath": "$.model",
            "Next": "ReadMetrics",
        },
        "ReadMetrics": {
            "Type": "Task",
            "Resource": "arn:aws:states:::aws-sdk:s3:getObject",
            "Parameters": {"Bucket": "${Bucket}", "Key.$": "$.model.metrics_key"},
            "ResultSelector": {"document.$": "States.StringToJson($.Body)"},
            "ResultPath": "$.metrics",
            "Catch": _catch_all("NotifyError"),
            "Next": "MetricsComplete?",
        },
        "MetricsComplete?": {
            "Type": "Choice",
            "Choices": [{"And": [
                {"Variable": f"{EVAL_CE}", "IsPresent": True},
                {"Variable": f"{EVAL_CE}", "IsNumeric": True},
            ], "Next": "QualityGate" if s.quality_threshold is not None else "Register"}],
            "Default": "MetricsIncomplete",
        },
        "MetricsIncomplete": {
            "Type": "Pass",
            "Parameters": {
                "Error": "MetricsMissing",
                "Cause.$": "States.Format('{} of training job {} has no numeric final.eval_cross_entropy; nothing was registered', $.model.metrics_uri, $.job.name)",
            },
            "ResultPath": "$.error",
            "Next": "NotifyError",
        },
        "Register": {
            "Type": "Task",
            "Resource": "arn:aws:states:::aws-sdk:sagemaker:createModelPackage",
            "Parameters": {
                "ModelPackageGroupName": "${ModelPackageGroupName}",
                "ModelPackageDescription.$": "States.Format('Fine-tuned from {} by execution {}', $.staged.base_model.name, $$.Execution.Name)",
                # The same job always sends the same token, so a re-run of this step returns the
                # package it created the first time instead of registering a second one.
                "ClientToken.$": "$.job.name",
                "ModelApprovalStatus": s.approval_status,
                "InferenceSpecification": {
                    "Containers": [{
                        "Image": "${InferenceImage}",
                        "ModelDataSource": {"S3DataSource": {"S3Uri.$": "$.model.uri", "S3DataType": "S3Prefix", "CompressionType": "None"}},
                        "Environment": {"HF_MODEL_ID": "/opt/ml/model"},
                    }],
                    "SupportedContentTypes": ["application/json"],
                    "SupportedResponseMIMETypes": ["application/json"],
                },
                "ModelMetrics": {"ModelQuality": {"Statistics": {
                    "ContentType": "application/json",
                    "S3Uri.$": "$.model.metrics_uri",
                }}},
                "CustomerMetadataProperties": {
                    "base_model.$": "$.staged.base_model.name",
                    "dataset_sha256.$": "$.staged.dataset_sha256",
                    "training_job.$": "$.job.name",
                    "execution.$": "$$.Execution.Name",
                    "training_image": "${TrainingImage}",
                    "eval_cross_entropy.$": "States.Format('{}', $.metrics.document.final.eval_cross_entropy)",
                },
            },
            "ResultSelector": {"arn.$": "$.ModelPackageArn"},
            "ResultPath": "$.registered",
            "Retry": [{"ErrorEquals": ["SageMaker.ThrottlingException", "SageMaker.SageMakerException"], "IntervalSeconds": 5, "BackoffRate": 2.0, "MaxAttempts": 4}],
            "Catch": _catch_all("NotifyError"),
            "Next": "NotifySuccess",
        },
        "NotifySuccess": {
            "Type": "Task",
            "Resource": "arn:aws:states:::sns:publish",
            "Parameters": {
                "TopicArn": "${TopicArn}",
                "Subject": "ftstack: model registered",
                "Message.$": "States.Format('Execution {} registered model package {} (eval cross-entropy {}, training job {}). "
                "Review and approve it in the SageMaker Model Registry.', $$.Execution.Name, $.registered.arn, "
                "$.metrics.document.final.eval_cross_entropy, $.job.name)",
            },
            "ResultPath": None,
            "Next": "Succeeded",
        },
        "Succeeded": {"Type": "Succeed"},
    }
    if s.quality_threshold is not None:
        states["QualityGate"] = {
            "Type": "Choice",
            "Choices": [{"Variable": EVAL_CE, "NumericLessThanEquals": s.quality_threshold, "Next": "Register"}],
            "Default": "QualityGateFailed",
        }
        states["QualityGateFailed"] = {
            "Type": "Pass",
            "Parameters": {
                "Error": "QualityGateFailed",
                "Cause.$": f"States.Format('final eval cross-entropy {{}} of training job {{}} is above the threshold {s.quality_threshold}; nothing was registered', $.metrics.document.final.eval_cross_entropy, $.job.name)",
            },
            "ResultPath": "$.error",
            "Next": "NotifyError",
        }
    return states


def build_definition(s: WorkflowSettings) -> dict[str, Any]:
    """The whole state machine; ``${...}`` placeholders stand for the stack's resources."""
    checks = _input_checks(s.max_instance_count)
    states: dict[str, Any] = {
        "CheckInput": {
            "Type": "Choice",
            "Choices": [dict(condition, Next=_state_name(field, i)) for i, (field, condition, _) in enumerate(checks)],
            "Default": "StageData",
        },
    }
    for i, (field, _, message) in enumerate(checks):
        states[_state_name(field, i)] = {"Type": "Fail", "Error": "InvalidInput", "Cause": message}
    states["StageData"] = {
        "Type": "Task",
        "Resource": "arn:aws:states:::lambda:invoke",
        "Parameters": {"FunctionName": "${StagingFunctionArn}", "Payload": {"execution.$": "$$.Execution.Name", "input.$": "$"}},
        "ResultSelector": {"value.$": "$.Payload"},
        "ResultPath": "$.staging",
        "Retry": [{"ErrorEquals": LAMBDA_ERRORS, "IntervalSeconds": 2, "BackoffRate": 2.0, "MaxAttempts": 4}],
        "Catch": _catch_all("NotifyError"),
        "Next": "Staged",
    }
    states["Staged"] = {
        "Type": "Pass",
        "Parameters": {"staged.$": "$.staging.value", "attempt": {"index": 0}},
        "Next": "PrepareAttempt",
    }
    states |= _job_setup_states(s)
    states["Train"] = _train_state(s)
    states |= _failure_states(s)
    states |= _result_states(s)
    return {
        "Comment": "ftstack: validate and stage data, fine-tune on SageMaker, gate, register, notify",
        "StartAt": "CheckInput",
        "States": states,
    }


def render(definition: dict[str, Any]) -> str:
    """The definition as JSON, placeholders intact (Step Functions substitutes them)."""
    return json.dumps(definition, indent=1, sort_keys=False)
