"""``ftstack deploy``, ``invoke`` and ``undeploy``: serving an approved model package by hand, the
same way the stack's deploy-on-approval workflow does (``infra.deploy_definition``): the model
files are checked against the manifest and object versions registered with them first, then a Model and an EndpointConfig
of their own are created and the endpoint is created or updated to the new config. A failed
update leaves the endpoint serving its previous config (SageMaker rolls it back)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ftstack_train.contract import MANIFEST_SHA256

from .aws import SERVING_ROLE, AwsError, aws_errors, error_code, find_stack, session
from .models import MODEL_PACKAGE_ARN
from .s3_model import VERSIONS_SHA256, verify_s3_model
from .serving import (
    CHANGING, ServingError, answer_text, check_endpoint_name, deploy_environment,
    instance_gpus, invoke_body, invoke_command, production_variant, resource_name,
)


def _package(sagemaker: Any, arn: str) -> dict[str, Any]:
    """The package's container, model URI and digest; AwsError unless it is approved and deployable."""
    with aws_errors(f"reading model package {arn}"):
        try:
            found = sagemaker.describe_model_package(ModelPackageName=arn)
        except Exception as exc:
            if error_code(exc) in ("ValidationException", "ResourceNotFound"):
                raise AwsError(f"model package {arn} not found; `ftstack status` prints the ARN of a run's package") from None
            raise
    if found.get("ModelApprovalStatus") != "Approved":
        raise AwsError(f"model package {arn} is {found.get('ModelApprovalStatus', 'not approved')}; approve it first "
                       f"(ftstack approve {arn})")
    containers = found.get("InferenceSpecification", {}).get("Containers", [])
    container = containers[0] if containers else {}
    uri = container.get("ModelDataSource", {}).get("S3DataSource", {}).get("S3Uri")
    metadata = found.get("CustomerMetadataProperties", {})
    digest, versions = metadata.get(MANIFEST_SHA256), metadata.get(VERSIONS_SHA256)
    if not (container.get("Image") and uri and digest and versions):
        raise AwsError(f"model package {arn} has no container image, uncompressed model data, {MANIFEST_SHA256} or "
                       f"{VERSIONS_SHA256}; only packages registered by ftstack's workflow can be deployed")
    # Not a required member (an unversioned package has no group): the ARN's group part then.
    group = found.get("ModelPackageGroupName") or arn.split(":model-package/", 1)[1].split("/", 1)[0]
    return {"container": container, "uri": uri, "digest": digest, "versions": versions, "group": group}


def _serving_role(boto: Any, args: argparse.Namespace) -> str:
    if args.role:
        return args.role
    role = find_stack(boto, args.stack).serving_role
    if not role:
        raise AwsError(f"stack {args.stack!r} has no {SERVING_ROLE} output: it was deployed by an older ftstack; "
                       "redeploy it (`npx cdk deploy`), or give --role ARN (a role SageMaker can assume that reads the model)")
    return role


def _create(sagemaker: Any, args: argparse.Namespace, package: dict[str, Any], role: str, name: str) -> None:
    container = package["container"]
    with aws_errors(f"creating model and endpoint config {name}"):
        sagemaker.create_model(
            ModelName=name, ExecutionRoleArn=role, EnableNetworkIsolation=True,
            PrimaryContainer={"Image": container["Image"], "ModelDataSource": container["ModelDataSource"],
                              "Environment": container.get("Environment", {}) | deploy_environment(instance_gpus(args.instance_type))})
        sagemaker.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[
            production_variant(args.instance_type) | {"ModelName": name}])


def _describe_endpoint(sagemaker: Any, endpoint: str) -> dict[str, Any] | None:
    """DescribeEndpoint, or None when there is no such endpoint."""
    with aws_errors(f"reading endpoint {endpoint}"):
        try:
            return sagemaker.describe_endpoint(EndpointName=endpoint)
        except Exception as exc:
            if error_code(exc) in ("ValidationException", "ValidationError") and "Could not find" in str(exc):
                return None
            raise


def _wait(sagemaker: Any, endpoint: str, config: str, poll: float) -> None:
    """Until the endpoint is InService on ``config``; AwsError with SageMaker's reason otherwise."""
    while True:
        found = _describe_endpoint(sagemaker, endpoint) or {}
        status = found.get("EndpointStatus")
        if status == "InService" and found.get("EndpointConfigName") == config:
            return
        if status not in CHANGING:
            reason = found.get("FailureReason", "no reason given")
            if status == "InService":  # on another config: rolled back
                raise AwsError(f"endpoint {endpoint}: the update to {config} failed ({reason}); the endpoint still serves "
                               f"its previous config {found.get('EndpointConfigName')}")
            raise AwsError(f"endpoint {endpoint} is {status}: {reason}; `ftstack undeploy {endpoint}` removes it")
        time.sleep(poll)


