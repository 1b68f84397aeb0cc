"""The data-staging Lambda: validates the execution input and the data with the training code's
own modules, splits off a test set, and writes the job's channels."""

from __future__ import annotations

import json
from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import Construct

from . import layout

ROOT = Path(__file__).resolve().parents[1]

# The asset is the repository filtered to the handler and the stdlib-only training modules it
# imports: the very files the training job runs, not copies.
ASSET_FILES = [
    "infra/__init__.py", "infra/layout.py", "infra/stage_data/__init__.py", "infra/stage_data/handler.py",
    "training_code/ftstack_train/__init__.py", "training_code/ftstack_train/validation.py",
    "training_code/ftstack_train/config.py", "training_code/ftstack_train/durations.py",
    "training_code/ftstack_train/errors.py", "training_code/ftstack_train/contract.py",
]


class StagingFunction(Construct):
    """``self.function``: reads ``incoming/``, writes ``scratch/<execution>/data/``."""

    def __init__(self, scope: Construct, construct_id: str, *, bucket: s3.IBucket, key: kms.IKey, settings: dict) -> None:
        super().__init__(scope, construct_id)
        log_group = logs.LogGroup(self, "Logs", encryption_key=key, retention=logs.RetentionDays.ONE_YEAR,
                                  removal_policy=cdk.RemovalPolicy.DESTROY)
        role = iam.Role(self, "Role", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
                        description="ftstack data staging: read incoming data, write staged channels, log")
        log_group.grant_write(role)
        self.function = lambda_.Function(
            self, "Function",
            runtime=lambda_.Runtime.PYTHON_3_14,
            handler="infra.stage_data.handler.handler",
            code=lambda_.Code.from_asset(str(ROOT), exclude=["*", *(f"!{path}" for path in ASSET_FILES), "!infra", "!infra/stage_data",
                                                             "!training_code", "!training_code/ftstack_train"]),
            role=role,
            log_group=log_group,
            memory_size=1024,
            ephemeral_storage_size=cdk.Size.gibibytes(10),
            timeout=cdk.Duration.minutes(15),
            environment={"BUCKET": bucket.bucket_name, "SETTINGS": json.dumps(settings, sort_keys=True)},
            description="ftstack: validate the execution input and data, stage the training channels",
        )
        bucket.grant_read(role, f"{layout.INCOMING}*")
        bucket.grant_read(role, f"{layout.BASE_MODELS}*")
        bucket.grant_put(role, f"{layout.SCRATCH}*/data/*")
