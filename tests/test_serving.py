"""ftstack.serving: names and environments that SageMaker's own models accept (botocore's service
model, patterns and lengths included), and the vLLM environment (the S3 check of a model is
``test_s3_model``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftstack.serving import (
    DEFAULT_INSTANCE_TYPE, ENV_CHAT_TEMPLATE, INFERENCE_AMI, ENV_MAX_MODEL_LEN, ENV_MODEL, ENV_TENSOR_PARALLEL, PREFIX_MAX, ServingError,
    answer_text, check_endpoint_name, deploy_environment, instance_gpus, invoke_body, invoke_command, registration_environment,
    production_variant, resource_name, resource_prefix, serving_instance_types, vllm_environment,
)

sys.path.insert(0, str(Path(__file__).parent / "infra"))  # botocore's contracts, shared with the workflow tests
from aws_contract import operation, problems  # noqa: E402

NAMES = ["a", "ftstack-models", "x" * 63, "A-1", "a--b", "team-a-" + "long" * 14]


def shapes():
    return {
        "ModelName": operation("sagemaker", "CreateModel").input_shape.members["ModelName"],
        "EndpointConfigName": operation("sagemaker", "CreateEndpointConfig").input_shape.members["EndpointConfigName"],
        "EndpointName": operation("sagemaker", "CreateEndpoint").input_shape.members["EndpointName"],
    }


@pytest.mark.parametrize("endpoint", NAMES)
def test_every_derived_name_is_one_sagemaker_takes(endpoint):
    check_endpoint_name(endpoint[:63])
    endpoint = endpoint[:63]
    name = resource_name(endpoint, "arn:aws:states:us-east-1:123456789012:execution:x-deploy:" + "e" * 80)
    found = shapes()
    assert problems(found["EndpointName"], endpoint) == []
    assert problems(found["ModelName"], name) == [] and problems(found["EndpointConfigName"], name) == []
    assert len(name) <= 63 and name.startswith(resource_prefix(endpoint) + "-")


def test_long_endpoint_names_that_start_alike_get_prefixes_of_their_own():
    a, b = "team-" + "a" * 40 + "-one", "team-" + "a" * 40 + "-two"
    assert resource_prefix(a) != resource_prefix(b)
    assert len(resource_prefix(a)) <= PREFIX_MAX and resource_prefix("short") == "short"


@pytest.mark.parametrize("bad", ["", "-a", "a-", "a_b", "a.b", "x" * 64, "é"])
def test_names_sagemaker_refuses_are_refused_with_the_rule(bad):
    assert problems(shapes()["EndpointName"], bad)  # botocore's model refuses each as well
    with pytest.raises(ServingError, match="letters, digits and hyphens"):
        check_endpoint_name(bad)


def test_the_environment_names_the_container_variables_and_fits_create_model():
    env = vllm_environment(max_model_len=2048) | deploy_environment(4)
    assert env[ENV_MODEL] == "/opt/ml/model"
    assert env[ENV_CHAT_TEMPLATE] == "/opt/ml/model/chat_template.jinja"
    assert env[ENV_MAX_MODEL_LEN] == "2048" and env[ENV_TENSOR_PARALLEL] == "4"
    assert env["SM_VLLM_DTYPE"] == "bfloat16"
    assert not any("TRUST_REMOTE_CODE" in key for key in env)
    # Every SM_VLLM_ variable is a `vllm serve` flag: the container turns SM_VLLM_MAX_MODEL_LEN into --max-model-len.
    flags = {"--" + key[len("SM_VLLM_"):].lower().replace("_", "-") for key in env if key.startswith("SM_VLLM_")}
    assert flags == {"--model", "--dtype", "--chat-template", "--max-model-len", "--tensor-parallel-size"}
    container = operation("sagemaker", "CreateModel").input_shape.members["PrimaryContainer"]
    assert problems(container.members["Environment"], env) == []


def test_without_a_length_the_model_keeps_its_own_maximum():
    assert ENV_MAX_MODEL_LEN not in vllm_environment()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "2048"])
def test_a_bad_length_is_refused(bad):
    with pytest.raises(ServingError, match="max_model_len"):
        vllm_environment(max_model_len=bad)


def test_the_registration_fragment_reads_the_length_from_the_state():
    fragment = registration_environment("$.staged.max_seq_len")
    assert fragment[f"{ENV_MAX_MODEL_LEN}.$"] == "States.Format('{}', $.staged.max_seq_len)"
    assert {k: v for k, v in fragment.items() if not k.endswith(".$")} == vllm_environment()
    assert registration_environment() == vllm_environment()
    with pytest.raises(ServingError, match="JSONPath"):
        registration_environment("staged.max_seq_len")


def test_instance_types():
    assert instance_gpus(DEFAULT_INSTANCE_TYPE) == 1 and instance_gpus("ml.g5.12xlarge") == 4
    with pytest.raises(ServingError, match="ml.m5.xlarge.*ml.g5.2xlarge"):
        instance_gpus("ml.m5.xlarge")
    # V100 and T4 have no bf16, which vLLM then refuses at start-up; ml.p3dn is not even an endpoint type.
    for name in ("ml.p3.2xlarge", "ml.g4dn.xlarge", "ml.p3dn.24xlarge"):
        with pytest.raises(ServingError, match=f"{name}'.*have no bf16"):
            instance_gpus(name)


def test_every_serving_variant_is_one_sagemaker_takes():
    shape = operation("sagemaker", "CreateEndpointConfig").input_shape.members["ProductionVariants"].member
    assert DEFAULT_INSTANCE_TYPE in serving_instance_types()
    for name in serving_instance_types():
        variant = production_variant(name)
        assert problems(shape, variant | {"ModelName": "m"}) == [], name  # the instance type and AMI enums included
        assert variant["InferenceAmiVersion"] == INFERENCE_AMI
    with pytest.raises(ServingError):
        production_variant("ml.g4dn.xlarge")


def test_the_invoke_command_sends_a_chat_request_as_written():
    command = invoke_command("ftstack-models", "eu-west-1", prompt="What's up?")
    assert command.startswith("aws sagemaker-runtime invoke-endpoint --region eu-west-1 --endpoint-name ftstack-models ")
    # The shell gives the CLI the JSON body exactly, quote included.
    printed = subprocess.run(["bash", "-c", "printf %s " + command.split("--body ", 1)[1].rsplit(" ", 1)[0]],
                             capture_output=True, text=True, check=True).stdout
    assert json.loads(printed) == invoke_body("What's up?", 128)
    assert answer_text({"choices": [{"message": {"role": "assistant", "content": "Athens"}}]}) == "Athens"
    with pytest.raises(ServingError, match="not a chat completion"):
        answer_text({"generated_text": "x"})


def test_the_module_loads_without_boto3_or_torch():
    code = ("import sys; sys.modules['boto3'] = None; sys.modules['torch'] = None; sys.modules['aws_cdk'] = None\n"
            "import ftstack.serving")
    subprocess.run([sys.executable, "-c", code], check=True)
