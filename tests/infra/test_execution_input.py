"""The documented execution input (a JSON schema) agrees with what the workflow accepts: the
state machine's checks and the staging Lambda's."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from ftstack_train.contract import DEFAULT_TEST_SPLIT
from ftstack.infra.instances import INSTANCE_TYPE
from ftstack.infra.stage_data.handler import INPUT_KEYS

from test_workflow_behaviour import BAD_INPUTS, GOOD_INPUT  # tests/infra is on sys.path (rootdir-relative import)

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "infra" / "execution_input.schema.json").read_text())


def test_schema_is_valid_and_lists_the_accepted_keys():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert set(SCHEMA["properties"]) == set(INPUT_KEYS)
    assert SCHEMA["properties"]["test_split"]["default"] == DEFAULT_TEST_SPLIT
    assert SCHEMA["properties"]["instance_type"]["pattern"] == INSTANCE_TYPE.pattern


@pytest.mark.parametrize("execution_input", [
    GOOD_INPUT,
    GOOD_INPUT | {"test_split": 0.1, "hyperparameters": {"optimizer.lr": 1e-5, "packing": False}, "spot": True,
                  "instance_type": "ml.g5.48xlarge", "instance_count": 2, "base_model": "mosaicml/mpt-7b"},
    GOOD_INPUT | {"test_data": "s3://ftstack-bucket/incoming/test.jsonl"},
    GOOD_INPUT | {"force": True},
])
def test_inputs_the_workflow_accepts_are_valid(execution_input):
    jsonschema.validate(execution_input, SCHEMA)


# The schema cannot know a deployment's bucket name or max_instance_count; the state machine checks them.
DEPLOYMENT_SPECIFIC = ("other-bucket", '"instance_count": 5')


@pytest.mark.parametrize(("execution_input", "message"), [
    case for case in BAD_INPUTS if not any(marker in json.dumps(case[0]) for marker in DEPLOYMENT_SPECIFIC)
])
def test_inputs_the_workflow_rejects_are_invalid(execution_input, message):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(execution_input, SCHEMA)
