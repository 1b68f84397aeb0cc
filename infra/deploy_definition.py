"""The deploy-on-approval workflow as Amazon States Language, built as plain data (like
``infra.definition``): ``${Name}`` placeholders stand for the resources the construct creates
(``PLACEHOLDERS``); the tests run the same dict in moto's interpreter.

Describe the approved package -> ignore it unless it is Approved, of this group and its newest
approved package -> check its model files against the manifest and object versions registered
with it (Lambda) -> create a Model and an EndpointConfig named after this change of the package
(an execution for the same change finds them made and goes on with them) -> create the endpoint,
or update it to the new config once no other deployment is creating or updating it (and only if
the package is still the newest) -> poll until InService on the new config -> notify with the
endpoint and an ``invoke-endpoint`` example. Any failure notifies with the reason; an update that fails leaves the
previous config serving (SageMaker rolls the endpoint back), and nothing here deletes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ftstack.s3_model import VERSIONS_SHA256
from ftstack.serving import (
    CHANGING, DEFAULT_INSTANCE_TYPE, check_endpoint_name, deploy_environment, instance_gpus, invoke_command, production_variant,
    resource_prefix,
)
from ftstack_train.contract import MANIFEST_SHA256

from .definition import LAMBDA_RETRY
from .model_check import DEPLOYMENT

PLACEHOLDERS = ("ModelPackageGroupName", "ServingRoleArn", "VerifyFunctionArn", "TopicArn")

PACKAGE = "$.package"
PACKAGE_CONTAINER = f"{PACKAGE}.InferenceSpecification.Containers[0]"
CONTAINER = "$.container"
"""The package's container, copied out first: an intrinsic function's argument path through an array
index is not read alike everywhere (moto's interpreter yields a list)."""
MODEL_URI = f"{CONTAINER}.ModelDataSource.S3DataSource.S3Uri"
DIGEST = f"{PACKAGE}.CustomerMetadataProperties.{MANIFEST_SHA256}"
VERSIONS = f"{PACKAGE}.CustomerMetadataProperties.{VERSIONS_SHA256}"

MISSING_ENDPOINT = "*Could not find endpoint*"
"""DescribeEndpoint's message (a ValidationException) for an endpoint that does not exist."""

THROTTLED = "*Rate exceeded*"
"""SageMaker's message for a throttled call."""
ALREADY_EXISTS = "*Cannot create already existing*"
"""SageMaker's message (a ValidationException) when a model, config or endpoint of that name exists."""
IN_PROGRESS = "*Cannot update in-progress endpoint*"
"""UpdateEndpoint's message (a ValidationException) for an endpoint being created or updated."""
BUSY = (*CHANGING, "Deleting")
"""Endpoint states the workflow waits out: those of a change, and a deletion (after which the
endpoint is created again)."""

THROTTLE_RETRY = [{"ErrorEquals": ["SageMaker.ThrottlingException", "ThrottlingException"],
                   "IntervalSeconds": 5, "BackoffRate": 2.0, "MaxAttempts": 5}]
SAGEMAKER_RETRY = THROTTLE_RETRY + [
    # SageMaker's model declares no ThrottlingException: a throttled call (or a passing 5xx)
    # arrives as SageMakerException, as a refused request does. Two quick tries, as the training
    # workflow's calls get (infra.training_states.API_RETRY), not a run of a bad request.
    {"ErrorEquals": ["SageMaker.SageMakerException"], "IntervalSeconds": 5, "BackoffRate": 2.0, "MaxAttempts": 2},
]


@dataclass(frozen=True)
class DeploySettings:
    """What the deploy workflow is built for."""

    endpoint: str
    """The one endpoint of the model package group (also the prefix of its models and configs)."""
    region: str
    """Where it runs (for the example command)."""
    instance_type: str = DEFAULT_INSTANCE_TYPE
    """The endpoint's instance type: a GPU type ``ftstack.instances`` knows."""
    poll_seconds: int = 60
    """Between two DescribeEndpoint calls while the endpoint is Creating or Updating."""

    def __post_init__(self) -> None:
        check_endpoint_name(self.endpoint)
        instance_gpus(self.instance_type)  # a ServingError naming the known types


def _catch(next_state: str = "NotifyFailed") -> list[dict[str, Any]]:
    return [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": next_state}]


def _sdk(action: str) -> str:
    return f"arn:aws:states:::aws-sdk:sagemaker:{action}"


def _failure(name: str, error: str, cause: dict[str, str] | str) -> dict[str, Any]:
    parameters = {"Error": error, **({"Cause.$": cause["path"]} if isinstance(cause, dict) else {"Cause": cause})}
    return {name: {"Type": "Pass", "Parameters": parameters, "ResultPath": "$.error", "Next": "NotifyFailed"}}


def _newest_states(again: str, then: str) -> dict[str, Any]:
    """Whether the package is still the group's newest approved one (``NotNewest`` if not, else
    ``then``); ``again`` prefixes the state names of a second asking."""
    newest = f"$.{again.lower() or 'newest'}"
    return {
        f"{again}NewestApproved": {
            "Type": "Task", "Resource": _sdk("listModelPackages"),
            "Parameters": {"ModelPackageGroupName": "${ModelPackageGroupName}", "ModelApprovalStatus": "Approved",
                           "SortBy": "CreationTime", "SortOrder": "Descending", "MaxResults": 1},
            "ResultPath": newest, "Retry": SAGEMAKER_RETRY, "Catch": _catch(), "Next": f"{again}AnyApproved?",
        },
        f"{again}AnyApproved?": {
            "Type": "Choice",
            "Choices": [{"Variable": f"{newest}.ModelPackageSummaryList[0]", "IsPresent": True, "Next": f"{again}NewestArn"}],
            "Default": "NotNewest",
        },
        # The list has one summary (AnyApproved?), and ModelPackageArn is one of its required members.
        f"{again}NewestArn": {"Type": "Pass", "Parameters": {"first.$": f"States.ArrayGetItem({newest}.ModelPackageSummaryList, 0)"},
                              "ResultPath": newest, "Next": f"{again}Newest?"},
        f"{again}Newest?": {
            "Type": "Choice",
            "Choices": [{"Variable": f"{newest}.first.ModelPackageArn", "StringEqualsPath": f"{PACKAGE}.ModelPackageArn",
                         "Next": then}],
            "Default": "NotNewest",
        },
    }


def _exists(name: str, then: str) -> dict[str, Any]:
    """A Choice after a Create call's Catch: on to ``then`` when SageMaker refused because the
    name exists, else the failure notification."""
    return {name: {"Type": "Choice", "Choices": [{"Variable": "$.error.Cause", "StringMatches": ALREADY_EXISTS, "Next": then}],
                   "Default": "NotifyFailed"}}


def _check_states(s: DeploySettings) -> dict[str, Any]:
    present = [{"Variable": path, "IsPresent": True} for path in (
        f"{PACKAGE_CONTAINER}.Image", f"{PACKAGE_CONTAINER}.ModelDataSource.S3DataSource.S3Uri",
        f"{PACKAGE_CONTAINER}.Environment", DIGEST, VERSIONS)]
    return {
        "DescribePackage": {
            "Type": "Task", "Resource": _sdk("describeModelPackage"),
            "Parameters": {"ModelPackageName.$": "$.detail.ModelPackageArn"},
            "ResultPath": PACKAGE, "Retry": SAGEMAKER_RETRY, "Catch": _catch(), "Next": "OursAndApproved?",
        },
        # The rule matches this group's approvals only; the package is asked again because an event
        # can be late (approved, then rejected) and a start by hand can name any package.
        "OursAndApproved?": {
            "Type": "Choice",
            "Choices": [{"And": [
                {"Variable": f"{PACKAGE}.ModelPackageGroupName", "IsPresent": True},
                {"Variable": f"{PACKAGE}.ModelPackageGroupName", "StringEquals": "${ModelPackageGroupName}"},
                {"Variable": f"{PACKAGE}.ModelApprovalStatus", "StringEquals": "Approved"},
            ], "Next": "NewestApproved"}],
            "Default": "Ignored",
        },
        "Ignored": {"Type": "Succeed"},
        # SageMaker sends the event for any change to a package (its description, say), with no
        # status before it: only the group's newest approved package is served, so that a change to
        # an old one does not take the endpoint back to it.
        **_newest_states("", "Deployable?"),
        "NotNewest": {"Type": "Succeed", "Comment": "a newer approved package of the group is the one to serve"},
        "Deployable?": {"Type": "Choice", "Choices": [{"And": present, "Next": "Container"}], "Default": "NotDeployable"},
        "Container": {"Type": "Pass", "InputPath": PACKAGE_CONTAINER, "ResultPath": CONTAINER, "Next": "VerifyModel"},
        **_failure("NotDeployable", "NotDeployable", "the package has no container image, model data source, environment, "
                   f"{MANIFEST_SHA256} or {VERSIONS_SHA256}: only packages registered by ftstack's workflow are deployed"),
        "VerifyModel": {
            "Type": "Task", "Resource": "arn:aws:states:::lambda:invoke",
            "Parameters": {"FunctionName": "${VerifyFunctionArn}",
                           "Payload": {"check": DEPLOYMENT, "model_uri.$": MODEL_URI, "manifest_sha256.$": DIGEST,
                                       f"{VERSIONS_SHA256}.$": VERSIONS}},
            "ResultSelector": {"value.$": "$.Payload"}, "ResultPath": "$.verified",
            "Retry": LAMBDA_RETRY, "Catch": _catch(), "Next": "Changed?",
        },
        # Names of the package's change: SageMaker may send several events for one change, and
        # their executions then name the same model and config, and serve the same (ModelExists?).
        # A later change (approved again after a rejection) gets names of its own. LastModifiedTime
        # is not a required member: a package registered as Approved may have only CreationTime.
        "Changed?": {
            "Type": "Choice",
            "Choices": [{"Variable": f"{PACKAGE}.LastModifiedTime", "IsPresent": True, "Next": "Modified"}],
            "Default": "Created",
        },
        "Modified": {"Type": "Pass", "Parameters": {"at.$": f"{PACKAGE}.LastModifiedTime"}, "ResultPath": "$.change", "Next": "Name"},
        "Created": {"Type": "Pass", "Parameters": {"at.$": f"{PACKAGE}.CreationTime"}, "ResultPath": "$.change", "Next": "Name"},
        "Name": {
            "Type": "Pass",
            "Parameters": {"name.$": f"States.Format('{resource_prefix(s.endpoint)}-{{}}', States.Hash("
                                     f"States.Format('{{}} {{}}', {PACKAGE}.ModelPackageArn, $.change.at), 'MD5'))",
                           "added": deploy_environment(instance_gpus(s.instance_type)),
                           "invoke": invoke_command(s.endpoint, s.region)},
            "ResultPath": "$.deploy", "Next": "Environment",
        },
        "Environment": {
            "Type": "Pass",
            "Parameters": {"value.$": f"States.JsonMerge({CONTAINER}.Environment, $.deploy.added, false)"},
            "ResultPath": "$.environment", "Next": "CreateModel",
        },
    }


def _create_states(s: DeploySettings) -> dict[str, Any]:
    return {
        "CreateModel": {
            "Type": "Task", "Resource": _sdk("createModel"),
            "Parameters": {
                "ModelName.$": "$.deploy.name", "ExecutionRoleArn": "${ServingRoleArn}",
                # The very folder the manifest check passed, with the package's image and environment.
                "PrimaryContainer": {"Image.$": f"{CONTAINER}.Image", "ModelDataSource.$": f"{CONTAINER}.ModelDataSource",
                                     "Environment.$": "$.environment.value"},
                # The model is local to the container: it needs no network.
                "EnableNetworkIsolation": True,
            },
            "ResultPath": None, "Retry": SAGEMAKER_RETRY, "Catch": _catch("ModelExists?"), "Next": "CreateEndpointConfig",
        },
        # A name of this change that exists was made by another execution for the same change (a
        # duplicate event), or by this one in a call that failed after it took effect: either way
        # it is this change's, and the deployment goes on with it (the names make it idempotent).
        **_exists("ModelExists?", "CreateEndpointConfig"),
        "CreateEndpointConfig": {
            "Type": "Task", "Resource": _sdk("createEndpointConfig"),
            "Parameters": {"EndpointConfigName.$": "$.deploy.name", "ProductionVariants": [
                production_variant(s.instance_type) | {"ModelName.$": "$.deploy.name"}]},
            "ResultPath": None, "Retry": SAGEMAKER_RETRY, "Catch": _catch("ConfigExists?"), "Next": "FindEndpoint",
        },
        **_exists("ConfigExists?", "FindEndpoint"),
        "FindEndpoint": {
            "Type": "Task", "Resource": _sdk("describeEndpoint"), "Parameters": {"EndpointName": s.endpoint},
            # A missing endpoint is a SageMakerException, as a throttled call is (SageMaker's model
            # declares no ThrottlingException): NoEndpoint? tells them apart by SageMaker's message.
            "ResultPath": "$.previous", "Retry": THROTTLE_RETRY,
            "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.lookup", "Next": "NoEndpoint?"}],
            "Next": "HasConfig?",
        },
        # Already on this change's config (another execution for it updated the endpoint): wait
        # for it to serve. EndpointConfigName is not a required member: asked about first.
        "HasConfig?": {
            "Type": "Choice",
            "Choices": [{"Variable": "$.previous.EndpointConfigName", "IsPresent": True, "Next": "OnThisConfig?"}],
            "Default": "Updatable?",
        },
        "OnThisConfig?": {
            "Type": "Choice",
            "Choices": [{"Variable": "$.previous.EndpointConfigName", "StringEqualsPath": "$.deploy.name", "Next": "Wait"}],
            "Default": "Updatable?",
        },
        # SageMaker refuses to update a Failed endpoint ("Cannot update failed endpoint"): say so,
        # with the fix, rather than pass its bare refusal on after every later approval. An
        # endpoint being created, updated, rolled back or deleted (another deployment, or by
        # hand) cannot be updated either: wait for it, then go on only if this package is still
        # the newest approved.
        "Updatable?": {
            "Type": "Choice",
            "Choices": [{"Variable": "$.previous.EndpointStatus", "StringEquals": "Failed", "Next": "PreviousEndpointFailed"},
                        {"Or": [{"Variable": "$.previous.EndpointStatus", "StringEquals": busy} for busy in BUSY],
                         "Next": "EndpointBusy"}],
            "Default": "UpdateEndpoint",
        },
        "EndpointBusy": {"Type": "Wait", "Seconds": s.poll_seconds, "Next": "AgainNewestApproved"},
        **_newest_states("Again", "FindEndpoint"),
        **_failure("PreviousEndpointFailed", "EndpointFailed",
                   f"endpoint {s.endpoint} is Failed (an earlier deployment did not come up) and SageMaker cannot update a "
                   f"failed endpoint; it serves nothing: delete it (ftstack undeploy {s.endpoint}) and approve the package "
                   "again, or run ftstack deploy"),
        "NoEndpoint?": {
            "Type": "Choice",
            "Choices": [{"Variable": "$.lookup.Cause", "StringMatches": MISSING_ENDPOINT, "Next": "CreateEndpoint"},
                        {"Variable": "$.lookup.Cause", "StringMatches": THROTTLED, "Next": "EndpointBusy"}],
            "Default": "LookupFailed",
        },
        **_failure("LookupFailed", "DescribeEndpointFailed", {"path": "$.lookup.Cause"}),
        # Another deployment may create the endpoint, or start updating it, between FindEndpoint
        # and these calls: SageMaker then refuses them, and this one waits its turn (Taken?).
        "CreateEndpoint": {
            "Type": "Task", "Resource": _sdk("createEndpoint"),
            "Parameters": {"EndpointName": s.endpoint, "EndpointConfigName.$": "$.deploy.name"},
            "ResultPath": None, "Retry": SAGEMAKER_RETRY, "Catch": _catch("Taken?"), "Next": "Wait",
        },
        "UpdateEndpoint": {
            "Type": "Task", "Resource": _sdk("updateEndpoint"),
            "Parameters": {"EndpointName": s.endpoint, "EndpointConfigName.$": "$.deploy.name"},
            "ResultPath": None, "Retry": SAGEMAKER_RETRY, "Catch": _catch("Taken?"), "Next": "Wait",
        },
        "Taken?": {
            "Type": "Choice",
            "Choices": [{"Or": [{"Variable": "$.error.Cause", "StringMatches": ALREADY_EXISTS},
                                {"Variable": "$.error.Cause", "StringMatches": IN_PROGRESS}], "Next": "EndpointBusy"}],
            "Default": "NotifyFailed",
        },
    }


