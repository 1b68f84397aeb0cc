"""An organisation's constraints on what a pipeline creates: a permissions boundary and a name
prefix on every role, and tags on every resource (training jobs get them through the workflow,
``WorkflowSettings.tags``)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

import aws_cdk as cdk
import jsii
from aws_cdk import aws_iam as iam
from constructs import Construct, IConstruct

MAX_ROLE_NAME = 64
_ROLE = "AWS::IAM::Role"
AUTO_DELETE_PROVIDER = "Custom::S3AutoDeleteObjectsCustomResourceProvider"
"""The stack-level provider CDK adds for a bucket with ``auto_delete_objects`` (the access-log
bucket of a created bucket with ``RemovalPolicy.DESTROY``); its role is one the pipeline makes."""


def role_name(prefix: str, pipeline: str, path: list[str], region: str | None = None) -> str:
    """``<prefix><pipeline>-<region>-<path>``, e.g. ``app-team-a-eu-west-1-Workflow``: IAM role names
    are account-wide, and one pipeline may be deployed to several regions (without a concrete
    region, it is left out). Shortened with a digest of the whole name when it would pass IAM's
    64 characters, so that it stays unique."""
    parts = [re.sub(r"[^\w+=,.@-]", "", p) for p in path if p not in ("Role", "Resource", "ServiceRole", "Default")] or path[-1:]
    name = f"{prefix}{pipeline}-{region + '-' if region else ''}{'-'.join(parts)}"
    if len(name) <= MAX_ROLE_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:MAX_ROLE_NAME - 9]}-{digest}"


@jsii.implements(cdk.IAspect)
class _RoleNames:
    """Names each role under ``root`` after its path below it."""

    def __init__(self, root: Construct, prefix: str, pipeline: str) -> None:
        self.root, self.prefix, self.pipeline = root, prefix, pipeline
        region = cdk.Stack.of(root).region
        self.region = None if cdk.Token.is_unresolved(region) else region

    def visit(self, node: IConstruct) -> None:
        if cdk.CfnResource.is_cfn_resource(node) and node.cfn_resource_type == _ROLE:
            below = node.node.path[len(self.root.node.path) + 1:].split("/")
            node.add_property_override("RoleName", role_name(self.prefix, self.pipeline, below, self.region))


def constrain(pipeline: Construct, *, name: str, permissions_boundary: iam.IManagedPolicy | None,
              role_name_prefix: str | None, tags: Mapping[str, str]) -> None:
    """Applies the constraints to everything under ``pipeline``, and to the roles it makes the
    stack add (CDK's auto-delete provider)."""
    stack = cdk.Stack.of(pipeline)
    provider = stack.node.try_find_child(AUTO_DELETE_PROVIDER)
    scopes = [pipeline] + ([provider] if provider is not None else [])
    for scope in scopes:
        if permissions_boundary is not None:
            iam.PermissionsBoundary.of(scope).apply(permissions_boundary)
        if role_name_prefix is not None:
            cdk.Aspects.of(scope).add(_RoleNames(pipeline if scope is pipeline else stack, role_name_prefix, name))
    for key, value in tags.items():
        cdk.Tags.of(pipeline).add(key, value)
