"""``ftstack approve|reject MODEL_PACKAGE_ARN``: the manual gate between a registered model and
its deployment (the stack registers models as PendingManualApproval by default)."""

from __future__ import annotations

import argparse
import re

from .aws import AwsError, aws_errors, error_code, session

MODEL_PACKAGE_ARN = re.compile(r"^arn:aws[a-z\-]*:sagemaker:([a-z0-9\-]{9,16}):[0-9]{12}:model-package/\S{1,2048}$")
"""UpdateModelPackage's ModelPackageArn pattern (botocore's sagemaker model); group 1 is the region."""
MAX_REASON = 1024
"""ApprovalDescription's maximum length."""


def set_approval(args: argparse.Namespace, status: str) -> int:
    """UpdateModelPackage with ``status`` and ``args.reason``; prints the package's new status."""
    match = MODEL_PACKAGE_ARN.match(args.model_package_arn)
    if not match:
        raise AwsError(f"{args.model_package_arn!r} is not a model package ARN, e.g. arn:aws:sagemaker:us-east-1:"
                       "123456789012:model-package/ftstack-models/3 (ftstack status prints it)")
    if args.reason and len(args.reason) > MAX_REASON:
        raise AwsError(f"--reason is {len(args.reason)} characters; SageMaker takes at most {MAX_REASON}")
    # The package lives in the region its ARN names, whatever the profile's default is.
    sagemaker = session(args.region or match.group(1)).client("sagemaker")
    request = {"ModelPackageArn": args.model_package_arn, "ModelApprovalStatus": status}
    if args.reason:
        request["ApprovalDescription"] = args.reason
    with aws_errors(f"setting {args.model_package_arn} to {status}"):
        try:
            sagemaker.update_model_package(**request)
            found = sagemaker.describe_model_package(ModelPackageName=args.model_package_arn)
        except Exception as exc:
            if error_code(exc) in ("ValidationException", "ResourceNotFound") and "not" in str(exc).lower():
                raise AwsError(f"model package {args.model_package_arn} not found; `aws sagemaker list-model-packages "
                               "--model-package-group-name <stack>-models` lists the stack's packages") from None
            raise
    print(f"{args.model_package_arn}: {found['ModelApprovalStatus']}"
          + (f" ({found['ApprovalDescription']})" if found.get("ApprovalDescription") else ""))
    return 0


def approve(args: argparse.Namespace) -> int:
    """``ftstack approve MODEL_PACKAGE_ARN [--reason TEXT]``."""
    return set_approval(args, "Approved")


def reject(args: argparse.Namespace) -> int:
    """``ftstack reject MODEL_PACKAGE_ARN --reason TEXT``."""
    return set_approval(args, "Rejected")
