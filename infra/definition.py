"""The fine-tuning workflow as Amazon States Language, built as plain data.

The definition is a dict with ``${Name}`` placeholders for the resources the stack creates (see
``PLACEHOLDERS``); ``infra.workflow`` hands it to Step Functions with the real values, and the tests
run the same dict in moto's interpreter with stand-ins for the service calls.

Validate input -> stage data (Lambda) -> train (SageMaker, a poll loop; new job name and next
instance type on capacity and quota errors, see ``infra.training_states``) -> read the final
metrics -> pin the model's files (Lambda) -> quality gate -> register (idempotent per job) -> notify.
"""

from __future__ import annotations

import json
from typing import Any

from ftstack.s3_model import VERSIONS_SHA256
from ftstack.serving import registration_environment
from ftstack_train.contract import FINAL_EVAL_CE, FINAL_METRICS_FILE, MANIFEST_SHA256, METRICS_FILE

from .extensions import (
    EVALUATED, STATE_NAMES, clashing_state_names, evaluation_checks, extension_state, gate_rules,
)
from .layout import JOB_MODEL_DIR, Layout
from .model_check import REGISTRATION
from .options import PropsError
from .stage_data.fields import MODEL_PACKAGE_DESCRIPTION
from .settings import WorkflowSettings
from .training_states import attempt_states, fallback_states, train_states

__all__ = ["PLACEHOLDERS", "WorkflowSettings", "build_definition", "render"]

PLACEHOLDERS = (
    "Bucket", "KeyArn", "BucketKeyArn", "TrainingRoleArn", "TrainingImage", "InferenceImage", "StagingFunctionArn",
    "ModelCheckFunctionArn", "TopicArn", "ModelPackageGroupName",
)

EVAL_CE = f"$.metrics.final.{FINAL_EVAL_CE}"
"""The final eval cross-entropy, once the job's final-metrics file is read."""
MANIFEST_DIGEST = f"$.metrics.final.{MANIFEST_SHA256}"
"""The SHA-256 of the model's manifest (``ftstack_train.manifest``), registered with the package."""

LAMBDA_ERRORS = ["Lambda.ServiceException", "Lambda.AWSLambdaException", "Lambda.SdkClientException"]
LAMBDA_RETRY = [
    {"ErrorEquals": LAMBDA_ERRORS, "IntervalSeconds": 2, "BackoffRate": 2.0, "MaxAttempts": 4},
    # Throttled by the function's reserved concurrency (staging's is staging_concurrency): a burst
    # of runs waits its turn, 10 s doubling over 8 tries (about 40 minutes), instead of failing.
    {"ErrorEquals": ["Lambda.TooManyRequestsException"], "IntervalSeconds": 10, "BackoffRate": 2.0, "MaxAttempts": 8},
]


def _input_checks(max_instance_count: int, prefix: str) -> list[tuple[str, dict[str, Any], str]]:
    """(field, condition that makes the input invalid, message) in the order they are checked."""
    def present(path: str) -> dict[str, Any]:
        return {"Variable": path, "IsPresent": True}

    def missing_or(path: str, *bad: dict[str, Any]) -> dict[str, Any]:
        return {"Or": [{"Not": present(path)}, *bad]}

    def when_present(path: str, *bad: dict[str, Any]) -> dict[str, Any]:
        return {"And": [present(path), {"Or": list(bad)} if len(bad) > 1 else bad[0]]}

    folder = f"s3://${{Bucket}}/{Layout(prefix).incoming}"
    incoming = folder + "*"
    return [
        ("train_data", missing_or("$.train_data", {"Not": {"Variable": "$.train_data", "IsString": True}}),
         f"train_data is required: the s3:// URI of the training JSONL, uploaded under {folder}"),
        ("train_data", {"Not": {"Variable": "$.train_data", "StringMatches": incoming}},
         f"train_data must be under {folder}; upload the file there"),
        ("test_data", when_present("$.test_data", {"Not": {"Variable": "$.test_data", "IsString": True}},
                                   {"Not": {"Variable": "$.test_data", "StringMatches": incoming}}),
         f"test_data must be an s3:// URI under {folder}"),
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
        ("force", when_present("$.force", {"Not": {"Variable": "$.force", "IsBoolean": True}}),
         "force must be true or false"),
    ]


