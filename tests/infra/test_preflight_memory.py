"""The staging step's pre-flight memory check (``infra.stage_data.preflight``), with the
estimator's real numbers: a run that fits none of its instance types fails before any instance
starts, itemized; ``force`` starts it anyway; a fallback that fits lets it go on; a model the
estimator does not know is reported, not refused; an s3:// model's config.json is read from S3."""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from ftstack.estimate import Setup, estimate_memory
from ftstack.instances import INSTANCE_TYPES
from ftstack.model_shapes import KNOWN_MODELS
from ftstack.infra.stage_data.handler import (
    Execution, InsufficientGpuMemory, InvalidInput, base_model_shape, check_input, check_memory, stage, staged_hyperparameters,
)
from staging_samples import staging_settings

BUCKET = "ftstack-bucket"
TRAIN = f"s3://{BUCKET}/incoming/train.jsonl"
DOOMED = {"train_data": TRAIN, "base_model": "mosaicml/mpt-7b", "instance_type": "ml.g5.12xlarge",
          "hyperparameters": {"max_seq_len": 2048, "device_train_microbatch_size": 8,
                              "fsdp_config.activation_checkpointing": False}}
"""MPT-7B at 2048 tokens, micro batch 8, no activation checkpointing, on 4 A10G: about 97 GiB a GPU."""
ONLY_FIRST = staging_settings(BUCKET, fallback_instance_types=[])


def preflight(execution_input: dict, settings=ONLY_FIRST, s3=None) -> dict:
    request = check_input(execution_input, settings)
    return check_memory(request, settings, *base_model_shape(s3, BUCKET, request))


def test_a_run_that_fits_no_instance_type_fails_with_the_itemized_estimate():
    with pytest.raises(InsufficientGpuMemory) as failed:
        preflight(DOOMED)
    message = str(failed.value)
    # attn_impl auto: on the A10G, sdpa (FlexAttention's kernels do not fit its shared memory).
    expected = estimate_memory(Setup(KNOWN_MODELS["mpt-7b"], INSTANCE_TYPES["ml.g5.12xlarge"], 2048, 8, False, "sdpa"))
    assert not expected.fits and expected.peak > 90 * 2**30
    assert f"ml.g5.12xlarge (4 x A10G, 22.5 GiB each; micro batch 8, attention sdpa, states sharded over 4 GPUs): peak " \
           f"{expected.peak / 2**30:.1f} GiB > budget 18.0 GiB" in message
    for item, size in expected.items.items():
        assert f"  {item}: {size / 2**30:.2f} GiB" in message
    assert "activation checkpointing off" in message and "(80% of GPU memory)" in message
    # Four instances fully sharded fit (at most max_instance_count 4), named in execution input terms.
    assert "Smallest change that fits: instance_count 4 with hyperparameters fsdp_config.sharding_strategy=FULL_SHARD" in message
    assert '"force": true' in message


def test_force_skips_the_verdict_but_reports_the_estimate():
    report = preflight(DOOMED | {"force": True})
    assert report["forced"] is True and report["estimated"] is True
    assert report["instance_types"]["ml.g5.12xlarge"]["fits"] is False
    assert report["instance_types"]["ml.g5.12xlarge"]["peak_gib"] > 90


def test_force_must_be_a_boolean():
    with pytest.raises(InvalidInput, match="force: 'yes' is not true or false"):
        check_input(DOOMED | {"force": "yes"}, ONLY_FIRST)


def test_a_fallback_that_fits_lets_the_run_go_on_with_its_types_in_order():
    # MPT-7B at the defaults: 16 GB V100s cannot hold it (16.3 GiB > 12.6), the g5.48xlarge fallback can.
    settings = staging_settings(BUCKET, fallback_instance_types=["ml.g5.48xlarge"])
    request = check_input({"train_data": TRAIN, "instance_type": "ml.p3.16xlarge"}, settings)
    report = check_memory(request, settings, *base_model_shape(None, BUCKET, request))
    assert request.instance_types == ["ml.p3.16xlarge", "ml.g5.48xlarge"]
    assert report["instance_types"]["ml.p3.16xlarge"] == {"peak_gib": 16.3, "budget_gib": 12.6, "fits": False, "attn_path": "sdpa"}
    assert report["instance_types"]["ml.g5.48xlarge"]["fits"] is True


