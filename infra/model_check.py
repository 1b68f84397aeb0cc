"""The deploy workflow's model check, as a Lambda handler: the model files of an approved package
against the manifest digest registered with it (``ftstack.serving.verify_s3_model``), before
anything is created. Standard library and boto3 (which the Lambda runtime provides) only."""

from __future__ import annotations

from typing import Any

ASSET_MODULES = (
    "ftstack.serving", "ftstack.instances", "ftstack.infra.model_check",
    *(f"ftstack_train.{name}" for name in ("manifest", "contract", "errors", "validation", "files")),
)
"""Every module the handler imports from ftstack; the function's asset holds exactly these
(``ftstack.infra.assets.lambda_code``)."""
HANDLER = "ftstack.infra.model_check.handler"
"""The handler, by its path in that asset."""
TIMEOUT_S = 120
"""A listing and one HeadObject per file: seconds, even for a sharded 70B model."""


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """``{"model_uri": "s3://...", "manifest_sha256": "<hex>"}`` -> the check's summary. A model
    that does not match raises ModelIntegrityError, the error the workflow reports."""
    import boto3

    from ftstack.serving import verify_s3_model

    return verify_s3_model(boto3.client("s3"), event.get("model_uri", ""), event.get("manifest_sha256", ""))