def _state_name(field: str, index: int) -> str:
    return f"InvalidInput{index:02d}_{field}"


def _catch_all(next_state: str) -> list[dict[str, Any]]:
    return [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": next_state}]


def _failure_states(s: WorkflowSettings) -> dict[str, Any]:
    logs = (
        f"https://{s.region}.console.aws.amazon.com/cloudwatch/home?region={s.region}"
        "#logsV2:log-groups/log-group/$252Faws$252Fsagemaker$252FTrainingJobs$3FlogStreamNameFilter$3D{}"
    )
    return {
        "NotifyTrainingFailed": {
            "Type": "Task",
            "Resource": "arn:aws:states:::sns:publish",
            "Parameters": {
                "TopicArn": "${TopicArn}",
                "Subject": "ftstack: training failed",
                "Message.$": "States.Format('Execution {} failed in training job {} ({}): {} ({}). Reason: {} {}Logs: "
                + logs + "', $$.Execution.Name, $.job.name, $.job.instance_type, $.ended.status, $.ended.secondary, "
                "$.ended.reason, $.notes.quotas, $.job.name)",
            },
            "ResultPath": None,
            "Next": "TrainingFailed",
        },
        "TrainingFailed": {"Type": "Fail", "Error": "TrainingFailed", "CausePath": "$.ended.reason"},
        "NotifyError": {
            "Type": "Task",
            "Resource": "arn:aws:states:::sns:publish",
            "Parameters": {
                "TopicArn": "${TopicArn}",
                "Subject": "ftstack: run failed",
                "Message.$": "States.Format('Execution {} failed: {}. {}', $$.Execution.Name, $.error.Error, $.error.Cause)",
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
                "final_metrics_key.$": f"States.Format('{{}}{{}}/{JOB_MODEL_DIR}{FINAL_METRICS_FILE}', $.staged.output_prefix, $.job.name)",
                "metrics_uri.$": f"States.Format('{{}}{{}}/{JOB_MODEL_DIR}{METRICS_FILE}', $.staged.output_uri, $.job.name)",
                "final_metrics_uri.$": f"States.Format('{{}}{{}}/{JOB_MODEL_DIR}{FINAL_METRICS_FILE}', $.staged.output_uri, $.job.name)",
            },
            "ResultPath": "$.model",
            "Next": "ReadMetrics",
        },
        "ReadMetrics": {
            "Type": "Task",
            "Resource": "arn:aws:states:::aws-sdk:s3:getObject",
            # Only the final figures: the full metrics.json holds the eval history, which can
            # outgrow the 256 KB state payload (States.DataLimitExceeded is not catchable).
            "Parameters": {"Bucket": "${Bucket}", "Key.$": "$.model.final_metrics_key"},
            "ResultSelector": {"final.$": "States.StringToJson($.Body)"},
            "ResultPath": "$.metrics",
            "Catch": _catch_all("NotifyError"),
            "Next": "MetricsComplete?",
        },
        "MetricsComplete?": {
            "Type": "Choice",
            "Choices": [{"And": [
                {"Variable": EVAL_CE, "IsPresent": True},
                {"Variable": EVAL_CE, "IsNumeric": True},
                {"Variable": MANIFEST_DIGEST, "IsPresent": True},
                {"Variable": MANIFEST_DIGEST, "IsString": True},
            ], "Next": "CheckModel"}],
            "Default": "MetricsIncomplete",
        },
        "MetricsIncomplete": {
            "Type": "Pass",
            "Parameters": {
                "Error": "MetricsMissing",
                "Cause.$": f"States.Format('{{}} of training job {{}} has no numeric {FINAL_EVAL_CE} or no {MANIFEST_SHA256}; "
                           "nothing was registered', $.model.final_metrics_uri, $.job.name)",
            },
            "ResultPath": "$.error",
            "Next": "NotifyError",
        },
        # The model's files as the job left them: exactly the manifest's, each written once. Their
        # object versions are registered, and deployment serves only those (ftstack.s3_model).
        "CheckModel": {
            "Type": "Task",
            "Resource": "arn:aws:states:::lambda:invoke",
            "Parameters": {"FunctionName": "${ModelCheckFunctionArn}", "Payload": {
                "check": REGISTRATION, "model_uri.$": "$.model.uri", "manifest_sha256.$": MANIFEST_DIGEST}},
            "ResultSelector": {"versions_sha256.$": f"$.Payload.{VERSIONS_SHA256}"},
            "ResultPath": "$.model.pinned",
            "Retry": LAMBDA_RETRY,
            "Catch": _catch_all("NotifyError"),
            "Next": _after_metrics(s),
        },
        "Register": {
            "Type": "Task",
            "Resource": "arn:aws:states:::aws-sdk:sagemaker:createModelPackage",
            "Parameters": {
                "ModelPackageGroupName": "${ModelPackageGroupName}",
                # Staging checked the result against the field's limits (stage_data.fields).
                "ModelPackageDescription.$": f"States.Format('{MODEL_PACKAGE_DESCRIPTION}', $.staged.base_model.name, $$.Execution.Name)",
                # The same job always sends the same token, so a re-run of this step returns the
                # package it created the first time instead of registering a second one. The token
                # takes 1-36 of [a-zA-Z0-9-]; a job name has up to 63, so it is hashed (32 hex).
                "ClientToken.$": "States.Hash($.job.name, 'MD5')",
                "ModelApprovalStatus": s.approval_status,
                "InferenceSpecification": {
                    "Containers": [{
                        "Image": "${InferenceImage}",
                        "ModelDataSource": {"S3DataSource": {"S3Uri.$": "$.model.uri", "S3DataType": "S3Prefix", "CompressionType": "None"}},
                        # vLLM, serving the model as trained: bf16, its max_seq_len, its chat template.
                        "Environment": registration_environment("$.staged.max_seq_len"),
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
                    f"{FINAL_EVAL_CE}.$": f"States.Format('{{}}', {EVAL_CE})",
                    # Deployment and `ftstack verify` check the model files against it before use.
                    f"{MANIFEST_SHA256}.$": MANIFEST_DIGEST,
                    f"{VERSIONS_SHA256}.$": "$.model.pinned.versions_sha256",
                } | {f"evaluate.{c.metric}.$": f"States.Format('{{}}', {EVALUATED}.{c.metric})" for c in s.gate},
            },
            "ResultSelector": {"arn.$": "$.ModelPackageArn"},
            "ResultPath": "$.registered",
            "Retry": [{"ErrorEquals": ["SageMaker.ThrottlingException", "SageMaker.SageMakerException"], "IntervalSeconds": 5, "BackoffRate": 2.0, "MaxAttempts": 4}],
            "Catch": _catch_all("NotifyError"),
            "Next": STATE_NAMES["after_registration"] if "after_registration" in s.extensions else "NotifySuccess",
        },
        "NotifySuccess": {
            "Type": "Task",
            "Resource": "arn:aws:states:::sns:publish",
            "Parameters": {
                "TopicArn": "${TopicArn}",
                "Subject": "ftstack: model registered",
                "Message.$": "States.Format('Execution {} registered model package {} (eval cross-entropy {}, training job {}). "
                "Review and approve it in the SageMaker Model Registry.', $$.Execution.Name, $.registered.arn, "
                f"{EVAL_CE}, $.job.name)",
            },
            "ResultPath": None,
            "Next": "Succeeded",
        },
        "Succeeded": {"Type": "Succeed"},
    }
    rules = gate_rules(s.quality_threshold, s.gate)
    if rules:
        states["QualityGate"] = {
            "Type": "Choice",
            "Choices": [dict(rules[0] if len(rules) == 1 else {"And": rules}, Next="Register")],
            "Default": "QualityGateFailed",
        }
        states["QualityGateFailed"] = {
            "Type": "Pass",
            "Parameters": {"Error": "QualityGateFailed", "Cause.$": _gate_failed_cause(s)},
            "ResultPath": "$.error",
            "Next": "NotifyError",
        }
    return states


def _after_metrics(s: WorkflowSettings) -> str:
    """Where the run goes once the training's final metrics are read."""
    if "evaluate" in s.extensions:
        return STATE_NAMES["evaluate"]
    return "QualityGate" if gate_rules(s.quality_threshold, s.gate) else "Register"


def _gate_failed_cause(s: WorkflowSettings) -> str:
    """What the gate's failure notification says: each figure the gate read, and its bound."""
    bounds, paths = [], []
    if s.quality_threshold is not None:
        bounds.append(f"final eval cross-entropy {{}} (at most {s.quality_threshold})")
        paths.append(EVAL_CE)
    for c in s.gate:
        limits = " and ".join(f"{word} {value}" for word, value in (("at least", c.at_least), ("at most", c.at_most))
                              if value is not None)
        bounds.append(f"{c.metric} {{}} ({limits})")
        paths.append(f"{EVALUATED}.{c.metric}")
    return (f"States.Format('the model of training job {{}} is outside the quality gate: {'; '.join(bounds)}; "
            f"nothing was registered', $.job.name, {', '.join(paths)})")


def _extension_states(s: WorkflowSettings) -> dict[str, Any]:
    """The Parallel state of each extension point in use, and what follows ``evaluate``."""
    states: dict[str, Any] = {}
    follows = {"after_staging": "PrepareAttempt", "evaluate": "EvaluationComplete?",
               "after_registration": "NotifySuccess"}
    for point, graph in s.extensions.items():
        on_error = "AfterRegistrationFailed" if point == "after_registration" else "NotifyError"
        states[STATE_NAMES[point]] = extension_state(point, graph, follows[point], on_error)
    if "evaluate" in s.extensions:
        next_state = "QualityGate" if gate_rules(s.quality_threshold, s.gate) else "Register"
        states |= evaluation_checks([c.metric for c in s.gate], next_state)
    if "after_registration" in s.extensions:
        states["AfterRegistrationFailed"] = {
            "Type": "Pass",
            "Parameters": {
                "Error.$": "$.error.Error",
                "Cause.$": "States.Format('the after_registration step failed ({}); model package {} is registered all "
                           "the same', $.error.Cause, $.registered.arn)",
            },
            "ResultPath": "$.error",
            "Next": "NotifyError",
        }
    return states


def build_definition(s: WorkflowSettings) -> dict[str, Any]:
    """The whole state machine; ``${...}`` placeholders stand for the stack's resources."""
    checks = _input_checks(s.max_instance_count, s.prefix)
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
        # Only the execution's ARN: the function asks Step Functions for its name and input, so an
        # invoker cannot make it stage for another name or input (issue 11, item 4).
        "Parameters": {"FunctionName": "${StagingFunctionArn}", "Payload": {"execution_arn.$": "$$.Execution.Id"}},
        "ResultSelector": {"value.$": "$.Payload"},
        "ResultPath": "$.staging",
        "Retry": LAMBDA_RETRY,
        "Catch": _catch_all("NotifyError"),
        "Next": "Staged",
    }
    states["Staged"] = {
        "Type": "Pass",
        "Parameters": {"staged.$": "$.staging.value", "attempt": {"index": 0}, "notes": {"quotas": ""}},
        "Next": STATE_NAMES["after_staging"] if "after_staging" in s.extensions else "PrepareAttempt",
    }
    states |= attempt_states(s)
    states |= train_states(s)
    states |= fallback_states(s)
    states |= _failure_states(s)
    states |= _result_states(s)
    states |= _extension_states(s)
    clashes = clashing_state_names(states, s.extensions)
    if clashes:
        raise PropsError("; ".join(clashes))
    return {
        "Comment": "ftstack: validate and stage data, fine-tune on SageMaker, gate, register, notify",
        "StartAt": "CheckInput",
        "States": states,
    }


def render(definition: dict[str, Any]) -> str:
    """The definition as JSON, placeholders intact (Step Functions substitutes them)."""
    return json.dumps(definition, indent=1, sort_keys=False)
