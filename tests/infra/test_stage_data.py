"""The data-staging Lambda against moto's S3: what it stages and returns, every input and data error
it reports (and that it then writes nothing), streaming, and that its asset imports on its own."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import botocore.response
import pytest
from moto import mock_aws

ROOT = Path(__file__).resolve().parents[2]

from ftstack_train import validation  # noqa: E402
from ftstack_train.config import parse_config  # noqa: E402

from ftstack.infra.stage_data import handler as stage_data  # noqa: E402
from ftstack.infra.stage_data.handler import InvalidDataset, InvalidInput, job_name_prefix  # noqa: E402
from ftstack.infra.assets import lambda_code  # noqa: E402
from ftstack.infra.stage_data.request import training_jobs  # noqa: E402
from ftstack.infra.stage_data.stop_jobs import HANDLER as STOP_JOBS_HANDLER  # noqa: E402
from staging_samples import staging_values  # noqa: E402

BUCKET = "ftstack-data-bucket"
SETTINGS = staging_values()
TRAIN = f"s3://{BUCKET}/incoming/train.jsonl"
TEST = f"s3://{BUCKET}/incoming/test.jsonl"
STATE_MACHINE = "Test-workflow"
STATE_MACHINE_ARN = f"arn:aws:states:us-east-1:123456789012:stateMachine:{STATE_MACHINE}"
WAITING = json.dumps({"StartAt": "Wait", "States": {"Wait": {"Type": "Pass", "End": True}}})
ROLE = "arn:aws:iam::123456789012:role/ftstack-WorkflowRole"
SAGEMAKER_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


def record(i: int) -> bytes:
    return json.dumps({"prompt": f"question {i}", "response": f"answer {i}"}).encode() + b"\n"


def records(n: int, start: int = 1) -> bytes:
    return b"".join(record(i) for i in range(start, start + n))


@pytest.fixture(scope="module")
def client():
    """One client for the module: each mock_aws() start replaces boto3's default session, and a
    client made from a new session takes ~0.2 s to load its service model."""
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                    region_name="us-east-1")
    return session.client("s3")


@functools.cache
def sfn_client():
    """Made once, as ``client`` is; moto serves it whichever mock is running."""
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                    region_name="us-east-1")
    return session.client("stepfunctions")


@pytest.fixture
def s3(client, monkeypatch, tmp_path):
    """moto's S3 with the stack's bucket, moto's Step Functions with the stack's state machine
    (whose executions stay RUNNING), the function's environment, and /tmp watched."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "BUCKET": BUCKET, "SETTINGS": json.dumps(SETTINGS),
                        "STATE_MACHINE_ARN": STATE_MACHINE_ARN}.items():
        monkeypatch.setenv(name, value)
    scratch = tmp_path / "lambda-tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    with mock_aws():
        client.create_bucket(Bucket=BUCKET)
        client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        assert sfn_client().create_state_machine(name=STATE_MACHINE, definition=WAITING, roleArn=ROLE)["stateMachineArn"] \
            == STATE_MACHINE_ARN
        yield client
    assert list(scratch.iterdir()) == [], "temporary files were left behind"


def start(input_: object, execution: str = "run-1", state_machine: str = STATE_MACHINE_ARN) -> str:
    """Starts an execution (moto's stay RUNNING) and returns its ARN."""
    return sfn_client().start_execution(stateMachineArn=state_machine, name=execution, input=json.dumps(input_))["executionArn"]


def put(s3, uri: str, data: bytes) -> None:
    s3.put_object(Bucket=BUCKET, Key=uri.removeprefix(f"s3://{BUCKET}/"), Body=data)


def read(s3, uri: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=uri.removeprefix(f"s3://{BUCKET}/"))["Body"].read()


def written(s3) -> list[str]:
    """Every key outside incoming/: what the function wrote."""
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    return sorted(k for k in keys if not k.startswith("incoming/"))


def invoke(input_: object, execution: str = "run-1") -> dict:
    """Starts an execution with ``input_`` and invokes the function as its state machine does."""
    return stage_data.handler({"execution_arn": start(input_, execution)}, None)


