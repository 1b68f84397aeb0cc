#!/usr/bin/env python3
"""The CDK app: read the configuration from context, resolve the images, create the stack, and
check it with cdk-nag's AWS Solutions rules (a finding fails the synth)."""

from __future__ import annotations

import os
import sys

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

from ftstack.infra import FineTuningStack, InfraConfigError, PropsError
from ftstack.infra.config import CONTEXT_KEYS, load_config


def build_app(app: cdk.App) -> FineTuningStack:
    """Creates the stack on ``app`` from its context; raises InfraConfigError (or PropsError)
    on bad values."""
    context = {key: app.node.try_get_context(key) for key in CONTEXT_KEYS}
    config = load_config(context)
    account = os.environ.get("CDK_DEFAULT_ACCOUNT")
    stack = FineTuningStack(
        app, config.stack_name, config=config, env=cdk.Environment(account=account, region=config.region),
        description="ftstack: fine-tune Hugging Face causal LMs on SageMaker",
    )
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return stack


def main() -> int:
    app = cdk.App()
    try:
        stack = build_app(app)
    except (InfraConfigError, PropsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app.synth()
    # The training image builds FROM the base image, so `cdk deploy` needs Docker logged in to the
    # base image's registry, whose account and region depend on the region deployed to.
    login = stack.node.try_find_child("BaseImageLogin")
    if login is not None:
        print(f"Before deploying, log Docker in to the base image's registry:\n  {login.value}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