def _poll_states(s: DeploySettings) -> dict[str, Any]:
    status, config = "$.endpoint.EndpointStatus", "$.endpoint.EndpointConfigName"
    return {
        "Wait": {"Type": "Wait", "Seconds": s.poll_seconds, "Next": "PollEndpoint"},
        "PollEndpoint": {
            "Type": "Task", "Resource": _sdk("describeEndpoint"), "Parameters": {"EndpointName": s.endpoint},
            "ResultPath": "$.endpoint", "Retry": SAGEMAKER_RETRY, "Catch": _catch(), "Next": "Serving?",
        },
        # EndpointConfigName and FailureReason are not required members of the answer: each is
        # asked about before it is read (a missing path would be States.Runtime, caught by nothing).
        "Serving?": {
            "Type": "Choice",
            "Choices": [
                {"And": [{"Variable": status, "StringEquals": "InService"}, {"Variable": config, "IsPresent": True}],
                 "Next": "OnThisConfigNow?"},
                {"Or": [{"Variable": status, "StringEquals": busy} for busy in BUSY],
                 "Next": "Wait"},
                # InService on another config: the update failed and SageMaker rolled it back.
                {"Variable": "$.endpoint.FailureReason", "IsPresent": True, "Next": "EndpointFailed"},
            ],
            # On another config with no failure: a deployment of a newer package (which waited
            # for this one) took over, or this package is still the newest and it is a failure.
            "Default": "LastNewestApproved",
        },
        "OnThisConfigNow?": {
            "Type": "Choice",
            "Choices": [{"Variable": config, "StringEqualsPath": "$.deploy.name", "Next": "NotifyServing"},
                        {"Variable": "$.endpoint.FailureReason", "IsPresent": True, "Next": "EndpointFailed"}],
            "Default": "LastNewestApproved",
        },
        **_newest_states("Last", "EndpointNotServing"),
        **_failure("EndpointFailed", "EndpointFailed", {"path": "$.endpoint.FailureReason"}),
        "EndpointNotServing": {
            "Type": "Choice",
            "Choices": [{"Variable": config, "IsPresent": True, "Next": "EndpointOnAnotherConfig"}],
            "Default": "EndpointNotOnThisConfig",
        },
        "EndpointOnAnotherConfig": {
            "Type": "Pass",
            "Parameters": {"Error": "EndpointFailed",
                           "Cause.$": f"States.Format('the endpoint is {{}} on config {{}}', {status}, {config})"},
            "ResultPath": "$.error", "Next": "NotifyFailed",
        },
        "EndpointNotOnThisConfig": {
            "Type": "Pass",
            "Parameters": {"Error": "EndpointFailed",
                           "Cause.$": f"States.Format('the endpoint is {{}}, not on config {{}}', {status}, $.deploy.name)"},
            "ResultPath": "$.error", "Next": "NotifyFailed",
        },
    }


