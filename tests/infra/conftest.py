"""Fixtures for the CDK tests: bare apps and stacks, and cdk-nag's AwsSolutions findings."""

from __future__ import annotations

import os

# jsii prints a node 20 end-of-life banner on every start unless this is set before aws_cdk loads.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

import aws_cdk as cdk  # noqa: E402
import pytest  # noqa: E402
from cdk_nag import AwsSolutionsChecks  # noqa: E402

TEST_ENV = cdk.Environment(account="123456789012", region="us-east-1")


@pytest.fixture(scope="session")
def new_stack():
    """Makes ``(app, stack)``: a bare ``Stack`` with a concrete account and region, in ``app`` or a new app."""

    def make(stack_id: str = "Test", app: cdk.App | None = None) -> tuple[cdk.App, cdk.Stack]:
        app = app or cdk.App()
        return app, cdk.Stack(app, stack_id, env=TEST_ENV)

    return make


@pytest.fixture(scope="session")
def nag_findings():
    """Lists the unacknowledged AwsSolutions findings in an app as ``"<rule> <construct path>"``."""

    def findings(app: cdk.App) -> list[str]:
        report = AwsSolutionsChecks().validate_scope(app)
        return sorted(
            f"{violation.rule_name} {resource.construct_path}"
            for violation in report.violations
            for resource in violation.violating_resources
        )

    return findings
