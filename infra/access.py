"""Narrow S3 and KMS permissions, written out action by action.

CDK's ``bucket.grant_read`` and ``grant_read_write`` grant ``s3:List*`` and ``s3:GetBucket*`` on
the whole bucket, ``s3:DeleteObject*`` (which includes DeleteObjectVersion: a permanent delete in a
versioned bucket) and ``kms:ReEncrypt*``. The roles of this stack get the exact actions instead:
objects by key pattern, listing only under the prefixes named (``s3:prefix``), deletes that leave
a recoverable version behind, and only the key actions each one calls.
"""

from __future__ import annotations

from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3

READ = ("s3:GetObject",)
WRITE = ("s3:PutObject", "s3:AbortMultipartUpload")
"""PutObject covers the multipart calls (create, upload part, complete); abort is its own action."""
DELETE = ("s3:DeleteObject",)
"""In a versioned bucket this only adds a delete marker; the data stays as a noncurrent version.
``s3:DeleteObjectVersion`` (the permanent delete) is granted to no role of the stack."""

DECRYPT = ("kms:Decrypt",)
"""Reading an SSE-KMS object, and each part of a multipart upload."""
ENCRYPT_OBJECTS = ("kms:GenerateDataKey", "kms:Decrypt")
"""Writing an SSE-KMS object (a data key per object; multipart uploads decrypt it again per part)."""


def grant_objects(principal: iam.IGrantable, bucket: s3.IBucket, *, read: tuple[str, ...] = (),
                  write: tuple[str, ...] = (), delete: tuple[str, ...] = ()) -> None:
    """Object actions on the key patterns given, e.g. ``read=("scratch/*/data/*",)``."""
    for actions, patterns in ((READ, read), (WRITE, write), (DELETE, delete)):
        if patterns:
            principal.grant_principal.add_to_principal_policy(iam.PolicyStatement(
                actions=list(actions), resources=[bucket.arn_for_objects(p) for p in patterns]))


def grant_list(principal: iam.IGrantable, bucket: s3.IBucket, *prefixes: str, versions: bool = False) -> None:
    """``s3:ListBucket`` (with ``versions``, ``s3:ListBucketVersions``) for listings under
    ``prefixes`` only (IAM wildcards, matched against the request's ``prefix``). A listing is how
    S3 tells a missing key (404) from a forbidden one (403) and how SageMaker reads an S3Prefix
    channel or checkpoint folder; a listing of versions is how a model is pinned."""
    principal.grant_principal.add_to_principal_policy(iam.PolicyStatement(
        actions=["s3:ListBucketVersions" if versions else "s3:ListBucket"], resources=[bucket.bucket_arn],
        conditions={"StringLike": {"s3:prefix": list(prefixes)}}))


def grant_key(principal: iam.IGrantable, key: kms.IKey, *actions: str) -> None:
    """Exactly ``actions`` on the stack's key (``kms.Key.grant`` adds no wildcard)."""
    key.grant(principal, *dict.fromkeys(actions))
