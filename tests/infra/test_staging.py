"""The data-staging Lambda construct: runtime, settings, its narrow role, and an asset made of
exactly the files the handler imports."""

from __future__ import annotations

import importlib.util

import json
import re
from pathlib import Path

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Match, Template

from ftstack.infra.config import InfraConfigError, load_config
from ftstack.infra.stage_data.handler import ASSET_MODULES, HANDLER
from ftstack.infra.stage_data.request import Settings
from ftstack.infra.stage_data.handler import FUNCTION_TIMEOUT_S
from ftstack.infra.staging import MEMORY_MB, StagingFunction
from ftstack.infra.props import FineTuningPipelineProps
from ftstack.infra.workflow import state_machine_name
from ftstack.infra.storage import Storage
from aws_contract import operation, problems
from iam_model import ACCOUNT, allows, as_list, of_type, resolved_resources, role_statements
from staging_samples import staging_values

SETTINGS = staging_values(fallback_instance_types=[])


def typed(storage: Storage) -> Settings:
    return Settings(bucket=storage.bucket.bucket_name, **SETTINGS | {"fallback_instance_types": tuple(SETTINGS["fallback_instance_types"])})


def test_settings_round_trip_through_the_environment():
    settings = Settings(bucket="ftstack-bucket", **SETTINGS | {"fallback_instance_types": ("ml.g5.48xlarge",)})
    assert Settings.from_env(settings.environment()) == settings


@pytest.fixture(scope="module")
def built(new_stack):
    app, stack = new_stack()
    storage = Storage(stack, "Storage", removal_policy=cdk.RemovalPolicy.RETAIN)
    StagingFunction(stack, "Staging", bucket=storage.bucket, key=storage.key, bucket_key=storage.bucket_key, settings=typed(storage), reserved_concurrency=7)
    assembly = app.synth()
    return Template.from_stack(stack), Path(assembly.directory)


def test_function_settings(built):
    template, _ = built
    template.has_resource_properties("AWS::Lambda::Function", {
        "Handler": HANDLER,
        "Runtime": "python3.14",
        "Timeout": FUNCTION_TIMEOUT_S,
        "MemorySize": MEMORY_MB,
        "EphemeralStorage": {"Size": 10240},
        "ReservedConcurrentExecutions": 7,
        "Environment": {"Variables": {"BUCKET": Match.any_value(), "SETTINGS": json.dumps(SETTINGS, sort_keys=True)}},
    })
    template.has_resource_properties("AWS::Logs::LogGroup", {"KmsKeyId": Match.any_value()})
    template.resource_properties_count_is("AWS::IAM::Role", {"ManagedPolicyArns": Match.any_value()}, 0)


def test_role_reads_incoming_and_writes_only_staged_data(built):
    template, _ = built
    (policy,) = [p for p in template.find_resources("AWS::IAM::Policy").values() if "StagingRole" in json.dumps(p["Properties"]["Roles"])]
    text = json.dumps(policy["Properties"]["PolicyDocument"])
    assert "/incoming/*" in text and "/scratch/*/data/*" in text
    # Issue 11, item 5: of a base model it reads config.json only, not the weights.
    assert "/base-models/*/config.json" in text and '/base-models/*"' not in text
    objects = json.dumps([s["Resource"] for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Action"] != "s3:ListBucket"])
    assert "/executions/" not in objects and "/checkpoints/" not in objects
    (listing,) = [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Action"] == "s3:ListBucket"]
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["incoming/*", "base-models/*", "scratch/*/checkpoints/*"]}}
    writes = [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if "s3:PutObject" in s["Action"]]
    assert writes and all("/scratch/*/data/*" in json.dumps(s["Resource"]) for s in writes)


def test_staging_deletes_nothing(built):
    """Issue 11, items 4 and 8: each invocation writes new objects to a folder of its own, so the
    function needs no delete, and cannot remove another execution's staged data."""
    template, _ = built
    (policy,) = [p for p in template.find_resources("AWS::IAM::Policy").values() if "StagingRole" in json.dumps(p["Properties"]["Roles"])]
    actions = [a for s in policy["Properties"]["PolicyDocument"]["Statement"] for a in
               (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])]
    assert "s3:PutObject" in actions and not [a for a in actions if a.startswith("s3:Delete")]


def test_the_function_has_the_vcpu_and_time_the_limit_is_sized_for():
    assert MEMORY_MB >= 1769  # Lambda's memory for one whole vCPU
    assert FUNCTION_TIMEOUT_S == 900  # Lambda's most
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    limits = text[text.index("**Staging limits.**"):].split("\n\n", 1)[0]
    assert [int(n.replace(",", "")) for n in re.findall(r"\(([\d,]+) MB\)", limits)] == [MEMORY_MB]


