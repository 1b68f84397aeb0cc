"""The stack's storage: one KMS key, the data bucket and the bucket that receives its access logs.

The bucket's prefixes come from ``infra.layout`` (re-exported here): ``incoming/`` and
``executions/`` (uploads and models) are kept; ``scratch/<execution>/`` (staged data, checkpoints)
expires after ``scratch_days``. S3 lifecycle filters match key prefixes only, which is why
everything that may expire lives under that one prefix.
"""

from __future__ import annotations

import math

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

from .layout import EXECUTIONS, INCOMING, SCRATCH, Layout

__all__ = [
    "ACCESS_LOG_DAYS", "ACCESS_LOG_PREFIX", "EXECUTIONS", "INCOMING", "INCOMPLETE_UPLOAD_DAYS", "LOGS_KEY_ACTIONS",
    "NONCURRENT_VERSION_DAYS", "RESUME_DAYS", "SCRATCH", "SCRATCH_DAYS", "Storage", "scratch_days_for",
]

SCRATCH_DAYS = 14
RESUME_DAYS = 7
"""How long checkpoints outlive the longest job, so that a run can still be resumed (resume_from)."""


def scratch_days_for(longest_job_hours: float) -> int:
    """Days the scratch data (staged channels, checkpoints) is kept: at least ``SCRATCH_DAYS``, and
    always longer than the longest job (spot waits included) plus ``RESUME_DAYS``. A spot job that
    restarts on its last day needs its channels and checkpoints still there."""
    return max(SCRATCH_DAYS, math.ceil(longest_job_hours / 24) + RESUME_DAYS)


NONCURRENT_VERSION_DAYS = 30
INCOMPLETE_UPLOAD_DAYS = 7
ACCESS_LOG_DAYS = 365
ACCESS_LOG_PREFIX = "bucket/"

# With this flag off CDK grants log delivery through an ACL, which needs ACLs enabled on the log
# bucket; with it on, through a bucket policy. Set here so the result does not depend on cdk.json.
_LOGS_USE_BUCKET_POLICY = "@aws-cdk/aws-s3:serverAccessLogsUseBucketPolicy"

LOGS_KEY_ACTIONS = ("kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*")
"""What CloudWatch Logs needs on the key of an encrypted log group ("Encrypt log data in CloudWatch
Logs using AWS Key Management Service", docs.aws.amazon.com/AmazonCloudWatch/latest/logs/encrypt-log-data-kms.html)."""


def _secure_bucket_defaults() -> dict:
    """What every bucket of the stack has: SSL only, no public access, no ACLs, versioning."""
    return dict(
        enforce_ssl=True,
        block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
        object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
        versioned=True,
    )


