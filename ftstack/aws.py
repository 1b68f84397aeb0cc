"""The operator's side of AWS: a boto3 session, the deployed stack's outputs, and errors that say
what to do.

Every AWS problem an operator can fix (no credentials, no region, a stack that is not there or is
older than the CLI, an execution that does not exist, access denied) becomes an ``AwsError`` whose
message names the input and the fix; ``ftstack`` prints it without a traceback. boto3 is imported
only when a command talks to AWS, so ``ftstack validate`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ftstack.infra.layout import Layout

DEFAULT_STACK = "ftstack"
"""The stack name when ``cdk.json`` gives none (infra.config takes its default from here)."""

OUTPUTS = {
    "bucket": "BucketName",
    "state_machine_arn": "StateMachineArn",
    "model_package_group": "ModelPackageGroupName",
    "topic_arn": "TopicArn",
}
"""The stack's CfnOutputs (infra/stack.py) the CLI reads, by attribute of ``StackOutputs``."""

SERVING_ROLE = "ServingRoleArn"
"""The output with the role SageMaker assumes to serve the stack's models (``ftstack deploy``)."""

DATA_PREFIX = "DataPrefix"
"""The optional output with the pipeline's folder in a shared bucket (none: the bucket's root)."""

TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
"""Where SageMaker writes every training job's logs, one stream per host: ``<job>/algo-N-...``."""

_FIX_CREDENTIALS = ("no AWS credentials found; run `aws configure` (or `aws sso login --profile NAME` and "
                    "export AWS_PROFILE=NAME), or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")


class AwsError(Exception):
    """An AWS call failed for a reason the operator can fix; the message names the fix."""


def default_stack(directory: Path | None = None) -> str:
    """The stack name ``cdk deploy`` uses from ``directory`` (default: the current one): its
    ``cdk.json`` context ``stack_name`` when set, else the deployment default."""
    path = (directory or Path.cwd()) / "cdk.json"
    try:
        context = json.loads(path.read_text()).get("context", {})
    except (OSError, ValueError, AttributeError):
        return DEFAULT_STACK  # no cdk.json here (the CLI is used outside the repository)
    name = context.get("stack_name") if isinstance(context, dict) else None
    return name if isinstance(name, str) and name else DEFAULT_STACK


def session(region: str | None) -> Any:
    """A boto3 session in ``region`` (default: the profile's or AWS_REGION); AwsError without one."""
    import boto3

    made = boto3.Session(region_name=region) if region else boto3.Session()
    if not made.region_name:
        raise AwsError("no AWS region: give --region (the region the stack was deployed to, e.g. "
                       "--region us-east-1), or set AWS_REGION, or `aws configure set region REGION`")
    return made


