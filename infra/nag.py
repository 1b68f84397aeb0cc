"""cdk-nag acknowledgements: each names the exact finding (the narrowest id cdk-nag reports, e.g.
``AwsSolutions-IAM5[Action::s3:List*]``) on the construct that causes it, with its reason."""

from __future__ import annotations

from collections.abc import Mapping

import aws_cdk as cdk
from constructs import Construct, IConstruct

PLUGIN = "AwsSolutions"

GRANT_ACTIONS = {
    "Action::s3:GetObject*": "grant_read's object read actions (GetObject, GetObjectVersion, ...), limited to the prefix in the resource",
    "Action::s3:GetBucket*": "grant_read's bucket metadata actions, on the stack's bucket only",
    "Action::s3:List*": "grant_read's listing actions, on the stack's bucket only",
    "Action::s3:Abort*": "grant_put/grant_read_write may abort their own multipart uploads under the same prefix",
    "Action::s3:DeleteObject*": "deletes under the same narrow prefix only (checkpoint pruning; undoing a half-staged upload)",
    "Action::kms:GenerateDataKey*": "encrypting with the stack's key (the only key in the resource)",
    "Action::kms:ReEncrypt*": "grant_encrypt_decrypt's re-encryption with the stack's key (the only key in the resource)",
}
"""The action wildcards that CDK's grant_* methods write; the resources stay narrow."""


def acknowledge(construct: IConstruct, findings: Mapping[str, str]) -> None:
    """Acknowledges each ``AwsSolutions-…[...]`` finding id on ``construct`` with its reason."""
    for finding, reason in findings.items():
        cdk.Validations.of(construct).acknowledge(cdk.Acknowledgment(id=f"{PLUGIN}::{finding}", reason=reason))


def wildcard(detail: str) -> str:
    """The finding id of an IAM wildcard, e.g. ``wildcard("Resource::*")``."""
    return f"{PLUGIN}-IAM5[{detail}]"


def arn_of(resource: Construct) -> str:
    """How cdk-nag writes a resource's ARN in a finding: ``<LogicalId.Arn>``."""
    return f"<{cdk.Stack.of(resource).get_logical_id(resource.node.default_child)}.Arn>"


def arn_in_finding(scope: Construct, service: str, resource: str) -> str:
    """How cdk-nag writes an ARN built with ``Stack.format_arn``: unresolved pseudo parameters
    appear as ``<AWS::Partition>``/``<AWS::AccountId>``, known values as themselves (whether the
    partition is known depends on the app's feature flags)."""
    stack = cdk.Stack.of(scope)

    def shown(value: str, pseudo: str) -> str:
        return f"<AWS::{pseudo}>" if cdk.Token.is_unresolved(value) else value

    return f"arn:{shown(stack.partition, 'Partition')}:{service}:{shown(stack.region, 'Region')}:{shown(stack.account, 'AccountId')}:{resource}"


def grant_wildcards(*details: str) -> dict[str, str]:
    """Acknowledgements for the given grant action wildcards (keys of GRANT_ACTIONS)."""
    return {wildcard(d): GRANT_ACTIONS[d] for d in details}