def test_an_instance_type_without_a_memory_figure_is_not_counted_against_the_run():
    settings = staging_settings(BUCKET, fallback_instance_types=["ml.trn9.48xlarge"])
    report = preflight(DOOMED, settings)
    assert report["not_estimated"] == ["ml.trn9.48xlarge"]
    assert report["instance_types"]["ml.g5.12xlarge"]["fits"] is False


def test_a_hub_model_outside_the_table_has_no_estimate_and_goes_on():
    report = preflight(DOOMED | {"base_model": "someone/unknown-model"})
    assert report["estimated"] is False
    assert report["note"].startswith("no memory estimate: someone/unknown-model is not in the estimator's table")
    assert "ftstack stage-model" in report["note"]


MPT_CONFIG = {"model_type": "mpt", "d_model": 4096, "n_layers": 32, "n_heads": 32, "expansion_ratio": 4,
              "vocab_size": 50432, "attn_config": {"attn_pdrop": 0}}


@pytest.mark.parametrize(("config", "outcome"), [
    (json.dumps(MPT_CONFIG).encode(), "fails"),
    (b"{}", "the estimator cannot read s3://ftstack-bucket/base-models/m/config.json: "),
    (b"not json", "s3://ftstack-bucket/base-models/m/config.json is not JSON"),
])
def test_an_s3_base_model_is_estimated_from_its_config_json_in_s3(config, outcome):
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="base-models/m/config.json", Body=config)
        model = {"base_model": f"s3://{BUCKET}/base-models/m/"}
        if outcome == "fails":
            with pytest.raises(InsufficientGpuMemory, match=r"attention sdpa, .*: peak 100\.8 GiB > budget 18\.0 GiB"):
                preflight(DOOMED | model, s3=s3)
            assert preflight(DOOMED | model | {"force": True}, s3=s3)["model"] == f"s3://{BUCKET}/base-models/m/config.json"
        else:
            report = preflight(DOOMED | model, s3=s3)
            assert report["estimated"] is False and outcome in report["note"]


@pytest.mark.parametrize("instance_type", [None, "ml.trn9.48xlarge"])  # None: the default; or one the estimator does not know
def test_an_attention_path_the_job_would_refuse_for_the_model_is_an_input_error(instance_type):
    llama_like = {"model_type": "gpt_neox", "hidden_size": 512, "num_attention_heads": 8, "num_hidden_layers": 2,
                  "intermediate_size": 2048, "vocab_size": 1000}
    settings = staging_settings(BUCKET, fallback_instance_types=[instance_type]) if instance_type else ONLY_FIRST
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="base-models/n/config.json", Body=json.dumps(llama_like).encode())
        with pytest.raises(InvalidInput, match="hyperparameters.attn_impl: flex is verified for mpt, llama models only"):
            preflight({"train_data": TRAIN, "base_model": f"s3://{BUCKET}/base-models/n/",
                       "hyperparameters": {"attn_impl": "flex"}} | ({"instance_type": instance_type} if instance_type else {}),
                      settings, s3=s3)


def test_staging_fails_before_reading_the_data_and_reports_the_estimate_when_it_goes_on():
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        s3.put_object(Bucket=BUCKET, Key="incoming/train.jsonl", Body=b"not json\n")  # invalid data: never read
        with pytest.raises(InsufficientGpuMemory):
            stage(Execution("run-1", DOOMED), ONLY_FIRST, s3)
        records = "".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(40))
        s3.put_object(Bucket=BUCKET, Key="incoming/train.jsonl", Body=records.encode())
        result = stage(Execution("run-1", {"train_data": TRAIN}), staging_settings(BUCKET), s3)
    assert result["preflight"]["instance_types"]["ml.p4d.24xlarge"] == {"peak_gib": 16.2, "budget_gib": 32.0, "fits": True,
                                                                        "attn_path": "flex"}
    json.dumps(result)  # Step Functions gets it as JSON


