"""Props and context values that SageMaker or CloudFormation would refuse only at deploy, or
that would stop the synth with a traceback, are refused up front with the key and the fix."""

from __future__ import annotations

import pytest

from ftstack.infra.config import InfraConfigError, load_config
from ftstack.infra.options import PropsError
from ftstack.infra.props import FineTuningPipelineProps


@pytest.mark.parametrize("instance_type", ["ml.m5.xlarge", "ml.g5.3xlarge"])
def test_an_endpoint_instance_type_vllm_cannot_use_is_refused_by_prop_and_context_key(instance_type):
    """The deploy workflow sizes vLLM's tensor parallelism from the type's GPUs at synth: a CPU
    or unknown type stopped ``cdk synth`` with a bare ServingError, not a message naming the key."""
    with pytest.raises(PropsError, match=r"^FineTuningPipelineProps\.endpoint_instance_type: .*GPU instance type"):
        FineTuningPipelineProps(name="team", deploy_on_approval=True, endpoint_instance_type=instance_type)
    with pytest.raises(InfraConfigError, match=r"^context key 'endpoint_instance_type': .*GPU instance type"):
        load_config({"deploy_on_approval": True, "endpoint_instance_type": instance_type})


def test_a_gpu_endpoint_instance_type_is_accepted():
    assert FineTuningPipelineProps(name="team", endpoint_instance_type="ml.g5.12xlarge").endpoint_instance_type == "ml.g5.12xlarge"
    assert load_config({"endpoint_instance_type": "ml.g6e.xlarge"}).endpoint_instance_type == "ml.g6e.xlarge"


@pytest.mark.parametrize("value", ["a\tb", "a\nb", "ab\n", "a\x1fb", "a\x85b"])
def test_a_tag_with_a_control_character_is_refused(value):
    """``[\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*`` has no control characters; Python's ``\\s`` and ``$`` let them through."""
    with pytest.raises(PropsError, match=r"^FineTuningPipelineProps\.tags: "):
        FineTuningPipelineProps(name="team", tags={"team": value})


def test_a_tag_with_unicode_letters_digits_and_spaces_is_accepted():
    tags = {"équipe": "Recherche et développement", "cost center": "ml\u00a0٤٢", "note": "a\u3000b"}
    assert FineTuningPipelineProps(name="team", tags=tags).tags == tags