def staged(s3, result: dict, channel: str) -> bytes:
    return read(s3, result[channel]["s3_uri"] + f"{channel}.jsonl")


# --- staging ---------------------------------------------------------------------------------

def test_default_split_holds_out_every_20th_record(s3):
    put(s3, TRAIN, records(45))
    result = invoke({"train_data": TRAIN})
    json.dumps(result)  # Step Functions gets it as JSON

    assert staged(s3, result, "test") == record(20) + record(40)
    assert staged(s3, result, "train") == b"".join(record(i) for i in range(1, 46) if i % 20)
    for channel, count in (("train", 43), ("test", 2)):
        data = staged(s3, result, channel)
        assert result[channel]["records"] == count
        assert result[channel]["bytes"] == len(data)
        assert result[channel]["sha256"] == hashlib.sha256(data).hexdigest()
    assert result["dataset_sha256"] == result["train"]["sha256"]
    assert result["test"]["source"] == "split"
    # A folder of this invocation's own under the execution's, one channel folder each.
    attempt = re.fullmatch(f"s3://{BUCKET}/scratch/run-1/data/([0-9a-f]{{32}})/train/", result["train"]["s3_uri"])[1]
    assert result["test"]["s3_uri"] == f"s3://{BUCKET}/scratch/run-1/data/{attempt}/test/"
    assert written(s3) == [f"scratch/run-1/data/{attempt}/test/test.jsonl", f"scratch/run-1/data/{attempt}/train/train.jsonl"]
    for key in written(s3):
        head = s3.head_object(Bucket=BUCKET, Key=key)
        # With the stack's key: "aws:kms" alone would mean the account's aws/s3 key.
        assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", SETTINGS["key_arn"])

    assert result["hyperparameters"] == {"model.pretrained_model_name_or_path": "mosaicml/mpt-7b"}
    assert result["base_model"] == {"name": "mosaicml/mpt-7b", "s3_uri": ""}
    assert result["instance_types"] == ["ml.p4d.24xlarge", "ml.g5.48xlarge"]
    assert (result["instance_count"], result["spot"]) == (1, False)
    assert result["job_name_prefix"] == "ftstack--run-1-" + hashlib.sha256(b"run-1").hexdigest()[:8]
    assert result["output_uri"] == f"s3://{BUCKET}/executions/run-1/model/"
    assert result["output_prefix"] == "executions/run-1/model/"
    assert result["checkpoint_uri"] == f"s3://{BUCKET}/scratch/run-1/checkpoints/"


@pytest.mark.parametrize("split, every", [(0.25, 4), (0.3, 3), (0.5, 2), (0.1, 10)])
def test_explicit_test_split(s3, split, every):
    put(s3, TRAIN, records(12))
    result = invoke({"train_data": TRAIN, "test_split": split})
    assert staged(s3, result, "test") == b"".join(record(i) for i in range(1, 13) if i % every == 0)
    assert staged(s3, result, "train") == b"".join(record(i) for i in range(1, 13) if i % every)
    assert result["test"]["records"] == 12 // every


def test_test_data_is_staged_as_given(s3):
    put(s3, TRAIN, records(3))
    put(s3, TEST, records(2, start=100))
    result = invoke({"train_data": TRAIN, "test_data": TEST})
    assert staged(s3, result, "train") == records(3)
    assert staged(s3, result, "test") == records(2, start=100)
    assert result["test"]["source"] == "test_data"
    assert (result["train"]["records"], result["test"]["records"]) == (3, 2)
    assert result["test"]["sha256"] == hashlib.sha256(records(2, start=100)).hexdigest()