def test_asset_holds_exactly_the_imported_modules_as_they_are_installed(built):
    template, outdir = built
    (function,) = template.find_resources("AWS::Lambda::Function").values()
    key = function["Properties"]["Code"]["S3Key"]
    asset = outdir / f"asset.{key.removesuffix('.zip')}"
    files = {p.relative_to(asset).as_posix(): p for p in asset.rglob("*") if p.is_file()}
    modules = {path.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for path in files}
    expected = {".".join(m.split(".")[:i]) for m in ASSET_MODULES for i in range(1, m.count(".") + 1)}  # their __init__
    for name in ASSET_MODULES:
        spec = importlib.util.find_spec(name)
        if spec.submodule_search_locations:  # a package: its own modules, not its subpackages
            expected |= {name if f.stem == "__init__" else f"{name}.{f.stem}" for f in Path(spec.origin).parent.glob("*.py")}
        else:
            expected.add(name)
    assert modules == expected
    for path, copied in files.items():  # the very code that runs in the job's checks, not a copy of it
        name = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        assert copied.read_bytes() == Path(importlib.util.find_spec(name).origin).read_bytes(), path
    assert function["Properties"]["Handler"] == HANDLER and HANDLER.rsplit(".", 1)[0].replace(".", "/") + ".py" in files


def test_no_unacknowledged_nag_finding(new_stack, nag_findings):
    app, stack = new_stack("Nag")
    storage = Storage(stack, "Storage", removal_policy=cdk.RemovalPolicy.RETAIN)
    StagingFunction(stack, "Staging", bucket=storage.bucket, key=storage.key, bucket_key=storage.bucket_key, settings=typed(storage), reserved_concurrency=7)
    assert [f for f in nag_findings(app) if "/Staging/" in f] == []


def test_the_stack_reserves_the_configured_concurrency_for_staging(synthesized):
    """A burst of executions (each staging for up to 15 minutes) takes at most this much of the
    account's Lambda concurrency (issue 11, item 2)."""
    _, _, template, _ = synthesized
    configured = load_config(json.loads((Path(__file__).resolve().parents[2] / "cdk.json").read_text())["context"])
    template.has_resource_properties("AWS::Lambda::Function", {
        "Handler": HANDLER, "ReservedConcurrentExecutions": configured.staging_concurrency,
    })


def test_staging_concurrency_is_read_from_context_and_checked():
    assert load_config({}).staging_concurrency == 10
    assert load_config({"staging_concurrency": "3"}).staging_concurrency == 3  # `cdk synth -c staging_concurrency=3`
    with pytest.raises(InfraConfigError, match=r"'staging_concurrency': must be at least 1"):
        load_config({"staging_concurrency": 0})
    with pytest.raises(InfraConfigError, match=r"'staging_concurrency': 'ten' is not a whole number"):
        load_config({"staging_concurrency": "ten"})
    # Empty: no reservation (`-c staging_concurrency=`), for an account whose Lambda quota is too low for one.
    assert load_config({"staging_concurrency": ""}).staging_concurrency is None


def test_without_a_reservation_the_function_takes_the_accounts_unreserved_concurrency(new_stack):
    _, stack = new_stack()
    storage = Storage(stack, "Storage", removal_policy=cdk.RemovalPolicy.RETAIN)
    StagingFunction(stack, "Staging", bucket=storage.bucket, key=storage.key, bucket_key=storage.bucket_key,
                    settings=typed(storage), reserved_concurrency=None)
    (function,) = Template.from_stack(stack).find_resources("AWS::Lambda::Function", {"Properties": {"Handler": HANDLER}}).values()
    assert "ReservedConcurrentExecutions" not in function["Properties"]


def test_the_function_may_describe_its_own_workflows_executions_only(synthesized):
    """Issue 11, item 4: the function is told its state machine's ARN (which has a fixed name, so
    that no reference makes a cycle) and may describe that machine's executions, nothing else."""
    _, stack, template, _ = synthesized
    resources = resolved_resources(stack, template)
    (machine,) = [m for m in of_type(resources, "AWS::StepFunctions::StateMachine").values()
                  if m["Properties"]["StateMachineName"].endswith("-workflow")]  # not the deploy workflow
    name = machine["Properties"]["StateMachineName"]
    assert name == state_machine_name(stack.stack_name) == f"{stack.stack_name}-workflow"
    (function,) = [f for f in of_type(resources, "AWS::Lambda::Function").values()
                   if f["Properties"]["Handler"] == HANDLER]
    arn = function["Properties"]["Environment"]["Variables"]["STATE_MACHINE_ARN"]
    assert arn == f"arn:aws:states:{stack.region}:{ACCOUNT}:stateMachine:{name}"
    (role_id,) = [k for k in of_type(resources, "AWS::IAM::Role") if k.startswith("StagingRole")]
    statements = role_statements(resources, role_id)
    own = f"arn:aws:states:{stack.region}:{ACCOUNT}:execution:{name}:run-1"
    assert allows(statements, "states:DescribeExecution", own)
    for other in (own.replace(f":{name}:", f":{name}2:"), own.replace(f":{name}:", ":other:"),
                  own.replace(ACCOUNT, "210987654321")):
        assert not allows(statements, "states:DescribeExecution", other), other
    assert [a for st in statements for a in as_list(st["Action"]) if a.startswith("states:")] == ["states:DescribeExecution"]


@pytest.mark.parametrize("name", ["ftstack", "a" * 40, "Ab-" * 13 + "c"])
def test_the_state_machine_name_fits_step_functions_for_any_pipeline_name(name):
    FineTuningPipelineProps(name=name)  # a name the props take
    machine = state_machine_name(name)
    assert problems(operation("stepfunctions", "CreateStateMachine").input_shape.members["name"], machine) == []
    assert re.fullmatch(r"[0-9A-Za-z_-]+", machine)  # what a logging state machine's name may hold