def deploy(args: argparse.Namespace) -> int:
    """``ftstack deploy MODEL_PACKAGE_ARN [--instance-type T] [--endpoint NAME]``."""
    match = MODEL_PACKAGE_ARN.match(args.model_package_arn)
    if not match:
        raise AwsError(f"{args.model_package_arn!r} is not a model package ARN, e.g. arn:aws:sagemaker:us-east-1:"
                       "123456789012:model-package/ftstack-models/3 (ftstack status prints it)")
    try:
        if args.endpoint:
            check_endpoint_name(args.endpoint)
        instance_gpus(args.instance_type)
    except ServingError as exc:
        raise AwsError(str(exc)) from None
    boto = session(args.region or match.group(1))
    sagemaker = boto.client("sagemaker")
    package = _package(sagemaker, args.model_package_arn)
    # The group's name as it was given (ARNs write it in lower case): the endpoint that
    # deploy_on_approval serves the group's models behind.
    endpoint = args.endpoint or check_endpoint_name(package["group"])
    previous = _describe_endpoint(sagemaker, endpoint)
    if previous and previous.get("EndpointStatus") == "Failed":  # SageMaker cannot update it
        raise AwsError(f"endpoint {endpoint} is Failed ({previous.get('FailureReason', 'no reason given')}) and SageMaker "
                       f"cannot update a failed endpoint; delete it first (ftstack undeploy {endpoint}), then deploy again")
    if previous and previous.get("EndpointStatus") in CHANGING:  # nor one that is being created or updated
        raise AwsError(f"endpoint {endpoint} is {previous['EndpointStatus']} (another deployment, or SageMaker's own "
                       "maintenance) and SageMaker cannot update it until that ends; run this again once it is InService "
                       f"(aws sagemaker wait endpoint-in-service --endpoint-name {endpoint})")
    with aws_errors(f"checking the model files of {args.model_package_arn}"):
        try:
            summary = verify_s3_model(boto.client("s3"), package["uri"], package["digest"], package["versions"])
        except ServingError as exc:
            raise AwsError(f"model package {args.model_package_arn}: {exc}") from None
    print(f"{package['uri']}: {summary['files']} files are the registered versions and match the registered manifest "
          f"({MANIFEST_SHA256} {package['digest']})")
    role = _serving_role(boto, args)
    name = resource_name(endpoint, f"{args.model_package_arn} {time.time_ns()}")
    _create(sagemaker, args, package, role, name)
    with aws_errors(f"{'updating' if previous else 'creating'} endpoint {endpoint}"):
        if previous:
            sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName=name)
        else:
            sagemaker.create_endpoint(EndpointName=endpoint, EndpointConfigName=name)
    print(f"endpoint {endpoint}: {'updating from ' + previous['EndpointConfigName'] if previous else 'creating'} "
          f"to config {name} ({args.instance_type})")
    if args.wait:
        _wait(sagemaker, endpoint, name, args.poll)
        print(f"endpoint {endpoint} is InService")
    print(f"try it: ftstack invoke {endpoint} \"What is the capital of Greece?\"\n   or: {invoke_command(endpoint, boto.region_name)}")
    return 0


def invoke(args: argparse.Namespace) -> int:
    """``ftstack invoke ENDPOINT "prompt"``: prints the model's answer."""
    boto = session(args.region)
    runtime = boto.client("sagemaker-runtime")
    with aws_errors(f"invoking endpoint {args.endpoint}"):
        response = runtime.invoke_endpoint(EndpointName=args.endpoint, ContentType="application/json",
                                           Accept="application/json", Body=json.dumps(invoke_body(args.prompt, args.max_tokens)))
    body = response["Body"].read()
    try:
        answer = answer_text(json.loads(body))
    except ValueError:  # a body that is not JSON, or JSON that is not a chat completion
        raise AwsError(f"endpoint {args.endpoint}: the answer is not a chat completion: {body[:500]!r}; is it serving "
                       "an ftstack model with the vLLM container?") from None
    print(answer)
    return 0


def undeploy(args: argparse.Namespace) -> int:
    """``ftstack undeploy ENDPOINT``: deletes the endpoint and its config (the model package stays)."""
    sagemaker = session(args.region).client("sagemaker")
    found = _describe_endpoint(sagemaker, args.endpoint)
    if found is None:
        raise AwsError(f"endpoint {args.endpoint} not found; `aws sagemaker list-endpoints` lists them")
    with aws_errors(f"deleting endpoint {args.endpoint}"):
        sagemaker.delete_endpoint(EndpointName=args.endpoint)
        sagemaker.delete_endpoint_config(EndpointConfigName=found["EndpointConfigName"])
    print(f"deleted endpoint {args.endpoint} and its config {found['EndpointConfigName']}; the model package is kept "
          "(ftstack deploy serves it again)")
    return 0
