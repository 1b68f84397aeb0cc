"""The training part of the workflow: one attempt per instance type, each a training job started
through the ``aws-sdk`` integration and followed by a poll loop, and the way out of it.

Why ``aws-sdk:sagemaker:createTrainingJob`` and not the optimized ``createTrainingJob.sync``:
Step Functions checks an optimized integration's Parameters against a schema of its own when the
state machine is created, and that schema lags the SageMaker API (``SCHEMA_VALIDATION_FAILED: The
field "X" is not supported by Step Functions``: aws/aws-cdk#10014, and
aws/aws-step-functions-data-science-sdk-python#15 and #200). No AWS document lists the fields
that schema accepts, so nothing shows that ``OutputDataConfig.CompressionType`` (the uncompressed
model output) or ``EnableSageMakerMetricsTimeSeries`` are among them. The ``aws-sdk`` integration
passes the API's own request, whose every member the tests check against botocore's model of
CreateTrainingJob. The price is the poll loop below, and a rule that stops a running job when its
execution is aborted or times out (``infra.job_reaper``), which ``.sync`` did by itself.

Fallback: an instance type that SageMaker cannot provide (a capacity error in the job, or a quota
too low for it at CreateTrainingJob) moves the run on, at once, to the next type, under a new job
name. The notification names the Service Quotas quota to raise for each type that hit its quota.
"""

from __future__ import annotations

import math
from typing import Any

from ftstack_train.contract import MODEL_CHANNEL, TEST_CHANNEL, TRAIN_CHANNEL
from ftstack_train.metrics import METRIC_DEFINITIONS

from .settings import CONTAINER_PATHS, EXECUTION_TAG, WorkflowSettings
from .stage_data.request import ATTEMPT_SUFFIX

CAPACITY_ERRORS = ("*CapacityError*", "*InsufficientInstanceCapacity*", "*InsufficientCapacity*")
"""How a training job that got no instances of its type reads in its FailureReason."""

QUOTA_ERROR = "SageMaker.ResourceLimitExceededException"
"""CreateTrainingJob's error when the account's quota for the instance type is too low. Step
Functions names aws-sdk errors ``<Service>.<SDK exception class>``; the cause carries the API's
own code, which the fallback also matches, in case the name differs."""

API_RETRY = [
    {"ErrorEquals": ["SageMaker.ThrottlingException", "ThrottlingException"], "IntervalSeconds": 30, "BackoffRate": 2.0, "MaxAttempts": 6},
    # Errors without a modelled exception (a validation error as much as a passing 5xx) all
    # arrive as SageMakerException: two quick tries, not half an hour of repeating a bad request.
    {"ErrorEquals": ["SageMaker.SageMakerException"], "IntervalSeconds": 5, "BackoffRate": 2.0, "MaxAttempts": 2},
]
"""Retries of SageMaker calls. A refused CreateTrainingJob made no job, so the same name is free."""

MAX_POLLS = 2000
"""A standard execution keeps at most 25,000 history events; one poll adds about 9 (Wait, Task,
Choice), so 2,000 polls stay well inside it whatever the job's length."""

MIN_POLL_SECONDS = 60

JOB_STATUSES = ("InProgress", "Completed", "Failed", "Stopping", "Stopped")


def poll_seconds(s: WorkflowSettings) -> int:
    """Seconds between two looks at a running job: a minute, or longer when the longest job
    (spot wait included) would otherwise need more than ``MAX_POLLS`` looks."""
    return max(MIN_POLL_SECONDS, math.ceil(max(s.max_runtime_s, s.max_wait_s) / MAX_POLLS))


def _channel(name: str, uri_path: str) -> dict[str, Any]:
    return {
        "ChannelName": name,
        "ContentType": "application/jsonlines" if name != MODEL_CHANNEL else "application/octet-stream",
        "InputMode": "File",
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3DataDistributionType": "FullyReplicated", "S3Uri.$": uri_path}},
    }


def _resource(s: WorkflowSettings, encrypted_volume: bool) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "InstanceType.$": "$.job.instance_type",
        "InstanceCount.$": "$.staged.instance_count",
        "VolumeSizeInGB": s.volume_size_gb,
    }
    if encrypted_volume:
        resource["VolumeKmsKeyId"] = "${KeyArn}"
    return resource