AUTO = {"train_data": TRAIN, "base_model": "mosaicml/mpt-7b", "hyperparameters": {"device_train_microbatch_size": "auto"}}


def _fits(instance: str, micro_batch: int, seq: int = 512) -> bool:
    return estimate_memory(Setup(KNOWN_MODELS["mpt-7b"], INSTANCE_TYPES[instance], seq, micro_batch, True, "flex")).fits


def test_auto_micro_batch_is_the_largest_that_fits_every_type_and_divides_their_rows():
    # p4d: 16 rows per GPU of the 128; the g5.12xlarge fallback (32 rows per GPU) holds no MPT-7B
    # on 4 A10Gs at any micro batch, so it does not limit the choice, but its rows must divide.
    settings = staging_settings(BUCKET, fallback_instance_types=["ml.g5.12xlarge"])
    request = check_input(AUTO, settings)
    report = check_memory(request, settings, *base_model_shape(None, BUCKET, request))
    expected = max(m for m in (1, 2, 4, 8, 16) if _fits("ml.p4d.24xlarge", m))
    assert not _fits("ml.g5.12xlarge", 1) and expected > 4  # more than the GPU default of 4
    assert report["micro_batch"] == expected
    assert report["instance_types"]["ml.p4d.24xlarge"]["fits"] is True
    assert staged_hyperparameters(request, report)["device_train_microbatch_size"] == str(expected)


def test_auto_micro_batch_can_turn_a_doomed_run_into_one_that_fits():
    # MPT-7B at 2048 tokens on 8 A10Gs: the GPU default of 4 rows is over the budget, 2 is not.
    run = AUTO | {"instance_type": "ml.g5.48xlarge",
                  "hyperparameters": {"device_train_microbatch_size": "auto", "max_seq_len": 2048}}
    assert not _fits("ml.g5.48xlarge", 4, seq=2048) and _fits("ml.g5.48xlarge", 2, seq=2048)
    report = preflight(run)
    assert report["micro_batch"] == 2 and report["instance_types"]["ml.g5.48xlarge"]["fits"] is True


def test_a_named_micro_batch_is_left_as_it_is():
    request = check_input(AUTO | {"hyperparameters": {"device_train_microbatch_size": 2}}, ONLY_FIRST)
    report = check_memory(request, ONLY_FIRST, *base_model_shape(None, BUCKET, request))
    assert report["micro_batch"] is None
    assert staged_hyperparameters(request, report) == request.hyperparameters


def test_the_sized_micro_batch_replaces_auto_in_place():
    """Only a run that says auto is sized, so the key is its own: the count SageMaker limits
    (here at its 100 with the base model) does not grow."""
    many = {f"callbacks.note{i}": "x" for i in range(98)} | {"device_train_microbatch_size": "auto"}
    request = check_input(AUTO | {"hyperparameters": many}, ONLY_FIRST)
    assert len(request.hyperparameters) == 100 and request.hyperparameters["device_train_microbatch_size"] == "auto"
    report = check_memory(request, ONLY_FIRST, *base_model_shape(None, BUCKET, request))
    staged = staged_hyperparameters(request, report)
    assert report["micro_batch"] and len(staged) == 100
    assert staged == request.hyperparameters | {"device_train_microbatch_size": str(report["micro_batch"])}


def test_staging_hands_the_job_the_sized_micro_batch():
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        records = "".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(40))
        s3.put_object(Bucket=BUCKET, Key="incoming/train.jsonl", Body=records.encode())
        result = stage(Execution("run-2", AUTO), staging_settings(BUCKET), s3)
    sized = result["preflight"]["micro_batch"]
    assert sized and result["hyperparameters"]["device_train_microbatch_size"] == str(sized)
