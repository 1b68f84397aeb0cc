"""The whole app, synthesized once: cdk-nag, cfn-lint, the state machine as ASL, the stack's
outputs, and the contracts between the infrastructure and the training code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Match
from statelint.linter import Linter

import app as ftstack_app
from ftstack.aws import OUTPUTS
from ftstack_train.config import parse_config
from ftstack_train.contract import CHANNELS, FINAL_METRICS_FILE, METRICS_FILE, MODEL_CHANNEL, TEST_CHANNEL, TRAIN_CHANNEL, SageMakerPaths
from ftstack_train.metrics import METRIC_DEFINITIONS
from ftstack.infra import layout
from ftstack.infra.config import InfraConfigError
from ftstack.infra.definition import PLACEHOLDERS
from ftstack.infra.images import registry_of, training_base_image

ROOT = Path(__file__).resolve().parents[2]
CDK_CONTEXT = json.loads((ROOT / "cdk.json").read_text())["context"]
"""The feature flags `cdk synth` applies; the tests synthesize with the same."""


@pytest.fixture(scope="module")
def definition(synthesized) -> dict:
    _, _, template, _ = synthesized
    (machine,) = [m for m in template.find_resources("AWS::StepFunctions::StateMachine").values()
                  if m["Properties"]["StateMachineName"].endswith("-workflow")]  # not the deploy workflow
    text = machine["Properties"]["DefinitionString"]
    assert isinstance(text, str), "the definition stays one string; resources come in as DefinitionSubstitutions"
    assert set(machine["Properties"]["DefinitionSubstitutions"]) == set(PLACEHOLDERS)
    for name in PLACEHOLDERS:  # resolved at deploy time; any value stands in for linting
        text = text.replace("${" + name + "}", f"placeholder-{name.lower()}")
    return json.loads(text)


def test_cdk_nag_has_no_unacknowledged_finding(synthesized):
    outdir, _, _, _ = synthesized
    report = json.loads((outdir / "validation-report.json").read_text())
    (plugin,) = report["pluginReports"]
    assert plugin["pluginName"] == "AwsSolutions" and plugin["conclusion"] == "success"
    assert plugin["violations"] == []
    # Every acknowledgement names an exact finding and carries a reason.
    suppressed = plugin.get("suppressedViolations", [])
    assert suppressed and all(re.fullmatch(r"AwsSolutions-[A-Z0-9]+(\[.+\])?", v["ruleName"]) for v in suppressed)


def test_a_new_unacknowledged_finding_fails_the_synth(tmp_path):
    from aws_cdk import aws_iam as iam

    app = cdk.App(outdir=str(tmp_path), context=CDK_CONTEXT)
    stack = ftstack_app.build_app(app)
    role = iam.Role(stack, "Careless", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"))
    role.add_to_policy(iam.PolicyStatement(actions=["s3:*"], resources=["*"]))
    with pytest.raises(RuntimeError, match="ValidationFailed"):
        app.synth()
    report = json.loads((tmp_path / "validation-report.json").read_text())
    paths = {c["constructPath"] for v in report["pluginReports"][0]["violations"] for c in v["violatingConstructs"]}
    assert paths == {"ftstack/Careless/DefaultPolicy/Resource"}


def test_scratch_data_outlives_the_longest_job_the_deployment_allows(tmp_path):
    # Issue 11, item 6: scratch expired after 14 days while max_wait_hours allowed 28 days of spot.
    from aws_cdk.assertions import Template

    app = cdk.App(outdir=str(tmp_path), context=CDK_CONTEXT | {"max_runtime_hours": 600, "max_wait_hours": 672})
    rules = Template.from_stack(ftstack_app.build_app(app)).find_resources("AWS::S3::Bucket")
    scratch = [r for b in rules.values() for r in b["Properties"].get("LifecycleConfiguration", {}).get("Rules", [])
               if r["Id"] == "ExpireScratch"]
    assert [r["ExpirationInDays"] for r in scratch] == [28 + 7]


def test_cfn_lint_is_clean(synthesized):
    outdir, _, _, _ = synthesized
    # W3005: CDK adds DependsOn on a role that a GetAtt already implies; harmless and not ours to change.
    result = subprocess.run([str(Path(sys.executable).with_name("cfn-lint")), "--ignore-checks", "W3005", "--", *map(str, outdir.glob("*.template.json"))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_state_machine_is_valid_asl(definition):
    assert Linter.validate(definition) == []


def test_state_machine_logs_everything_encrypted_and_traces(synthesized):
    _, _, template, _ = synthesized
    template.has_resource_properties("AWS::StepFunctions::StateMachine", {
        "LoggingConfiguration": {"Level": "ALL", "IncludeExecutionData": True, "Destinations": Match.any_value()},
        "TracingConfiguration": {"Enabled": True},
    })
    template.has_resource_properties("AWS::Logs::LogGroup", {"KmsKeyId": Match.any_value()})


def test_stack_outputs(synthesized):
    _, _, template, _ = synthesized
    for name in ("BucketName", "StateMachineArn", "ModelPackageGroupName", "TrainingImageUri", "TopicArn", "BaseImageLogin"):
        template.has_output(name, {"Value": Match.any_value()})
    for name in OUTPUTS.values():  # every output the operator CLI reads
        template.has_output(name, {"Value": Match.any_value()})


def test_the_base_image_login_output_is_the_registry_of_the_resolved_image(synthesized):
    """The image asset builds FROM the base image; the output is the login for its registry."""
    _, _, template, _ = synthesized
    from ftstack.infra.config import load_config

    config = load_config(CDK_CONTEXT)
    base = config.base_image or training_base_image(config.region, config.pytorch_version, config.python_version)
    template.has_output("BaseImageLogin", {"Value": registry_of(base).login_command})


def test_metric_definitions_come_from_the_training_code(definition):
    params = definition["States"]["Train"]["Parameters"]
    assert params["AlgorithmSpecification"]["MetricDefinitions"] == [{"Name": d.name, "Regex": d.regex} for d in METRIC_DEFINITIONS]


def test_channels_paths_and_output_agree_with_the_training_code(definition):
    states = definition["States"]
    names = [c["ChannelName"] for c in states["AddModelChannel"]["Parameters"]["list"]]
    assert names == [TRAIN_CHANNEL, TEST_CHANNEL, MODEL_CHANNEL] and set(names) <= set(CHANNELS)
    train = states["Train"]["Parameters"]
    assert train["CheckpointConfig"]["LocalPath"] == str(SageMakerPaths(Path("/opt/ml")).checkpoints)
    assert train["OutputDataConfig"]["CompressionType"] == "NONE"
    # SageMaker writes an uncompressed model to <S3OutputPath><job>/output/model/: where the
    # workflow reads the final metrics, what it registers as the model's statistics, and the model.
    located = states["LocateModel"]["Parameters"]
    assert states["ReadMetrics"]["Parameters"]["Key.$"] == "$.model.final_metrics_key"
    assert f"/output/model/{FINAL_METRICS_FILE}'" in located["final_metrics_key.$"] and "/output/model/'" in located["uri.$"]
    assert f"/output/model/{METRICS_FILE}'" in located["metrics_uri.$"]
    source = states["Register"]["Parameters"]["InferenceSpecification"]["Containers"][0]["ModelDataSource"]["S3DataSource"]
    assert source["S3DataType"] == "S3Prefix" and source["CompressionType"] == "None" and source["S3Uri.$"] == "$.model.uri"
    assert layout.Layout().model_prefix("x").startswith(layout.EXECUTIONS) and layout.Layout().checkpoint_prefix("x").startswith(layout.SCRATCH)


def test_the_workflows_hyperparameters_parse_with_the_training_config():
    """What the staging step passes as HyperParameters (strings) is what the job parses."""
    from ftstack.infra.stage_data.handler import check_input
    from staging_samples import staging_settings

    settings = staging_settings("ftstack-bucket", fallback_instance_types=[])
    request = check_input({"train_data": "s3://ftstack-bucket/incoming/t.jsonl", "hyperparameters": {
        "optimizer.lr": 1e-5, "packing": False, "optimizer.betas": [0.9, 0.95], "max_duration": "2ep"}}, settings)
    assert all(isinstance(v, str) for v in request.hyperparameters.values())
    cfg, _ = parse_config(hyperparameters=request.hyperparameters)
    assert (cfg.lr, cfg.packing, cfg.betas, str(cfg.max_duration)) == (1e-5, False, (0.9, 0.95), "2ep")


def test_bad_context_fails_the_synth_naming_the_key():
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "CDK_CONTEXT_JSON": json.dumps({"instance_type": "p4d"}),
                                 "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20"})
    assert result.returncode == 2
    assert "instance_type" in result.stderr and "Traceback" not in result.stderr


def test_config_errors_name_the_key():
    from ftstack.infra.config import load_config

    with pytest.raises(InfraConfigError, match="max_wait_hours"):
        load_config({"spot": True, "max_runtime_hours": 48, "max_wait_hours": 24})
    with pytest.raises(InfraConfigError, match="vpc_security_group_ids"):
        load_config({"vpc_subnet_ids": ["subnet-1"]})
    with pytest.raises(InfraConfigError, match="base_model"):
        load_config({"network_isolation": True})
    assert load_config({"notification_emails": "a@example.com,b@example.com"}).notification_emails == ("a@example.com", "b@example.com")


def test_a_base_image_digest_reaches_the_docker_build(tmp_path):
    """Issue 11, item 9: with base_image_digest the training image builds FROM <repository>@<digest>,
    not from the tag AWS re-publishes."""
    from aws_cdk.assertions import Template

    digest = "sha256:" + "9f" * 32
    app = cdk.App(outdir=str(tmp_path), context=CDK_CONTEXT | {"region": "eu-west-1", "base_image_digest": digest})
    Template.from_stack(ftstack_app.build_app(app))  # writes the asset manifest that `cdk deploy` reads
    (image,) = json.loads((tmp_path / "ftstack.assets.json").read_text())["dockerImages"].values()
    assert image["source"]["dockerBuildArgs"] == {"BASE_IMAGE": f"763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training@{digest}"}


@pytest.mark.parametrize("context", [
    {"base_image_digest": "sha256:" + "9f" * 31},  # too short
    {"base_image_digest": "9f" * 32},  # no algorithm
    {"base_image_digest": "sha256:" + "9F" * 32},  # Docker accepts lowercase hex only
    {"base_image_digest": "2.8-gpu-py312"},  # a tag
    {"base_image_digest": "sha256:" + "9f" * 32, "base_image": "example.com/base@sha256:" + "0" * 64},
])
def test_a_malformed_base_image_digest_is_rejected_naming_the_key(context):
    from ftstack.infra.config import load_config

    with pytest.raises(InfraConfigError, match="context key 'base_image_digest'"):
        load_config(context)


@pytest.mark.parametrize("name", ["ftstack--dev", "ftstack-", "-ftstack", "9ftstack"])
def test_stack_names_keep_job_names_apart(name):
    # Jobs are named <stack>--<execution>...: a "--" in the stack name would let one stack's IAM
    # resource (<stack>--*) match another's jobs, and the staging function refuses such a prefix.
    from ftstack.infra.config import load_config

    with pytest.raises(InfraConfigError, match="stack_name"):
        load_config({"stack_name": name})


@pytest.mark.slow
def test_template_metric_regexes_read_a_real_local_run(definition, tmp_path):
    """The regexes as deployed (taken from the synthesized template, not from the module) find
    every metric in what a real 2-process training run prints."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}."}) + "\n" for i in range(24)))
    log = subprocess.run(
        [sys.executable, "-m", "ftstack.cli", "local", "--train", str(data), "--test", str(data), "--model", "tiny-mpt",
         "--output", str(tmp_path / "run"), "max_seq_len=64", "global_train_batch_size=4", "device_train_microbatch_size=2",
         "max_duration=3ba", "eval_interval=3ba"],
        capture_output=True, text=True, timeout=300,
    )
    assert log.returncode == 0, log.stdout + log.stderr
    lines = log.stdout.splitlines()
    for metric in definition["States"]["Train"]["Parameters"]["AlgorithmSpecification"]["MetricDefinitions"]:
        values = [float(m.group(1)) for line in lines if (m := re.search(metric["Regex"], line))]
        assert values, f"{metric['Name']}: nothing matched {metric['Regex']}"
        assert all(v == v for v in values), f"{metric['Name']}: NaN read"


def test_python_app_py_synthesizes(tmp_path):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "CDK_OUTDIR": str(tmp_path),
           "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20", "CDK_CONTEXT_JSON": json.dumps(CDK_CONTEXT)}
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    template = json.loads((tmp_path / "ftstack.template.json").read_text())
    # What the deployer needs before the first deploy is printed, not only a stack output.
    assert template["Outputs"]["BaseImageLogin"]["Value"] in result.stderr
