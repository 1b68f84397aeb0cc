"""Fixtures for the CDK tests: bare apps and stacks, the whole app synthesized once, and cdk-nag's
AwsSolutions findings."""

from __future__ import annotations

import json
import os
from pathlib import Path

# jsii runs on the pinned node 22 of package.json when `make` set JSII_NODE; otherwise (system node
# 20) it prints an end-of-life banner on every start unless this is set before aws_cdk loads.
_NODE = Path(__file__).resolve().parents[2] / "node_modules" / ".bin" / "node"
if _NODE.is_file():
    os.environ.setdefault("JSII_NODE", str(_NODE))
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

import aws_cdk as cdk  # noqa: E402
import pytest  # noqa: E402
from cdk_nag import AwsSolutionsChecks  # noqa: E402

TEST_ENV = cdk.Environment(account="123456789012", region="us-east-1")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def synthesized(tmp_path_factory):
    """``(outdir, stack, template, assembly)``: the app as ``cdk synth`` builds it (cdk.json's
    feature flags, cdk-nag), once per session: a synth of the whole app takes about 10 s."""
    from aws_cdk.assertions import Template

    import app as ftstack_app

    context = json.loads((ROOT / "cdk.json").read_text())["context"]
    outdir = tmp_path_factory.mktemp("cdk.out")
    app = cdk.App(outdir=str(outdir), context=context | {"quality_threshold": 1.5, "notification_emails": ["ml@example.com"], "deploy_on_approval": True})
    stack = ftstack_app.build_app(app)
    assembly = app.synth()
    return outdir, stack, Template.from_stack(stack), assembly


@pytest.fixture(scope="session")
def new_stack():
    """Makes ``(app, stack)``: a bare ``Stack`` with a concrete account and region, in ``app`` or a new app."""

    def make(stack_id: str = "Test", app: cdk.App | None = None) -> tuple[cdk.App, cdk.Stack]:
        app = app or cdk.App()
        return app, cdk.Stack(app, stack_id, env=TEST_ENV)

    return make


@pytest.fixture(scope="session")
def nag_findings():
    """Lists the unacknowledged AwsSolutions findings in an app as ``"<rule> <construct path>"``.

    It synthesizes with cdk-nag as a validation plugin, as ``app.py`` does: only that path honours
    acknowledgements (``AwsSolutionsChecks().validate_scope`` reports acknowledged findings too).
    """

    def findings(app: cdk.App) -> list[str]:
        cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
        try:
            app.synth()
        except RuntimeError as exc:
            if "ValidationFailed" not in str(exc):
                raise
        report = json.loads((Path(app.outdir) / "validation-report.json").read_text())
        return sorted(
            f"{violation['ruleName']} {construct['constructPath']}"
            for plugin in report["pluginReports"] if plugin["pluginName"] == "AwsSolutions"
            for violation in plugin["violations"]
            for construct in violation["violatingConstructs"]
        )

    return findings