@contextlib.contextmanager
def aws_errors(doing: str) -> Iterator[None]:
    """Turns botocore's errors raised inside into an AwsError that says what failed (``doing``)
    and how to fix it. Errors a caller handles itself must be caught inside the block."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError, NoRegionError,
        PartialCredentialsError,
    )

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError):
        raise AwsError(f"{doing}: {_FIX_CREDENTIALS}") from None
    except NoRegionError:
        raise AwsError(f"{doing}: no AWS region; give --region, e.g. --region us-east-1") from None
    except EndpointConnectionError as exc:
        raise AwsError(f"{doing}: cannot reach AWS ({exc}); check the network and --region") from None
    except ClientError as exc:
        raise AwsError(f"{doing}: {describe_client_error(exc)}") from None
    except BotoCoreError as exc:
        raise AwsError(f"{doing}: {exc}") from None
    except S3UploadFailedError as exc:  # boto3's transfer wraps the ClientError that failed it
        cause = exc.__context__
        raise AwsError(f"{doing}: {describe_client_error(cause) if isinstance(cause, ClientError) else exc}") from None


def error_code(exc: Exception) -> str:
    """The AWS error code of a botocore ClientError ('' for anything else)."""
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


def describe_client_error(exc: Exception) -> str:
    """An AWS error as ``Code: message``, with the fix where the code has a common one."""
    error = getattr(exc, "response", {}).get("Error", {})
    code, message = error.get("Code", "Error"), error.get("Message", str(exc))
    fixes = {
        "ExpiredToken": "your session expired; log in again (`aws sso login`) or refresh the credentials",
        "ExpiredTokenException": "your session expired; log in again (`aws sso login`) or refresh the credentials",
        "UnrecognizedClientException": "the credentials are not valid in this account or region; check AWS_PROFILE",
        "InvalidClientTokenId": "the credentials are not valid; check AWS_PROFILE or the access key",
        "AccessDenied": "your IAM identity lacks this permission; ask your administrator",
        "AccessDeniedException": "your IAM identity lacks this permission; ask your administrator",
    }
    fix = fixes.get(code)
    return f"{code}: {message}" + (f"; {fix}" if fix else "")


@dataclass(frozen=True)
class StackOutputs:
    """What the CLI needs from a deployed stack, read from its CloudFormation outputs."""

    stack: str
    """The stack's name."""
    region: str
    """The region it runs in."""
    bucket: str
    """The data bucket (uploads go under ``incoming/``)."""
    state_machine_arn: str
    """The workflow; its executions are the runs."""
    model_package_group: str
    """Where successful runs register their models."""
    topic_arn: str
    """Run notifications."""
    prefix: str = ""
    """The pipeline's folder in the bucket (``DataPrefix``; '' when the bucket is its own)."""
    serving_role: str = ""
    """The role endpoints serve the stack's models with (``ServingRoleArn``; '' from an older stack)."""

    @property
    def layout(self) -> Layout:
        """Where the pipeline's objects live in the bucket (the stack's own rule)."""
        return Layout(self.prefix)

    def execution_arn(self, name: str) -> str:
        """The ARN of this workflow's execution ``name``."""
        prefix = self.state_machine_arn.replace(":stateMachine:", ":execution:", 1)
        return f"{prefix}:{name}"


def find_stack(boto: Any, stack: str) -> StackOutputs:
    """Reads ``stack``'s outputs in the session's region; AwsError naming the fix when the stack
    is not there (wrong name or region, not deployed) or lacks an output (deployed by an older version)."""
    region = boto.region_name
    cloudformation = boto.client("cloudformation")
    with aws_errors(f"reading stack {stack!r} in {region}"):
        try:
            found = cloudformation.describe_stacks(StackName=stack)["Stacks"]
        except Exception as exc:
            if error_code(exc) == "ValidationError" and "does not exist" in str(exc):
                raise AwsError(
                    f"stack {stack!r} not found in region {region}; deploy it first (`npx cdk deploy`), or give the "
                    f"name it was deployed under (--stack NAME) and the region it was deployed to (--region REGION)"
                ) from None
            raise
    outputs = {o["OutputKey"]: o["OutputValue"] for o in found[0].get("Outputs", [])}
    missing = [key for key in OUTPUTS.values() if key not in outputs]
    if missing:
        status = found[0].get("StackStatus", "")
        hint = (f"it is {status}; wait for the deployment to finish" if status.endswith("IN_PROGRESS")
                else "it was deployed by an older ftstack; redeploy it from this version (`npx cdk deploy`)")
        raise AwsError(f"stack {stack!r} in {region} has no output {', '.join(missing)}: {hint}")
    return StackOutputs(stack=stack, region=region, prefix=outputs.get(DATA_PREFIX, ""),
                        serving_role=outputs.get(SERVING_ROLE, ""), **{attr: outputs[key] for attr, key in OUTPUTS.items()})


def execution_console_link(region: str, execution_arn: str) -> str:
    """The Step Functions console page of an execution."""
    return (f"https://{region}.console.aws.amazon.com/states/home?region={region}"
            f"#/v2/executions/details/{execution_arn}")


def training_log_link(region: str, job: str) -> str:
    """The CloudWatch console page of a training job's log streams."""
    # The console's fragment escapes '/' and '?' as $252F and $3F (a URL-encoded URL inside a URL).
    group = quote(quote(TRAINING_LOG_GROUP, safe=""), safe="").replace("%", "$")
    return (f"https://{region}.console.aws.amazon.com/cloudwatch/home?region={region}"
            f"#logsV2:log-groups/log-group/{group}$3FlogStreamNameFilter$3D{job}")