class Storage(Construct):
    """The pipeline's key, data bucket (SSE-KMS, always retained) and the bucket that receives its
    access logs: each created unless brought.

    ``self.key`` encrypts what the pipeline creates (logs, topic, training volumes, and a created
    bucket); ``self.bucket_key`` is the key of the bucket's objects (``key`` for a created bucket,
    ``bucket_key`` or None for a brought one, which then keeps its own default encryption).

    ``removal_policy`` applies to a created access-log bucket only (``DESTROY`` empties it first).
    A created data bucket and key are always retained: models must survive a stack deletion, and a
    retained bucket is unreadable once its key is deleted.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        removal_policy: cdk.RemovalPolicy,
        scratch_days: int = SCRATCH_DAYS,
        name: str | None = None,
        layout: Layout = Layout(),
        key: kms.IKey | None = None,
        bucket: s3.IBucket | None = None,
        bucket_key: kms.IKey | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        if scratch_days < 1:
            raise ValueError(f"scratch_days must be at least 1, got {scratch_days}")
        self.node.set_context(_LOGS_USE_BUCKET_POLICY, True)
        name = name or cdk.Stack.of(self).stack_name
        self.key = key or kms.Key(
            self,
            "Key",
            description=f"{name}: the data bucket (datasets, checkpoints, models) and notifications",
            alias=f"alias/{name}/data",
            enable_key_rotation=True,
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        self.logs_may_use_key = let_cloudwatch_logs_use(self.key)
        if bucket is not None:
            self.bucket, self.bucket_key, self.access_logs = bucket, bucket_key, None
            self.scratch_expires = expire_scratch(bucket, layout, scratch_days)
            return
        # Server access logs can only be delivered to a bucket with S3-managed encryption.
        self.access_logs = s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="ExpireAccessLogs",
                    expiration=cdk.Duration.days(ACCESS_LOG_DAYS),
                    noncurrent_version_expiration=cdk.Duration.days(NONCURRENT_VERSION_DAYS),
                )
            ],
            removal_policy=removal_policy,
            auto_delete_objects=removal_policy == cdk.RemovalPolicy.DESTROY,
            **_secure_bucket_defaults(),
        )
        self.bucket = s3.Bucket(
            self,
            "Bucket",
            encryption=s3.BucketEncryption.KMS,
            encryption_key=self.key,
            bucket_key_enabled=True,
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix=ACCESS_LOG_PREFIX,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="ExpireNoncurrentVersions",
                    noncurrent_version_expiration=cdk.Duration.days(NONCURRENT_VERSION_DAYS),
                    expired_object_delete_marker=True,
                ),
                s3.LifecycleRule(
                    id="AbortIncompleteUploads",
                    abort_incomplete_multipart_upload_after=cdk.Duration.days(INCOMPLETE_UPLOAD_DAYS),
                ),
            ],
            removal_policy=cdk.RemovalPolicy.RETAIN,
            **_secure_bucket_defaults(),
        )
        self.bucket_key = self.key
        self.scratch_expires = expire_scratch(self.bucket, layout, scratch_days)


def expire_scratch(bucket: s3.IBucket, layout: Layout, days: int) -> bool:
    """Adds the rule that expires ``<prefix>scratch/`` after ``days`` to ``bucket``; False when it
    cannot (a bucket imported by name or ARN, whose rules are its owner's: they must add it)."""
    if not isinstance(bucket, s3.Bucket):
        cdk.Annotations.of(bucket).add_warning_v2(
            "ftstack:ScratchNotExpired",
            f"ftstack cannot add lifecycle rules to an imported bucket: add one that expires {layout.scratch} "
            f"after {days} days (staged data and checkpoints), or they are kept and paid for.")
        return False
    rule_id = "ExpireScratch" if not layout.prefix else f"ExpireScratch-{layout.prefix.strip('/').replace('/', '-')}"
    bucket.add_lifecycle_rule(id=rule_id, prefix=layout.scratch, expiration=cdk.Duration.days(days))
    return True


def let_cloudwatch_logs_use(key: kms.IKey) -> bool:
    """Lets CloudWatch Logs encrypt this account's and region's log groups with ``key``; False
    when the key policy cannot be changed here (an imported key: its owner must add it).

    The pipeline's log groups are encrypted with the key, and CloudWatch Logs calls KMS as its own
    regional service principal, which only the key policy can allow (IAM grants reach roles, not
    services): without this statement creating the first log group fails with "The specified KMS
    key does not exist or is not allowed to be used" and the stack rolls back. CDK does not add it
    (aws-cdk issue 28304, github.com/aws/aws-cdk/issues/28304).

    The encryption context names the log group, so the condition keeps the key to log groups of
    this account and region. It cannot name the log groups themselves: their names are generated
    by CloudFormation, and the log groups' ARNs reference the key (a cycle).
    """
    stack = cdk.Stack.of(key)
    log_groups = stack.format_arn(service="logs", resource="log-group", resource_name="*",
                                  arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME)
    added = key.add_to_resource_policy(iam.PolicyStatement(
        sid="CloudWatchLogsEncryptsTheStacksLogGroups",
        principals=[iam.ServicePrincipal(f"logs.{stack.region}.{stack.url_suffix}")],
        actions=list(LOGS_KEY_ACTIONS),
        resources=["*"],
        conditions={"ArnLike": {"kms:EncryptionContext:aws:logs:arn": log_groups}},
    ))
    if not added.statement_added:
        cdk.Annotations.of(key).add_warning_v2(
            "ftstack:LogsKeyPolicy",
            f"ftstack cannot change an imported key's policy: add a statement that lets logs.{stack.region}."
            f"amazonaws.com use it ({', '.join(LOGS_KEY_ACTIONS)}), or creating the pipeline's log groups fails.")
    return added.statement_added
