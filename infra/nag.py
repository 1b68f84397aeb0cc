"""cdk-nag acknowledgements: each names the exact finding (the narrowest id cdk-nag reports, e.g.
``AwsSolutions-IAM5[Action::s3:List*]``) on the construct that causes it, with its reason."""

from __future__ import annotations

from collections.abc import Mapping

import aws_cdk as cdk
from constructs import Construct, IConstruct

PLUGIN = "AwsSolutions"

GRANT_ACTIONS = {
    "Action::kms:GenerateDataKey*": "topic.grant_publish's data keys for the encrypted topic (the stack's key is the only resource)",
}
"""The action wildcards that the CDK grants still used write (infra.access writes exact actions);
the resources stay narrow."""


def acknowledge(construct: IConstruct, findings: Mapping[str, str]) -> None:
    """Acknowledges each ``AwsSolutions-…[...]`` finding id on ``construct`` with its reason."""
    for finding, reason in findings.items():
        cdk.Validations.of(construct).acknowledge(cdk.Acknowledgment(id=f"{PLUGIN}::{finding}", reason=reason))


def wildcard(detail: str) -> str:
    """The finding id of an IAM wildcard, e.g. ``wildcard("Resource::*")``."""
    return f"{PLUGIN}-IAM5[{detail}]"


def in_finding(scope: Construct, value: str) -> str:
    """How cdk-nag writes ``value`` (a string that may hold tokens) in a finding: its resolved form
    flattened as cdk-nag 3's ``flattenCfnReference`` does (lib/utils/flatten-cfn-reference.js):
    ``Ref`` as ``<Id>``, ``Fn::GetAtt`` as ``<Id.Attr>``, joins concatenated. It covers a resource of
    the stack (``<LogicalId.Arn>``) as well as an imported one (``Bucket.from_bucket_name``), whose
    ARN is a join of literals."""
    def visit(node) -> str:
        if node is None:
            return ""
        if isinstance(node, str):
            return node.replace("${", "<").replace("}", ">")
        if isinstance(node, list):
            return "".join(visit(item) for item in node)
        if "Fn::Join" in node:
            delimiter, items = node["Fn::Join"]
            return delimiter.join(visit(item) for item in items)
        if "Fn::Sub" in node:
            return visit(node["Fn::Sub"])
        if "Fn::GetAtt" in node:
            resource, attribute = node["Fn::GetAtt"]
            return f"<{visit(resource)}.{visit(attribute)}>"
        if "Fn::ImportValue" in node:
            return visit(node["Fn::ImportValue"])
        if "Ref" in node:
            return f"<{visit(node['Ref'])}>"
        raise ValueError(f"no finding text for {node!r}")

    return visit(cdk.Stack.of(scope).resolve(value))


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
