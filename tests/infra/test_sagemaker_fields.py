"""Staging checks each value bound for a SageMaker field against that field's limits in botocore's
model, so that an execution name or base-model prefix SageMaker refuses fails before training,
not at CreateTrainingJob or CreateModelPackage hours later."""

from __future__ import annotations

import sys
import unicodedata

import botocore.session
import pytest
import regex
from aws_contract import java_pattern
from staging_samples import staging_settings
from test_workflow_behaviour import GOOD_INPUT, run, step_functions_as_documented  # noqa: F401 (autouse fixture)

from ftstack_train.config import parse_config

from ftstack.infra.stage_data import fields
from ftstack.infra.stage_data.request import InvalidInput, check_input, check_sagemaker_fields

SAGEMAKER = botocore.session.get_session().get_service_model("sagemaker")
BUCKET = staging_settings().bucket


def _member_shapes() -> dict[str, str]:
    """The shape each field's value is sent in, read from the operations' input shapes."""
    job = SAGEMAKER.operation_model("CreateTrainingJob").input_shape.members
    package = SAGEMAKER.operation_model("CreateModelPackage").input_shape.members
    s3_source = job["InputDataConfig"].member.members["DataSource"].members["S3DataSource"].members
    assert job["CheckpointConfig"].members["S3Uri"].name == s3_source["S3Uri"].name
    return {
        fields.TAG_VALUE.where: job["Tags"].member.members["Value"].name,
        fields.METADATA_VALUE.where: package["CustomerMetadataProperties"].value.name,
        fields.DESCRIPTION.where: package["ModelPackageDescription"].name,
        fields.S3_URI.where: s3_source["S3Uri"].name,
        fields.HYPERPARAMETER_KEY.where: job["HyperParameters"].key.name,
        fields.HYPERPARAMETER_VALUE.where: job["HyperParameters"].value.name,
    }


@pytest.mark.parametrize("field", fields.FIELDS, ids=lambda f: f.shape)
def test_each_field_has_the_limits_of_its_botocore_shape(field):
    assert _member_shapes()[field.where] == field.shape
    meta = SAGEMAKER.shape_for(field.shape).metadata
    assert (field.min, field.max, field.pattern) == (meta.get("min", 0), meta["max"], meta["pattern"])


def _every_character() -> list[str]:
    """Every code point both Unicode databases (Python's, and regex's) assign, surrogates aside."""
    unassigned = regex.compile(r"\p{Cn}")
    return [chr(c) for c in range(sys.maxunicode + 1)
            if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) != "Cn" and not unassigned.match(chr(c))]


CONTEXT = {fields.S3_URI.shape: "s3://bucket/key{}"}
"""Where one character goes in a value of the field (a bare character where not listed)."""


@pytest.mark.parametrize("field", fields.FIELDS, ids=lambda f: f.shape)
def test_each_field_accepts_exactly_the_characters_its_pattern_accepts(field):
    pattern = java_pattern(field.pattern)
    context = CONTEXT.get(field.shape, "{}")
    differ = [f"U+{ord(c):04X}" for c in _every_character()
              if (field.problem(context.format(c)) is None) != bool(pattern.fullmatch(context.format(c)))]
    assert differ == []


def test_lengths_are_counted_in_utf16_code_units_as_aws_counts_them():
    astral = "\U00020000"  # a CJK letter outside the BMP: one character, two UTF-16 units
    assert fields.TAG_VALUE.problem(astral * 128) is None
    assert "is 258 characters long, over the 256" in fields.TAG_VALUE.problem(astral * 129)
    assert "at least 1 character" in fields.METADATA_VALUE.problem("")


def request(**execution_input):
    return check_input({"train_data": f"s3://{BUCKET}/incoming/t.jsonl"} | execution_input, staging_settings())


@pytest.mark.parametrize(("name", "shown"), [
    ("alice(1)", "'(' (U+0028 LEFT PARENTHESIS) at position 6"),
    ("run!", "'!' (U+0021 EXCLAMATION MARK) at position 4"),
    ("bob's-run", "\"'\" (U+0027 APOSTROPHE) at position 4"),
])
def test_an_execution_name_sagemaker_refuses_is_rejected_at_staging(name, shown):
    with pytest.raises(InvalidInput) as error:
        check_sagemaker_fields(name, request())
    message = str(error.value)
    assert message.startswith(f"the execution name {name!r} has {shown}, which CreateTrainingJob: Tags.Value does not allow")
    assert "start a new execution under a name without it" in message


def test_a_base_model_prefix_sagemaker_refuses_is_rejected_at_staging():
    with pytest.raises(InvalidInput, match=r"base_model 's3://.*/base-models/Llama-3 \(8B\)/' has '\(' .* "
                                           r"CustomerMetadataProperties does not allow"):
        check_sagemaker_fields("run1", request(base_model=f"s3://{BUCKET}/base-models/Llama-3 (8B)/"))


def test_a_base_model_uri_longer_than_sagemaker_takes_is_rejected():
    name = "m" * 1000
    with pytest.raises(InvalidInput, match="over the 256 that CreateModelPackage: CustomerMetadataProperties takes"):
        check_sagemaker_fields("run1", request(base_model=f"s3://{BUCKET}/base-models/{name}/"))


def test_a_multi_line_hyperparameter_is_sent_on_one_line_and_the_job_reads_it_back():
    template = "Answer briefly.\u2028### Question:\n{question}\r\n### Response:\u0085"
    sent = request(hyperparameters={"prompt_template": template}).hyperparameters
    assert fields.HYPERPARAMETER_VALUE.problem(sent["prompt_template"]) is None
    check_sagemaker_fields("run1", request(hyperparameters={"prompt_template": template}))
    cfg, _ = parse_config(hyperparameters=sent)
    assert cfg.prompt_template == template


def test_names_sagemaker_takes_pass():
    check_sagemaker_fields("Ünïcode-名前_run.2026@team=a+b", request(base_model=f"s3://{BUCKET}/base-models/mpt-7b_v2/"))


@pytest.mark.parametrize("name", ["alice(1)", "bob's-run"])
def test_an_odd_execution_name_fails_in_the_deployed_workflow_before_any_sagemaker_request(name):
    result, _, calls = run({}, GOOD_INPUT, name=name)
    assert result["status"] == "FAILED"
    assert result["error"] == "InvalidInput" and "SageMaker" in result["cause"]
    assert calls.of("sagemaker", "CreateTrainingJob") == []


def test_an_unusual_name_sagemaker_takes_makes_valid_requests_end_to_end():
    result, _, calls = run({}, GOOD_INPUT, name="Ünïcode-名前_run@team=a+b")
    assert result["status"] == "SUCCEEDED", result
    (register,) = calls.of("sagemaker", "CreateModelPackage")
    assert register.params["CustomerMetadataProperties"]["execution"] == "Ünïcode-名前_run@team=a+b"