def test_bom_crlf_and_blank_lines_are_handled_as_validation_does(s3):
    one, two, three = (json.dumps({"prompt": f"p{i}", "response": f"r{i}"}).encode() for i in (1, 2, 3))
    # A lone \r is JSON whitespace, not a line end: the record on line 5 is one line, as in a file.
    four = b'{"prompt": "p4",\r "response": "r4"}'
    data = b"\xef\xbb\xbf" + one + b"\r\n" + b"\r\n" + b"   \n" + two + b"\n" + four + b"\n\n" + three
    assert validation.validate_stream(io.BytesIO(data), "x").records == 4
    put(s3, TRAIN, data)
    put(s3, TEST, records(1))
    result = invoke({"train_data": TRAIN, "test_data": TEST})
    assert staged(s3, result, "train") == one + b"\r\n" + two + b"\n" + four + b"\n" + three + b"\n"
    assert result["train"]["records"] == 4


def test_hyperparameters_are_strings_the_job_parses_back(s3):
    put(s3, TRAIN, records(20))
    hyperparameters = {"optimizer.lr": 1e-5, "max_seq_len": 256, "packing": False, "eval_first": True,
                       "optimizer.betas": [0.9, 0.95], "max_duration": "1ep", "dist_timeout": 60.5}
    result = invoke({"train_data": TRAIN, "hyperparameters": hyperparameters, "base_model": "tiny-mpt"})
    assert result["hyperparameters"] == {
        "optimizer.lr": "1e-05", "max_seq_len": "256", "packing": "false", "eval_first": "true",
        "optimizer.betas": "[0.9, 0.95]", "max_duration": "1ep", "dist_timeout": "60.5",
        "model.pretrained_model_name_or_path": "tiny-mpt",
    }
    cfg, _ = parse_config(hyperparameters=result["hyperparameters"])
    assert (cfg.lr, cfg.max_seq_len, cfg.packing, cfg.betas, cfg.model) == (1e-5, 256, False, (0.9, 0.95), "tiny-mpt")


def test_base_model_in_the_bucket(s3):
    put(s3, TRAIN, records(20))
    put(s3, f"s3://{BUCKET}/base-models/mpt-7b/config.json", b"{}")
    result = invoke({"train_data": TRAIN, "base_model": f"s3://{BUCKET}/base-models/mpt-7b"})
    uri = f"s3://{BUCKET}/base-models/mpt-7b/"
    assert result["base_model"] == {"name": uri, "s3_uri": uri}
    assert result["hyperparameters"]["model.pretrained_model_name_or_path"] == uri


@pytest.mark.parametrize("settings, input_, expected", [
    ({}, {"instance_type": "ml.g5.48xlarge"}, ["ml.g5.48xlarge"]),
    ({}, {"instance_type": "ml.p5.48xlarge"}, ["ml.p5.48xlarge", "ml.g5.48xlarge"]),
    ({"fallback_instance_types": ["ml.g5.48xlarge", "ml.g5.48xlarge", "ml.p4d.24xlarge"]}, {},
     ["ml.p4d.24xlarge", "ml.g5.48xlarge"]),
    ({"fallback_instance_types": []}, {}, ["ml.p4d.24xlarge"]),
])
def test_instance_types_requested_first_then_fallbacks_once(s3, monkeypatch, settings, input_, expected):
    monkeypatch.setenv("SETTINGS", json.dumps(SETTINGS | settings))
    put(s3, TRAIN, records(20))
    result = invoke({"train_data": TRAIN, "instance_count": 4, "spot": True, **input_})
    assert result["instance_types"] == expected
    assert (result["instance_count"], result["spot"]) == (4, True)


@pytest.mark.parametrize(("input_", "says"), [
    ({}, "base_model: 'mosaicml/mpt-7b' is a hub id, which a training job without network cannot download"),
    ({"base_model": f"s3://{BUCKET}/base-models/mpt/", "hyperparameters": {"tokenizer.name": "EleutherAI/gpt-neox-20b"}},
     "hyperparameters.tokenizer.name: 'EleutherAI/gpt-neox-20b' would be downloaded from the hub"),
])
def test_network_isolation_refuses_what_would_come_from_the_hub(s3, monkeypatch, input_, says):
    monkeypatch.setenv("SETTINGS", json.dumps(SETTINGS | {"offline": True}))
    put(s3, TRAIN, records(20))
    put(s3, f"s3://{BUCKET}/base-models/mpt/config.json", b"{}")
    with pytest.raises(stage_data.InvalidInput, match=re.escape(says)):
        invoke({"train_data": TRAIN, **input_})
    assert [k for k in written(s3) if k.startswith("scratch/")] == []


