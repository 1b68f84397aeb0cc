"""The data-staging Lambda: validates the execution input and the data with the training code's
own modules, splits off a test set, and writes the job's channels."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import Construct

from .stage_data.execution import STATE_MACHINE_VARIABLE
from .assets import lambda_code
from .stage_data.handler import ASSET_MODULES, FUNCTION_TIMEOUT_S, HANDLER
from .stage_data.request import Settings
from .access import ENCRYPT_OBJECTS, grant_key, grant_list, grant_objects
from .nag import acknowledge, arn_in_finding, in_finding, wildcard
from .workflow import execution_arns, state_machine_arn, state_machine_name

MEMORY_MB = 2048
"""The staging function's memory. Lambda gives a whole vCPU from 1,769 MB on: the check runs on one
(what ``MAX_DATA_BYTES`` is sized for), and the part uploads get the rest. At 1,024 MB it had about
0.6 of a vCPU, and staging took longer in step."""



def python_function(scope: Construct, *, key: kms.IKey, handler: str, description: str, role_description: str,
                    memory_size: int, timeout: cdk.Duration, modules: tuple[str, ...] = ASSET_MODULES,
                    **more) -> lambda_.Function:
    """A function in ``scope`` whose code is exactly ``modules`` (by default the staging asset,
    which the job reaper shares), with its own role and a log group encrypted with ``key`` (kept a
    year); the caller grants it the rest."""
    # Kept when the stack is deleted: what the functions did is part of the audit trail.
    log_group = logs.LogGroup(scope, "Logs", encryption_key=key, retention=logs.RetentionDays.ONE_YEAR,
                              removal_policy=cdk.RemovalPolicy.RETAIN)
    role = iam.Role(scope, "Role", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"), description=role_description)
    log_group.grant_write(role)
    return lambda_.Function(
        scope, "Function", runtime=lambda_.Runtime.PYTHON_3_14, handler=handler, role=role,
        code=lambda_.Code.from_asset(str(lambda_code(modules))),
        log_group=log_group, memory_size=memory_size, timeout=timeout, description=description, **more,
    )


class StagingFunction(Construct):
    """``self.function``: stages a running execution of pipeline ``name``'s workflow
    (``state_machine_name``): reads ``<prefix>incoming/``, writes new objects under
    ``<prefix>scratch/<execution>/data/``."""

    def __init__(self, scope: Construct, construct_id: str, *, bucket: s3.IBucket, key: kms.IKey, settings: Settings,
                 bucket_key: kms.IKey | None, reserved_concurrency: int | None, name: str | None = None) -> None:
        """``key`` encrypts the function's logs; ``bucket_key`` the bucket's objects (None: the
        bucket's default encryption). ``name``: the pipeline's (the stack's by default)."""
        super().__init__(scope, construct_id)
        stack = cdk.Stack.of(self)
        name = name or stack.stack_name
        layout = settings.layout
        # Reserved so that a burst of executions (each staging for up to 15 minutes) cannot take
        # the account's whole Lambda concurrency, and other functions cannot starve staging.
        self.function = python_function(
            self, key=key, handler=HANDLER,
            environment=settings.environment() | {STATE_MACHINE_VARIABLE: state_machine_arn(stack, name)},
            memory_size=MEMORY_MB, ephemeral_storage_size=cdk.Size.gibibytes(10),
            timeout=cdk.Duration.seconds(FUNCTION_TIMEOUT_S),
            reserved_concurrent_executions=reserved_concurrency,
            description="ftstack: validate the execution input and data, stage the training channels",
            role_description="ftstack data staging: read incoming data, write staged channels, log",
        )
        role = self.function.role
        incoming, configs, staged = f"{layout.incoming}*", f"{layout.base_models}*/config.json", f"{layout.scratch}*/data/*"
        # No delete: each invocation writes new objects in a folder of its own, and a folder that a
        # failed or killed one leaves is never referenced (it expires with scratch/).
        grant_objects(role, bucket, read=(incoming, configs), write=(staged,))  # of a base model, its config only
        # Listing lets S3 answer a missing upload with 404 (without it: 403, which the handler also
        # names); resume_from lists the checkpoints it continues from.
        grant_list(role, bucket, incoming, f"{layout.base_models}*", f"{layout.scratch}*/checkpoints/*")
        # Whether the bucket keeps versions, without which a trained model cannot be registered.
        role.add_to_principal_policy(iam.PolicyStatement(actions=["s3:GetBucketVersioning"], resources=[bucket.bucket_arn]))
        if bucket_key is not None:
            grant_key(role, bucket_key, *ENCRYPT_OBJECTS)
        # The execution it stages, its name and its input come from Step Functions (issue 11, item 4).
        role.add_to_principal_policy(iam.PolicyStatement(actions=["states:DescribeExecution"],
                                                         resources=[execution_arns(stack, name)]))
        bucket_arn = in_finding(self, bucket.bucket_arn)
        acknowledge(role, {
            wildcard(f"Resource::{bucket_arn}/{incoming}"): "the user's data files, named by the execution input",
            wildcard(f"Resource::{bucket_arn}/{configs}"): "checks that an s3:// base model exists (its config.json only)",
            wildcard(f"Resource::{bucket_arn}/{staged}"): "writes the staged channels of the running execution",
            wildcard("Resource::" + arn_in_finding(self, "states", f"execution:{state_machine_name(name)}:*")):
                "describes the execution that invoked it, whose name is known at run time only (its own state machine's only)",
        })