def attempt_states(s: WorkflowSettings) -> dict[str, Any]:
    """Per-attempt values: job name, instance type, stopping condition, channels, resources."""
    data_channels = [_channel(TRAIN_CHANNEL, "$.staged.train.s3_uri"), _channel(TEST_CHANNEL, "$.staged.test.s3_uri")]
    return {
        "PrepareAttempt": {
            "Type": "Pass",
            "Parameters": {
                "name.$": f"States.Format('{{}}{ATTEMPT_SUFFIX}{{}}', $.staged.job_name_prefix, $.attempt.index)",
                "instance_type.$": "States.ArrayGetItem($.staged.instance_types, $.attempt.index)",
                "encrypt_traffic": False,
                "stopping": {"MaxRuntimeInSeconds": s.max_runtime_s},
                "channels": {"list": data_channels},  # Pass states build objects, not bare arrays
            },
            "ResultPath": "$.job",
            "Next": "Resources",
        },
        "Resources": {
            "Type": "Pass",
            "Parameters": _resource(s, encrypted_volume=False),
            "ResultPath": "$.job.resource",
            "Next": "VolumeKms?",
        },
        # CreateTrainingJob rejects VolumeKmsKeyId for instance types with local NVMe storage
        # instead of an EBS volume (their storage is encrypted by the hardware). The list is
        # sagemaker-core's rule (instance_supports_kms) evaluated for the known types at synth.
        "VolumeKms?": {
            "Type": "Choice",
            "Choices": [{
                "Or": [{"Variable": "$.job.instance_type", "StringEquals": t} for t in s.volume_kms_instance_types],
                "Next": "EncryptVolume",
            }] if s.volume_kms_instance_types else [],
            "Default": "MultiNode?",
        } if s.volume_kms_instance_types else {"Type": "Pass", "Next": "MultiNode?"},
        "EncryptVolume": {
            "Type": "Pass",
            "Parameters": _resource(s, encrypted_volume=True),
            "ResultPath": "$.job.resource",
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


def train_states(s: WorkflowSettings) -> dict[str, Any]:
    """CreateTrainingJob, then a look at the job every ``poll_seconds`` until it has ended."""
    params: dict[str, Any] = {
        "TrainingJobName.$": "$.job.name",
        "RoleArn": "${TrainingRoleArn}",
        "AlgorithmSpecification": {
            "TrainingImage": "${TrainingImage}",
            "TrainingInputMode": "File",
            "MetricDefinitions": [{"Name": d.name, "Regex": d.regex} for d in (*METRIC_DEFINITIONS, *s.extra_metrics)],
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "HyperParameters.$": "$.staged.hyperparameters",
        "InputDataConfig.$": "$.job.channels.list",
        "OutputDataConfig": {"S3OutputPath.$": "$.staged.output_uri", "CompressionType": "NONE"}
        | ({"KmsKeyId": "${BucketKeyArn}"} if s.encrypt_output else {}),
        "ResourceConfig.$": "$.job.resource",
        "StoppingCondition.$": "$.job.stopping",
        "EnableManagedSpotTraining.$": "$.staged.spot",
        "CheckpointConfig": {"S3Uri.$": "$.staged.checkpoint_uri", "LocalPath": str(CONTAINER_PATHS.checkpoints)},
        "EnableInterContainerTrafficEncryption.$": "$.job.encrypt_traffic",
        "EnableNetworkIsolation": s.network_isolation,
        "Tags": [{"Key": EXECUTION_TAG, "Value.$": "$$.Execution.Name"}] + [{"Key": k, "Value": v} for k, v in s.tags],
    }
    if s.subnets:
        params["VpcConfig"] = {"Subnets": list(s.subnets), "SecurityGroupIds": list(s.security_groups)}
    describe = {"TrainingJobName.$": "$.job.name"}
    return {
        "Train": {
            "Type": "Task",
            "Resource": "arn:aws:states:::aws-sdk:sagemaker:createTrainingJob",
            "Parameters": params,
            "ResultSelector": {"arn.$": "$.TrainingJobArn"},
            "ResultPath": "$.training",
            "Retry": API_RETRY,
            "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "QuotaTooLow?"}],
            "Next": "WaitForJob",
        },
        "WaitForJob": {"Type": "Wait", "Seconds": poll_seconds(s), "Next": "PollJob"},
        "PollJob": {
            "Type": "Task",
            "Resource": "arn:aws:states:::aws-sdk:sagemaker:describeTrainingJob",
            "Parameters": describe,
            # Both are required members of the response; FailureReason is not (see DescribeEndedJob).
            "ResultSelector": {"status.$": "$.TrainingJobStatus", "secondary.$": "$.SecondaryStatus"},
            "ResultPath": "$.poll",
            "Retry": API_RETRY,
            "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "NotifyError"}],
            "Next": "JobEnded?",
        },
        "JobEnded?": {
            "Type": "Choice",
            "Choices": [
                {"Variable": "$.poll.status", "StringEquals": "Completed", "Next": "LocateModel"},
                {"Or": [{"Variable": "$.poll.status", "StringEquals": "Failed"},
                        {"Variable": "$.poll.status", "StringEquals": "Stopped"}], "Next": "DescribeEndedJob"},
            ],
            "Default": "WaitForJob",
        },
        # A stopped job (MaxRuntimeExceeded, MaxWaitTimeExceeded, StopTrainingJob) has no
        # FailureReason, and a ResultSelector path that is missing is a States.Runtime error that
        # no Catch handles: keep the whole response here and pick from it with IsPresent.
        "DescribeEndedJob": {
            "Type": "Task",
            "Resource": "arn:aws:states:::aws-sdk:sagemaker:describeTrainingJob",
            "Parameters": describe,
            "ResultPath": "$.ended",
            "Retry": API_RETRY,
            "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "NotifyError"}],
            "Next": "FailureReason?",
        },
        "FailureReason?": {
            "Type": "Choice",
            "Choices": [{"Variable": "$.ended.FailureReason", "IsPresent": True, "Next": "JobFailed"}],
            "Default": "JobStopped",
        },
        "JobFailed": {
            "Type": "Pass",
            "Parameters": {"status.$": "$.ended.TrainingJobStatus", "secondary.$": "$.ended.SecondaryStatus",
                           "reason.$": "$.ended.FailureReason"},
            "ResultPath": "$.ended",
            "Next": "CapacityProblem?",
        },
        "JobStopped": {
            "Type": "Pass",
            "Parameters": {
                "status.$": "$.ended.TrainingJobStatus", "secondary.$": "$.ended.SecondaryStatus",
                "reason.$": "States.Format('the job was stopped ({}). MaxRuntimeExceeded: raise the max_runtime_hours "
                            "context key (and max_wait_hours with spot) and redeploy. MaxWaitTimeExceeded: spot capacity "
                            "did not come in time; raise max_wait_hours or start without spot. To continue from the last "
                            "checkpoint, start a new execution with the same input and \"resume_from\": \"{}\".', "
                            "$.ended.SecondaryStatus, $$.Execution.Name)",
            },
            "ResultPath": "$.ended",
            "Next": "NotifyTrainingFailed",
        },
        "CapacityProblem?": {
            "Type": "Choice",
            "Choices": [{"Or": [{"Variable": "$.ended.reason", "StringMatches": p} for p in CAPACITY_ERRORS], "Next": "NextInstanceType"}],
            "Default": "NotifyTrainingFailed",
        },
    }


def fallback_states(s: WorkflowSettings) -> dict[str, Any]:
    """From a quota or capacity problem to the next instance type, or to the notification."""
    quota_error = {"Or": [{"Variable": "$.error.Error", "StringEquals": QUOTA_ERROR},
                          {"Variable": "$.error.Cause", "StringMatches": "*ResourceLimitExceeded*"}]}

    def note(spot: bool) -> dict[str, Any]:
        name = "{} for " + ("spot " if spot else "") + "training job usage"
        return {
            "Type": "Pass",
            "Parameters": {
                "quotas.$": "States.Format('{}Request an increase of the Service Quotas quota \"" + name + "\" "
                            "(Amazon SageMaker, " + s.region + ") to at least {} instances. ', "
                            "$.notes.quotas, $.job.instance_type, $.staged.instance_count)",
            },
            "ResultPath": "$.notes",
            "Next": "NextInstanceType",
        }

    return {
        "QuotaTooLow?": {"Type": "Choice", "Choices": [dict(quota_error, Next="QuotaTooLow")], "Default": "NotifyError"},
        "QuotaTooLow": {
            "Type": "Pass",
            "Parameters": {"status": "NotCreated", "secondary": "ResourceLimitExceeded", "reason.$": "$.error.Cause"},
            "ResultPath": "$.ended",
            "Next": "SpotQuota?",
        },
        "SpotQuota?": {
            "Type": "Choice",
            "Choices": [{"Variable": "$.staged.spot", "BooleanEquals": True, "Next": "NoteSpotQuota"}],
            "Default": "NoteQuota",
        },
        "NoteQuota": note(spot=False),
        "NoteSpotQuota": note(spot=True),
        "NextInstanceType": {
            "Type": "Pass",
            "Parameters": {"index.$": "States.MathAdd($.attempt.index, 1)", "count.$": "States.ArrayLength($.staged.instance_types)"},
            "ResultPath": "$.attempt",
            "Next": "InstanceTypeLeft?",
        },
        "InstanceTypeLeft?": {
            "Type": "Choice",
            "Choices": [{"Variable": "$.attempt.index", "NumericLessThanPath": "$.attempt.count", "Next": "PrepareAttempt"}],
            "Default": "NotifyTrainingFailed",
        },
    }