def test_network_isolation_takes_a_model_in_the_bucket_with_its_own_tokenizer(s3, monkeypatch):
    monkeypatch.setenv("SETTINGS", json.dumps(SETTINGS | {"offline": True}))
    put(s3, TRAIN, records(20))
    put(s3, f"s3://{BUCKET}/base-models/mpt/config.json", b"{}")
    result = invoke({"train_data": TRAIN, "base_model": f"s3://{BUCKET}/base-models/mpt/"})
    assert result["base_model"]["s3_uri"] == f"s3://{BUCKET}/base-models/mpt/"


def test_hyperparameters_together_stay_far_below_the_state_payload_limit(s3):
    put(s3, TRAIN, records(20))
    many = {f"extra.key{i}": "x" * 2400 for i in range(14)}  # each value under SageMaker's 2,500
    with pytest.raises(stage_data.InvalidInput, match=r"hyperparameters: 33,\d{3} characters in all, over the workflow's limit of 32,768"):
        invoke({"train_data": TRAIN, "hyperparameters": many})


def test_resume_from_continues_in_the_earlier_executions_checkpoints(s3):
    put(s3, TRAIN, records(20))
    put(s3, f"s3://{BUCKET}/scratch/run-0/checkpoints/step-00000010/ftstack-complete.json", b"{}")
    result = invoke({"train_data": TRAIN, "resume_from": "run-0"}, execution="run-1")
    assert result["checkpoint_uri"] == f"s3://{BUCKET}/scratch/run-0/checkpoints/"
    assert result["output_uri"] == f"s3://{BUCKET}/executions/run-1/model/"


@pytest.mark.parametrize(("value", "says"), [
    ("run-0", "resume_from: execution 'run-0' left no checkpoints"),
    ("../x", "resume_from: '../x' is not an execution name"),
    (7, "resume_from: 7 is not an execution name"),
])
def test_resume_from_must_name_an_execution_with_checkpoints(s3, value, says):
    put(s3, TRAIN, records(20))
    with pytest.raises(stage_data.InvalidInput, match=re.escape(says)):
        invoke({"train_data": TRAIN, "resume_from": value})
    assert [k for k in written(s3) if k.startswith("scratch/")] == []


# --- job names -------------------------------------------------------------------------------

@pytest.mark.parametrize("execution", [
    "run-1", "my_run.2026-11-29", "a" * 80, "x-" * 40, "___", "--a--", "训练-run", "a" * 44, "a" * 45,
    "0123456789" * 8, "(weird)+name=@1",
])
@pytest.mark.parametrize("job_prefix", ["ftstack", "f", "a" * 42])
def test_job_name_prefix_is_a_valid_job_name_start(job_prefix, execution):
    prefix = job_name_prefix(job_prefix, execution)
    assert len(prefix) <= 52
    assert prefix.startswith(job_prefix + "-")
    assert SAGEMAKER_JOB_NAME.match(prefix + "-a12")
    assert job_name_prefix(job_prefix, execution) == prefix


def test_job_name_prefix_keeps_the_name_readable_and_tells_executions_apart():
    assert job_name_prefix("ftstack", "run-1") == "ftstack--run-1-" + hashlib.sha256(b"run-1").hexdigest()[:8]
    assert len(job_name_prefix("ftstack", "a" * 80)) == 52
    assert re.fullmatch(r"ftstack--my-run-2026-[0-9a-f]{8}", job_name_prefix("ftstack", "my_run.2026"))
    assert len({job_name_prefix("ftstack", name) for name in ("a-b", "a_b", "a.b", "a--b")}) == 4
    long = "experiment-" * 7
    assert job_name_prefix("ftstack", long + "1") != job_name_prefix("ftstack", long + "2")


def test_an_execution_named_like_anothers_job_names_gets_its_own():
    # Issue 11, item 7: "alice_run" became ftstack-alice-run-603ae7d3, and so did the execution
    # literally named "alice-run-603ae7d3".
    taken = job_name_prefix("ftstack", "alice_run")
    impostor = taken.removeprefix("ftstack--")
    assert job_name_prefix("ftstack", impostor) != taken


