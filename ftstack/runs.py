"""``ftstack start``: check a run's inputs here, upload its data, start the workflow.

Everything that can be checked without AWS is checked before anything is uploaded: the execution
name, the hyperparameters (by the training job's own config parser), the instance type and each
local file (by the shared validation module, as ``ftstack validate`` does). The staging step
checks the input again in AWS, against the deployment's settings.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .aws import AwsError, StackOutputs, aws_errors, error_code, execution_console_link, find_stack, session
from .upload import check_base_model_uri, check_data_uri, object_exists, upload_file

EXECUTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
"""StartExecution takes 1-80 characters (botocore's model), with no whitespace, brackets,
wildcards or ``"#%\\^|~`$&,;:/``; the stack's state machine logs to CloudWatch, for which Step
Functions asks for 0-9, A-Z, a-z, - and _ only. The name also becomes an S3 key part and a job name."""
INSTANCE_TYPE = re.compile(r"^ml\.[a-z0-9]+\.[0-9]*x?large$")
"""The execution input schema's pattern for instance_type (infra/execution_input.schema.json)."""


def check_execution_name(name: str) -> str:
    """Returns ``name`` when Step Functions and the stack take it as an execution name; else AwsError."""
    if not EXECUTION_NAME.match(name):
        raise AwsError(f"--name {name!r}: use 1-80 letters, digits, hyphens or underscores (the workflow logs to "
                       "CloudWatch, which takes no other characters), e.g. --name mpt7b-lr5e6-001")
    return name


def default_execution_name(train: str) -> str:
    """``<training file stem>-<UTC time>-<4 hex>``: sortable, and unique without asking AWS."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(train).stem).strip("-")[:40] or "run"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stem}-{stamp}-{secrets.token_hex(2)}"


def _check_hyperparameters(overrides: list[str]) -> dict[str, str]:
    from ftstack_train.config import parse_config
    from ftstack_train.sources import parse_overrides

    hyperparameters = parse_overrides(overrides)
    _, ignored = parse_config(hyperparameters=hyperparameters)  # ConfigError names the key and the fix
    for warning in ignored:
        print(f"hyperparameters: {warning}", file=sys.stderr)
    return hyperparameters


def _check_local_files(paths: list[Path]) -> None:
    from ftstack_train.validation import check_files

    report = check_files(paths)  # DataError lists file:line and the fix; nothing has been uploaded
    print(report.format(), file=sys.stderr)


def _is_uri(value: str) -> bool:
    return value.startswith("s3://")


def check_local(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """Every check that needs no AWS; returns the execution name and the hyperparameters."""
    name = check_execution_name(args.name) if args.name else default_execution_name(args.train)
    if args.instance_type and not INSTANCE_TYPE.match(args.instance_type):
        raise AwsError(f"--instance-type {args.instance_type!r} is not a SageMaker training instance type, "
                       "e.g. ml.g5.48xlarge or ml.p4d.24xlarge")
    if args.instance_count is not None and args.instance_count < 1:
        raise AwsError("--instance-count must be at least 1")
    if args.test and args.test == args.train:
        raise AwsError("--test is the same file as --train; give a separate test file, or leave --test out "
                       "to hold out every 20th training record")
    hyperparameters = _check_hyperparameters(args.overrides)
    local = [Path(p) for p in (args.train, args.test) if p and not _is_uri(p)]
    if local:
        _check_local_files(local)
    return name, hyperparameters


def _data_uri(s3: Any, outputs: StackOutputs, option: str, value: str) -> str:
    if _is_uri(value):
        check_data_uri(option, value, outputs.bucket, outputs.prefix)
        object_exists(s3, option, value)
        return value
    done = upload_file(s3, outputs.bucket, Path(value), prefix=outputs.prefix)
    print(f"{'uploaded' if done.uploaded else 'already in S3 (same SHA-256)'}: {value} -> {done.uri}", file=sys.stderr)
    return done.uri


def build_input(args: argparse.Namespace, train: str, test: str | None, hyperparameters: dict[str, str]) -> dict:
    """The execution input, with the keys of infra/execution_input.schema.json; what is not given is
    left out, so the stack's defaults apply."""
    data: dict[str, Any] = {"train_data": train}
    optional = {
        "test_data": test, "base_model": args.base_model, "instance_type": args.instance_type,
        "instance_count": args.instance_count, "spot": args.spot, "resume_from": args.resume_from,
        "force": args.force, "hyperparameters": hyperparameters or None,
    }
    data.update({key: value for key, value in optional.items() if value is not None})
    return data


def start_run(args: argparse.Namespace) -> int:
    """``ftstack start``: checks, uploads, starts; prints the execution's name, ARN and console link."""
    name, hyperparameters = check_local(args)
    boto = session(args.region)
    outputs = find_stack(boto, args.stack)
    s3 = boto.client("s3")
    if args.base_model and _is_uri(args.base_model):
        check_base_model_uri(args.base_model, outputs.bucket, s3, outputs.prefix)
    train = _data_uri(s3, outputs, "--train", args.train)
    test = _data_uri(s3, outputs, "--test", args.test) if args.test else None
    execution_input = build_input(args, train, test, hyperparameters)
    sfn = boto.client("stepfunctions")
    with aws_errors(f"starting execution {name!r} of {outputs.state_machine_arn}"):
        try:
            started = sfn.start_execution(stateMachineArn=outputs.state_machine_arn, name=name,
                                          input=json.dumps(execution_input))
        except Exception as exc:
            if error_code(exc) == "ExecutionAlreadyExists":
                raise AwsError(f"--name {name}: an execution of that name exists already; choose another name "
                               f"(to continue it, add --resume-from {name})") from None
            raise
    arn = started["executionArn"]
    print(f"started execution {name}\n  arn:     {arn}\n  console: {execution_console_link(outputs.region, arn)}\n"
          f"  follow:  ftstack status {name}; ftstack logs {name} --follow", flush=True)
    if args.wait:
        from .follow import follow_execution

        return follow_execution(boto, outputs, arn, poll=args.poll)
    return 0