def _notify_states(s: DeploySettings) -> dict[str, Any]:
    return {
        "NotifyServing": {
            "Type": "Task", "Resource": "arn:aws:states:::sns:publish",
            "Parameters": {"TopicArn": "${TopicArn}", "Subject": "ftstack: model deployed",
                           "Message.$": "States.Format('Model package {} serves at endpoint " + s.endpoint + " ("
                           + s.instance_type + ", config {}). Try it: {}', $.package.ModelPackageArn, $.deploy.name, $.deploy.invoke)"},
            "ResultPath": None, "Next": "Deployed",
        },
        "Deployed": {"Type": "Succeed"},
        "NotifyFailed": {
            "Type": "Task", "Resource": "arn:aws:states:::sns:publish",
            "Parameters": {"TopicArn": "${TopicArn}", "Subject": "ftstack: deployment failed",
                           "Message.$": "States.Format('Deploying model package {} to endpoint " + s.endpoint
                           + " failed: {}: {}. Nothing was deleted: an endpoint that served before serves as it did. "
                           "Once the cause is fixed: ftstack deploy {}', "
                           "$.detail.ModelPackageArn, $.error.Error, $.error.Cause, $.detail.ModelPackageArn)"},
            "ResultPath": None, "Next": "Failed",
        },
        "Failed": {"Type": "Fail", "ErrorPath": "$.error.Error", "CausePath": "$.error.Cause"},
    }


def build_deploy_definition(s: DeploySettings) -> dict[str, Any]:
    """The whole state machine; its input is the EventBridge event (``$.detail.ModelPackageArn``)."""
    states = _check_states(s) | _create_states(s) | _poll_states(s) | _notify_states(s)
    return {"Comment": f"ftstack: deploy approved models of the group to endpoint {s.endpoint}",
            "StartAt": "DescribePackage", "States": states}


def render(definition: dict[str, Any]) -> str:
    """The definition as JSON, placeholders intact (Step Functions substitutes them)."""
    return json.dumps(definition, indent=1)