@pytest.mark.parametrize("execution", ["run1", "dev-run", "x" * 80, "__"])
def test_a_stacks_iam_resource_matches_its_own_jobs_only(execution):
    # Issue 11, item 5: training-job/ftstack-* also matched every job of a stack named ftstack-dev.
    for mine, other in (("ftstack", "ftstack-dev"), ("ftstack-dev", "ftstack")):
        job = job_name_prefix(mine, execution) + "-a0"
        assert fnmatch.fnmatchcase(job, training_jobs(mine))
        assert not fnmatch.fnmatchcase(job, training_jobs(other))


# --- input errors ----------------------------------------------------------------------------

OTHER = "s3://another-bucket/incoming/train.jsonl"
INPUT_ERRORS = [
    ({"train_data": None}, "train_data is required"),
    ({"train_data": 5}, "train_data is required"),
    ({"train_data": OTHER}, f"is not under s3://{BUCKET}/incoming/"),
    ({"train_data": f"s3://{BUCKET}/data/train.jsonl"}, f"train_data: 's3://{BUCKET}/data/train.jsonl' is not under"),
    ({"train_data": "train.jsonl"}, "train_data: 'train.jsonl' is not under"),
    ({"train_data": f"s3://{BUCKET}/incoming/"}, "train_data: " + repr(f"s3://{BUCKET}/incoming/") + " is a folder"),
    ({"test_data": OTHER}, "test_data: 's3://another-bucket"),
    ({"test_data": 3}, "test_data: must be an s3:// URI"),
    ({"test_data": TRAIN}, "test_data: is the same file as train_data"),
    ({"test_data": TEST, "test_split": 0.1}, "test_split: give test_data or test_split, not both"),
    ({"test_split": 0}, "test_split: 0 is not a number above 0"),
    ({"test_split": 0.6}, "test_split: 0.6"),
    ({"test_split": -0.1}, "test_split: -0.1"),
    ({"test_split": "0.1"}, "test_split: '0.1'"),
    ({"test_split": True}, "test_split: True"),
    ({"base_model": "not a hub id!"}, "base_model: 'not a hub id!' is neither a Hugging Face hub id"),
    ({"base_model": "/opt/ml/model"}, "base_model: '/opt/ml/model'"),
    ({"base_model": 7}, "base_model: 7"),
    ({"base_model": "s3://another-bucket/base-models/mpt/"},
     f"base_model: 's3://another-bucket/base-models/mpt/' is not a folder under s3://{BUCKET}/base-models/"),
    ({"base_model": f"s3://{BUCKET}/models/mpt/"}, f"base_model: 's3://{BUCKET}/models/mpt/' is not a folder under"),
    ({"base_model": f"s3://{BUCKET}/base-models/"}, "is not a folder under"),
    ({"base_model": f"s3://{BUCKET}/"}, "is not a folder under"),
    ({"hyperparameters": "optimizer.lr=1e-5"}, "hyperparameters: must be an object"),
    ({"hyperparameters": [1]}, "hyperparameters: must be an object"),
    ({"hyperparameters": {"optimizer.lr": "fast"}}, "optimizer.lr (hyperparameter): 'fast' is not a number"),
    ({"hyperparameters": {"optimizer.lrr": 1}}, "did you mean 'optimizer.lr'?"),
    ({"hyperparameters": {"max_seq_len": 4}}, "max_seq_len: 4 is too small"),
    ({"hyperparameters": {"max_seq_len": None}}, "hyperparameters.max_seq_len: null is not a value"),
    ({"hyperparameters": {"run_name": {"a": 1}}}, "hyperparameters.run_name:"),
    ({"hyperparameters": {"run_name": "x" * 2501}}, "over SageMaker's limit"),
    ({"hyperparameters": {"model.pretrained_model_name_or_path": "gpt2"}}, "use base_model"),
    ({"hyperparameters": {"sagemaker_program": "train.py"}}, "hyperparameters.sagemaker_program:"),
    ({"instance_type": "p4d.24xlarge"}, "instance_type: 'p4d.24xlarge' is not a SageMaker"),
    ({"instance_type": "ml.p4d"}, "instance_type: 'ml.p4d'"),
    ({"instance_type": 5}, "instance_type: 5"),
    ({"instance_count": 0}, "instance_count: 0 is not a whole number from 1 to 4"),
    ({"instance_count": 5}, "instance_count: 5"),
    ({"instance_count": True}, "instance_count: True"),
    ({"instance_count": 1.5}, "instance_count: 1.5"),
    ({"instance_count": "2"}, "instance_count: '2'"),
    ({"spot": "yes"}, "spot: 'yes' is not true or false"),
    ({"spot": 1}, "spot: 1"),
    ({"train": TRAIN}, "train: unknown key in the execution input; did you mean 'train_data'?"),
    ({"epochs": 3}, "epochs: unknown key"),
    ({"train_data": f"s3://{BUCKET}/incoming/missing.jsonl"},
     f"train_data: s3://{BUCKET}/incoming/missing.jsonl: the file does not exist"),
    ({"test_data": f"s3://{BUCKET}/incoming/Test.jsonl"}, f"test_data: s3://{BUCKET}/incoming/Test.jsonl: the file does not"),
    ({"base_model": f"s3://{BUCKET}/base-models/empty"}, f"base_model: s3://{BUCKET}/base-models/empty/: has no config.json"),
]


