"""examples/platform/app.py, the README's example for platform teams: two teams' pipelines on one
existing bucket and VPC, under a permissions boundary, one with an evaluation step, synthesized
offline and clean of cdk-nag findings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Template

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "platform" / "app.py"


def load_example():
    spec = importlib.util.spec_from_file_location("platform_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    """(app, {stack name: Template}, validation report) as `cdk synth` makes them."""
    example = load_example()
    context = json.loads((ROOT / "cdk.json").read_text())["context"]
    app = cdk.App(outdir=str(tmp_path_factory.mktemp("platform.out")), context=context)
    stacks = example.build_app(app)
    app.synth()  # cdk-nag's checks run here; a finding would fail it (ValidationFailed)
    report = Path(app.outdir) / "validation-report.json"
    return app, {s.stack_name: Template.from_stack(s) for s in stacks}, report


def states_of(machine: dict) -> dict:
    """The definition's states; references in it (ARNs of the stack's resources) read as "ref"."""
    text = machine["Properties"]["DefinitionString"]
    if not isinstance(text, str):  # a join of literals and references
        text = "".join(part if isinstance(part, str) else "ref" for part in text["Fn::Join"][1])
    return json.loads(text)["States"]


def workflow(template: Template, name: str) -> dict:
    (machine,) = [m for m in template.find_resources("AWS::StepFunctions::StateMachine").values()
                  if m["Properties"]["StateMachineName"] == f"{name}-workflow"]
    return states_of(machine)


def test_it_synthesizes_with_no_nag_finding(synthesized):
    _, templates, report = synthesized
    assert sorted(templates) == ["acme-ml-team-a", "acme-ml-team-b"]
    assert not report.exists() or not [v for p in json.loads(report.read_text())["pluginReports"] for v in p["violations"]
                                       if not v["ruleName"].startswith("Annotation::")]


def test_the_teams_share_the_platforms_bucket_and_vpc_and_create_neither(synthesized):
    _, templates, _ = synthesized
    for template in templates.values():
        for kind in ("AWS::S3::Bucket", "AWS::EC2::VPC", "AWS::EC2::Subnet"):
            template.resource_count_is(kind, 0)
        (function,) = [f for f in template.find_resources("AWS::Lambda::Function").values()
                       if "SETTINGS" in f["Properties"].get("Environment", {}).get("Variables", {})]
        settings = json.loads(function["Properties"]["Environment"]["Variables"]["SETTINGS"])
        assert function["Properties"]["Environment"]["Variables"]["BUCKET"] == "acme-ml-data"
        assert settings["prefix"] in ("team-a/", "team-b/")
        train = workflow(template, settings["job_prefix"])["Train"]["Parameters"]
        assert train["VpcConfig"]["Subnets"] == ["subnet-0a1b2c3d4e5f60718", "subnet-0f1e2d3c4b5a69788"]


def test_every_role_is_bounded_and_named_by_the_organisations_rules(synthesized):
    _, templates, _ = synthesized
    names = []
    for template in templates.values():
        for logical_id, role in template.find_resources("AWS::IAM::Role").items():
            boundary = json.dumps(role["Properties"].get("PermissionsBoundary"))
            assert ":policy/acme-ml-boundary" in boundary, logical_id
            if logical_id.startswith("Pipeline"):  # the team's own evaluation role is named by the team
                names.append(role["Properties"]["RoleName"])
    assert names and all(n.startswith("acme-ml-") and len(n) <= 64 for n in names) and len(set(names)) == len(names)


def test_team_b_evaluates_before_the_gate_and_tags_its_jobs(synthesized):
    _, templates, _ = synthesized
    states = workflow(templates["acme-ml-team-b"], "team-b")
    assert states["MetricsComplete?"]["Choices"][0]["Next"] == "CheckModel" and states["CheckModel"]["Next"] == "Evaluate"
    branch = states["Evaluate"]["Branches"][0]
    assert branch["States"][branch["StartAt"]]["Resource"].endswith(":states:::sagemaker:createProcessingJob.sync")
    rules = states["QualityGate"]["Choices"][0]["And"]
    assert {"Variable": "$.evaluation.output.metrics.accuracy", "NumericGreaterThanEquals": 0.7} in rules
    assert {"Key": "team", "Value": "team-b"} in states["Train"]["Parameters"]["Tags"]
    assert "Evaluate" not in workflow(templates["acme-ml-team-a"], "team-a")
