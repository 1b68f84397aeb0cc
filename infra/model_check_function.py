"""The model-check Lambda (``ftstack.infra.model_check``): the training workflow pins each model's
files (their S3 object versions) before registering it, and the deploy workflow checks them
against what was pinned before serving it."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from ftstack_train.contract import MANIFEST_FILE

from .access import DECRYPT, grant_key, grant_list, grant_objects
from .model_check import ASSET_MODULES, HANDLER, TIMEOUT_S
from .nag import acknowledge, in_finding, wildcard
from .staging import python_function


class ModelCheckFunction(Construct):
    """``self.function``: reads the manifest and lists the object versions of the models in
    ``model_folders`` (a key pattern ending in ``/``, e.g. ``executions/*/model/*/output/model/``);
    it reads no weights and writes nothing."""

    def __init__(self, scope: Construct, construct_id: str, *, bucket: s3.IBucket, key: kms.IKey,
                 bucket_key: kms.IKey | None, model_folders: str) -> None:
        """``key`` encrypts the function's logs; ``bucket_key`` the bucket's objects (None: the
        bucket's default encryption)."""
        super().__init__(scope, construct_id)
        self.function = python_function(
            self, key=key, handler=HANDLER, modules=ASSET_MODULES, memory_size=256,
            timeout=cdk.Duration.seconds(TIMEOUT_S),
            description="ftstack: pin a model's files before registration, check them before deployment",
            role_description="ftstack: read model manifests and list their object versions, log",
        )
        role = self.function.role
        manifests = f"{model_folders}{MANIFEST_FILE}"
        grant_objects(role, bucket, read=(manifests,))
        # The versions of the model's objects: how the check knows that nothing was overwritten.
        grant_list(role, bucket, f"{model_folders}*", versions=True)
        if bucket_key is not None:
            grant_key(role, bucket_key, *DECRYPT)
        acknowledge(role, {
            wildcard(f"Resource::{in_finding(self, bucket.bucket_arn)}/{manifests}"):
                "reads the manifest of the model being registered or deployed, known at run time only",
        })