@pytest.mark.parametrize("input_, says", INPUT_ERRORS, ids=[says[:40] for _, says in INPUT_ERRORS])
def test_invalid_input_names_the_field_and_writes_nothing(s3, input_, says):
    put(s3, TRAIN, records(40))
    put(s3, TEST, records(2))
    with pytest.raises(InvalidInput) as error:
        invoke({"train_data": TRAIN} | input_)
    assert says in str(error.value)
    assert type(error.value).__name__ == "InvalidInput"  # what Step Functions reports as the error
    assert written(s3) == []


@pytest.mark.parametrize("input_", [None, [], "s3://x", 3])
def test_input_that_is_not_an_object(s3, input_):
    with pytest.raises(InvalidInput, match="the execution input must be a JSON object"):
        invoke(input_)


def test_missing_train_data(s3):
    with pytest.raises(InvalidInput, match=f"train_data is required.*under s3://{BUCKET}/incoming/"):
        invoke({"test_split": 0.1})


# --- data errors -----------------------------------------------------------------------------

GOOD = record(1)
DATA_ERRORS = [
    (GOOD + GOOD + b'{"prompt": "p", "response": \n', ["incoming/train.jsonl:3: is not valid JSON"]),
    (GOOD + b'{"prompt": "p"}\n', ["incoming/train.jsonl:2: field 'response': is missing"]),
    (GOOD + GOOD + b"\n" + b'{"prompt": "  ", "response": "r"}\n', ["incoming/train.jsonl:4: field 'prompt': is empty"]),
    (b'[{"prompt": "p", "response": "r"}]\n', ["incoming/train.jsonl:1: the file is a JSON array"]),
    (b'\n[\n  {"prompt": "p", "response": "r"}\n]\n', ["incoming/train.jsonl:2: the file is a JSON array"]),
    (GOOD + b'{"prompt": "caf\xe9", "response": "r"}\n', ["incoming/train.jsonl:2: is not valid UTF-8"]),
    (b"\xff\xfe{\x00", ["incoming/train.jsonl:1: the file is UTF-16"]),
    (b"", ["incoming/train.jsonl: has no records"]),
    (b"\n \r\n\n", ["incoming/train.jsonl: has no records"]),
    (GOOD + b"[1]\n" + GOOD + b'"text"\n', ["train.jsonl:2: is an array", "train.jsonl:4: is a string"]),
    (GOOD * 25 + b"{\n" * 22, ["train.jsonl:26: is not valid JSON", "train.jsonl:45: is not valid JSON", "... and 2 more problems"]),
]


