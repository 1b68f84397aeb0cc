"""The model check, as a Lambda handler: a model folder against its manifest and its S3 object
versions (``ftstack.s3_model``). The training workflow pins the folder before it registers the
model; the deploy workflow checks it against what was pinned before anything is created.
Standard library and boto3 (which the Lambda runtime provides) only."""

from __future__ import annotations

from typing import Any

ASSET_MODULES = (
    "ftstack.serving", "ftstack.s3_model", "ftstack.instances", "ftstack.infra.model_check",
    *(f"ftstack_train.{name}" for name in ("manifest", "contract", "errors", "validation", "files")),
)
"""Every module the handler imports from ftstack; the function's asset holds exactly these
(``ftstack.infra.assets.lambda_code``)."""
HANDLER = "ftstack.infra.model_check.handler"
"""The handler, by its path in that asset."""
TIMEOUT_S = 120
"""A listing of the folder's versions and one manifest read: seconds, even for a sharded 70B model."""
REGISTRATION, DEPLOYMENT = "registration", "deployment"
"""The two checks (the event's ``check``)."""


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """``{"check": "registration", "model_uri": "s3://...", "manifest_sha256": "<hex>"}`` -> the
    summary, with the ``model_versions_sha256`` to register; ``{"check": "deployment", ...,
    "model_versions_sha256": "<hex>"}`` -> the summary once the folder is what was registered. A
    model that does not pass raises ModelIntegrityError, the error the workflows report."""
    import boto3

    from ftstack.s3_model import VERSIONS_SHA256, pin_s3_model, verify_s3_model

    check, uri, manifest = event.get("check"), event.get("model_uri", ""), event.get("manifest_sha256", "")
    if check == REGISTRATION:
        return pin_s3_model(boto3.client("s3"), uri, manifest)
    if check == DEPLOYMENT:
        return verify_s3_model(boto3.client("s3"), uri, manifest, event.get(VERSIONS_SHA256, ""))
    raise ValueError(f"check: {check!r} is neither {REGISTRATION!r} nor {DEPLOYMENT!r}")
