"""Batch arithmetic is checked against the GPUs of every instance type a run may use, before any
instance starts, with the training code's own rule."""

from __future__ import annotations


import pytest

from ftstack.infra.instances import GPUS, gpus
from ftstack.infra.stage_data.request import InvalidInput, Settings, check_input
from staging_samples import staging_settings

BUCKET = "ftstack-bucket"
TRAIN = f"s3://{BUCKET}/incoming/train.jsonl"


def settings(**overrides) -> Settings:
    return staging_settings(BUCKET, **{"fallback_instance_types": ["ml.g5.12xlarge"]} | overrides)


def test_the_tutorial_batch_fits_every_default_instance_type():
    request = check_input({"train_data": TRAIN}, settings())
    assert request.instance_types == ["ml.p4d.24xlarge", "ml.g5.12xlarge"]


@pytest.mark.parametrize(("execution_input", "expected"), [
    ({"hyperparameters": {"global_train_batch_size": 12}}, "global_train_batch_size: 12 rows cannot be split evenly over 8 processes"),
    ({"hyperparameters": {"global_train_batch_size": 16, "device_train_microbatch_size": 3}}, "device_train_microbatch_size: 3"),
    ({"hyperparameters": {"global_train_batch_size": 64}, "instance_count": 3}, "over 24 processes"),
])
def test_a_batch_the_gpus_cannot_split_is_rejected_naming_the_key_and_instances(execution_input, expected):
    with pytest.raises(InvalidInput, match="hyperparameters") as info:
        check_input({"train_data": TRAIN} | execution_input, settings())
    assert expected in str(info.value) and "ml.p4d.24xlarge" in str(info.value)


def test_a_fallback_type_that_cannot_split_the_batch_is_named():
    # 4 rows fit the 4 GPUs of the g5.12xlarge asked for, not the 8 of the p4d fallback.
    with pytest.raises(InvalidInput, match=r"over 8 processes.*1 x ml\.p4d\.24xlarge, 8 GPUs"):
        check_input({"train_data": TRAIN, "instance_type": "ml.g5.12xlarge", "hyperparameters": {
            "global_train_batch_size": 4, "device_train_microbatch_size": 1}}, settings(fallback_instance_types=["ml.p4d.24xlarge"]))


def test_unknown_instance_types_are_left_to_the_launcher():
    request = check_input({"train_data": TRAIN, "instance_type": "ml.trn9.48xlarge", "hyperparameters": {"global_train_batch_size": 7}},
                          settings(fallback_instance_types=[]))
    assert request.instance_types == ["ml.trn9.48xlarge"] and gpus("ml.trn9.48xlarge") is None


def test_gpu_table_is_sane():
    assert all(name.startswith("ml.") and count in (1, 4, 8) for name, count in GPUS.items())


def test_an_instance_type_the_deployment_does_not_allow_is_refused_before_any_job():
    with pytest.raises(InvalidInput, match=r"instance_type: 'ml.p5e.48xlarge' is not one this deployment allows "
                                           r"\(ml.p4d.24xlarge, ml.g5.48xlarge\); .*allowed_instance_types"):
        check_input({"train_data": TRAIN, "instance_type": "ml.p5e.48xlarge"},
                    settings(fallback_instance_types=["ml.g5.48xlarge"], allowed_instance_types=["ml.p4d.24xlarge", "ml.g5.48xlarge"]))


def test_allowed_instance_types_are_checked_and_join_instance_type_and_fallbacks():
    from ftstack.infra.config import InfraConfigError, load_config

    config = load_config({"instance_type": "ml.p4d.24xlarge", "fallback_instance_types": ["ml.g5.48xlarge"],
                          "allowed_instance_types": ["ml.p5.48xlarge", "ml.g5.48xlarge"]})
    assert config.instance_types == ("ml.p4d.24xlarge", "ml.g5.48xlarge", "ml.p5.48xlarge")
    with pytest.raises(InfraConfigError, match="context key 'allowed_instance_types': 'p5.48xlarge' is not a SageMaker instance type"):
        load_config({"allowed_instance_types": ["p5.48xlarge"]})