@pytest.mark.parametrize("data, says", DATA_ERRORS, ids=[says[0][:40] for _, says in DATA_ERRORS])
def test_invalid_dataset_lists_problems_with_lines_and_writes_nothing(s3, data, says):
    put(s3, TRAIN, data)
    with pytest.raises(InvalidDataset) as error:
        invoke({"train_data": TRAIN, "test_split": 0.5})
    message = str(error.value)
    assert message.startswith(f"train_data {TRAIN}: not valid training data")
    for text in says:
        assert text in message
    assert f"s3://{BUCKET}/incoming/train.jsonl:" in message or "has no records" in message
    assert type(error.value).__name__ == "InvalidDataset"
    assert written(s3) == []


def test_problems_in_both_files_are_reported_together(s3):
    put(s3, TRAIN, GOOD + b"{}\n")
    put(s3, TEST, b"nope\n")
    with pytest.raises(InvalidDataset) as error:
        invoke({"train_data": TRAIN, "test_data": TEST})
    message = str(error.value)
    assert message.startswith(f"train_data {TRAIN} and test_data {TEST}: not valid training data")
    assert f"{TRAIN}:2: field 'prompt': is missing" in message
    assert f"{TEST}:1: is not valid JSON" in message
    assert written(s3) == []


def test_bad_test_data_alone(s3):
    put(s3, TRAIN, records(3))
    put(s3, TEST, GOOD + b'{"prompt": "p", "response": 3}\n')
    with pytest.raises(InvalidDataset, match=f"^test_data {TEST}: (.|\n)*{TEST}:2: field 'response': is a number"):
        invoke({"train_data": TRAIN, "test_data": TEST})
    assert written(s3) == []


@pytest.mark.parametrize("count, split, says", [
    (19, None, "train_data s3://.*: 19 records are too few to hold out every 20th as test data \\(test_split 0.05\\)"),
    (1, 0.5, "1 records are too few to hold out every 2th"),
    (9, 0.1, "9 records are too few"),
])
def test_too_few_records_to_split(s3, count, split, says):
    put(s3, TRAIN, records(count))
    with pytest.raises(InvalidDataset, match=says):
        invoke({"train_data": TRAIN} | ({} if split is None else {"test_split": split}))
    assert written(s3) == []


def test_over_long_line_is_reported_with_its_size_and_later_lines_keep_their_numbers(s3, monkeypatch):
    monkeypatch.setattr(validation, "MAX_LINE_BYTES", 64)
    long = json.dumps({"prompt": "p" * 100, "response": "r"}).encode() + b"\n"
    put(s3, TRAIN, GOOD + long + b"oops\n")
    with pytest.raises(InvalidDataset) as error:
        invoke({"train_data": TRAIN, "test_split": 0.5})
    assert f"train.jsonl:2: is {len(long)} bytes, over the 64-byte limit" in str(error.value)
    assert "train.jsonl:3: is not valid JSON" in str(error.value)


# --- streaming, failures, environment ----------------------------------------------------------

def test_objects_are_streamed_in_chunks_never_read_whole(s3, monkeypatch):
    sizes = []
    original = botocore.response.StreamingBody.read

    def read_in_chunks_only(self, amt=None):
        if amt is None:
            raise AssertionError("the handler read a whole object into memory")
        sizes.append(amt)
        return original(self, amt)

    monkeypatch.setattr(stage_data, "CHUNK_BYTES", 7)
    put(s3, TRAIN, records(40))
    put(s3, TEST, records(3))
    monkeypatch.setattr(botocore.response.StreamingBody, "read", read_in_chunks_only)
    result = invoke({"train_data": TRAIN, "test_data": TEST})
    monkeypatch.undo()
    assert len(sizes) >= len(records(40)) // 7 and set(sizes) == {7}
    assert staged(s3, result, "train") == records(40)


@pytest.mark.parametrize("env, says", [
    ({"SETTINGS": None}, "SETTINGS is not set"),
    ({"BUCKET": None}, "BUCKET is not set"),
    ({"SETTINGS": "{"}, "SETTINGS is not the expected JSON object"),
    ({"SETTINGS": json.dumps({k: v for k, v in SETTINGS.items() if k != "test_split"})}, "test_split is not set"),
    ({"SETTINGS": json.dumps(SETTINGS | {"job_prefix": "a" * 43})}, "job_prefix"),
])
def test_a_broken_deployment_is_not_blamed_on_the_input(s3, monkeypatch, env, says):
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=says):
        invoke({"train_data": TRAIN})


def test_the_asset_imports_on_its_own_without_yaml_or_torch(tmp_path):
    """Checks an input in the Lambda asset, as it is assembled (ASSET_MODULES), with yaml, torch
    and transformers unimportable (of the operator package, the asset holds only the estimator
    and its tables: anything else it imported from there would fail). Both handlers import."""
    asset = tmp_path / "asset"
    shutil.copytree(lambda_code(stage_data.ASSET_MODULES), asset)
    script = f"""
import json, sys
for name in ("yaml", "torch", "transformers", "boto3"):
    sys.modules[name] = None
sys.path.insert(0, {str(asset)!r})
from ftstack.infra.stage_data import handler
import importlib
for name in ({stage_data.HANDLER!r}, {STOP_JOBS_HANDLER!r}):
    module, function = name.rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), function)), name
settings = handler.Settings.from_env({{"BUCKET": "b", "SETTINGS": {json.dumps(SETTINGS)!r}}})
request = handler.check_input({{"train_data": "s3://b/incoming/t.jsonl", "hyperparameters": {{"optimizer.lr": 1e-4}}}}, settings)
memory = handler.check_memory(request, settings, *handler.base_model_shape(None, "b", request))
print(json.dumps({{"hp": request.hyperparameters, "fits": memory["instance_types"]["ml.p4d.24xlarge"]["fits"], "files": sorted(m.__file__ for n, m in sys.modules.items()
      if m is not None and n.split(".")[0] in ("ftstack_train", "ftstack") and getattr(m, "__file__", None))}}))
"""
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["hp"]["optimizer.lr"] == "0.0001"
    assert out["fits"] is True  # the memory estimate runs in the asset too
    assert any(f.endswith("ftstack/estimate.py") for f in out["files"])
    assert out["files"] and all(f.startswith(str(asset)) for f in out["files"])


def test_a_pipeline_in_a_folder_of_a_shared_bucket_stages_only_within_it(s3, monkeypatch):
    """With a prefix (FineTuningPipelineProps.prefix), the function reads data and base models
    from the pipeline's folder only, and writes its channels and names its output there."""
    monkeypatch.setenv("SETTINGS", json.dumps(SETTINGS | {"prefix": "team-a/"}))
    mine, theirs = f"s3://{BUCKET}/team-a/incoming/train.jsonl", f"s3://{BUCKET}/team-b/incoming/train.jsonl"
    put(s3, mine, records(40))
    put(s3, theirs, records(40))
    put(s3, f"s3://{BUCKET}/team-b/base-models/mpt/config.json", b"{}")
    result = invoke({"train_data": mine})
    for channel in ("train", "test"):
        assert result[channel]["s3_uri"].startswith(f"s3://{BUCKET}/team-a/scratch/run-1/data/")
    assert result["output_uri"] == f"s3://{BUCKET}/team-a/executions/run-1/model/"
    assert result["checkpoint_uri"] == f"s3://{BUCKET}/team-a/scratch/run-1/checkpoints/"
    assert all(k.startswith("team-") for k in written(s3))
    for attempt, (input_, says) in enumerate((({"train_data": theirs}, f"is not under s3://{BUCKET}/team-a/incoming/"),
                         ({"train_data": TRAIN}, f"is not under s3://{BUCKET}/team-a/incoming/"),
                         ({"train_data": mine, "base_model": f"s3://{BUCKET}/team-b/base-models/mpt/"},
                          f"is not a folder under s3://{BUCKET}/team-a/base-models/")), start=2):
        with pytest.raises(stage_data.InvalidInput, match=re.escape(says)):
            invoke(input_, execution=f"run-{attempt}")
