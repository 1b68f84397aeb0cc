"""The staging function's limits and its all-or-nothing writes (issue 11, item 8), against moto's S3:
data over ``MAX_DATA_BYTES`` is refused before any read; a run about to overrun the function's time
stops with a clear error and leaves nothing; an invocation that fails or is killed at any point of
its upload leaves nothing that a later step reads; staged objects are never replaced."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ftstack.infra.stage_data import handler as stage_data
from ftstack.infra.stage_data.handler import MAX_DATA_BYTES, Execution, InvalidDataset, InvalidInput, Settings
from ftstack.infra.stage_data import upload
from ftstack.infra.stage_data.upload import Deadline, StagingTimeout

from test_stage_data import BUCKET, SETTINGS, TEST, TRAIN, client, invoke, put, read, records, s3, written  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]
SCRATCH = re.compile(r"scratch/run-1/data/[0-9a-f]{32}/(train|test)/")


def settings() -> Settings:
    return Settings.from_env({"BUCKET": BUCKET, "SETTINGS": json.dumps(SETTINGS)})


def run(client, input_: dict, context=None) -> dict:
    """One invocation of the staging code for the execution run-1, with ``client`` as its S3."""
    return stage_data.stage(Execution("run-1", input_), settings(), client, Deadline.of(context))


def consumed(s3, result: dict) -> set[str]:
    """What the training job reads: every object under the two channel prefixes returned."""
    keys = set()
    for channel in ("train", "test"):
        prefix = result[channel]["s3_uri"].removeprefix(f"s3://{BUCKET}/")
        keys |= {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])}
    return keys


def pending_uploads(s3) -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])]


# --- the size limit ---------------------------------------------------------------------------

def test_data_over_the_limit_is_refused_before_any_read(s3, monkeypatch):
    monkeypatch.setattr(stage_data, "MAX_DATA_BYTES", 2000)
    put(s3, TRAIN, records(60))  # 2,000-odd bytes
    size = len(records(60))
    assert size > 2000
    reads = []
    s3.meta.events.register("before-call.s3.GetObject", lambda **_: reads.append(1), unique_id="count-reads")
    try:
        with pytest.raises(InvalidInput) as error:
            run(s3, {"train_data": TRAIN})
    finally:
        s3.meta.events.unregister("before-call.s3.GetObject", unique_id="count-reads")
    assert reads == []
    message = str(error.value)
    assert message.startswith(f"train_data {TRAIN}: {size:,} bytes of data, over staging's limit of 2,000 bytes")
    assert "15 minutes" in message and "use less data" in message and "Staging limits in the README" in message
    assert written(s3) == []


def test_the_limit_counts_train_and_test_data_together_and_names_both(s3, monkeypatch):
    monkeypatch.setattr(stage_data, "MAX_DATA_BYTES", len(records(40)) + len(records(2)))
    put(s3, TRAIN, records(40))
    put(s3, TEST, records(2))
    assert run(s3, {"train_data": TRAIN, "test_data": TEST})["train"]["records"] == 40  # at the limit: staged
    put(s3, TEST, records(3))
    with pytest.raises(InvalidInput, match=re.escape(
            f"train_data {TRAIN} ({len(records(40)):,} bytes) and test_data {TEST} ({len(records(3)):,} bytes): "
            f"{len(records(40)) + len(records(3)):,} bytes of data, over staging's limit")):
        run(s3, {"train_data": TRAIN, "test_data": TEST})


# --- the deadline ---------------------------------------------------------------------------------

class Context:
    """A Lambda context whose remaining time the test sets."""

    def __init__(self, seconds: float, after: int | None = None, then: float = 0.0) -> None:
        self.seconds, self.after, self.then, self.calls = seconds, after, then, 0

    def get_remaining_time_in_millis(self) -> int:
        self.calls += 1
        if self.after is not None and self.calls > self.after:
            self.seconds = self.then
        return int(self.seconds * 1000)


def test_a_run_that_would_overrun_the_functions_time_stops_and_leaves_nothing(s3, monkeypatch):
    monkeypatch.setattr(stage_data, "CHUNK_BYTES", 64)
    put(s3, TRAIN, records(40))
    context = Context(900, after=5, then=15)  # below the 20-s margin kept for ending cleanly
    with pytest.raises(StagingTimeout) as error:
        run(s3, {"train_data": TRAIN}, context)
    message = str(error.value)
    assert re.match(rf"train_data {TRAIN}: staging stopped at byte 320 of {len(records(40)):,} after \d+ s, to end "
                    "before the function's 15-minute limit; nothing was staged", message), message
    assert "use less data than the 320 bytes it got through" in message
    assert written(s3) == [] and pending_uploads(s3) == []  # and /tmp is empty (the fixture checks)


def test_reading_stops_early_enough_to_upload_what_it_staged(s3, monkeypatch):
    """The time kept grows with the data staged: 20 s, plus its upload at the assumed rate."""
    monkeypatch.setattr(stage_data, "CHUNK_BYTES", 64)
    monkeypatch.setattr(upload, "UPLOAD_BYTES_PER_S", 100)  # 500 staged bytes take 5 s more
    put(s3, TRAIN, records(40))
    with pytest.raises(StagingTimeout, match=r"stopped at byte (512|576) of"):
        run(s3, {"train_data": TRAIN}, Context(25))
    assert written(s3) == []


def test_running_out_of_time_while_uploading_aborts_the_upload(s3, monkeypatch):
    put(s3, TRAIN, records(40))
    context = Context(900)

    class SlowS3:
        """Time runs out once the first upload has begun."""

        def __getattr__(self, name):
            if name == "create_multipart_upload":
                context.seconds = 10
            return getattr(s3, name)

    with pytest.raises(StagingTimeout, match=r"ran out of time while uploading s3://\S+/train/train.jsonl"):
        run(SlowS3(), {"train_data": TRAIN}, context)
    assert written(s3) == [] and pending_uploads(s3) == []


def test_out_of_time_with_problems_found_reports_the_problems(s3, monkeypatch):
    monkeypatch.setattr(stage_data, "CHUNK_BYTES", 64)
    put(s3, TRAIN, records(3) + b"nope\n" + records(40))
    with pytest.raises(InvalidDataset) as error:
        run(s3, {"train_data": TRAIN}, Context(900, after=6, then=1))
    message = str(error.value)
    assert f"{TRAIN}:4: is not valid JSON" in message
    assert re.search(r"\(the check stopped at byte 384 of [\d,]+ after \d+ s, .*; the rest was not checked\)$", message)
    assert written(s3) == []


# --- all or nothing -------------------------------------------------------------------------------

class KilledAt:
    """An S3 client that dies at its ``nth`` call of ``operation``. What the bucket holds at that
    moment is all that a SIGKILL would leave (no except or finally runs after one), so it is
    recorded before the exception is raised."""

    def __init__(self, client, operation: str, nth: int, exception: BaseException) -> None:
        self.client, self.operation, self.nth, self.exception = client, operation, nth, exception
        self.calls, self.left = 0, None

    def __getattr__(self, name):
        method = getattr(self.client, name)
        if name != self.operation:
            return method

        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.nth:
                listed = self.client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
                self.left = {o["Key"]: o["ETag"] for o in listed if not o["Key"].startswith("incoming/")}
                raise self.exception
            return method(*args, **kwargs)
        return call


@pytest.mark.parametrize("operation, nth", [
    ("complete_multipart_upload", 2),  # between the two files: train is complete, test is not
    ("upload_part", 2),                # in the middle of the second file
    ("complete_multipart_upload", 1),  # before the first file is complete
])
@pytest.mark.parametrize("exception", [SystemExit(137), KeyboardInterrupt(), OSError("connection reset")],
                         ids=["killed", "interrupted", "failed"])
def test_an_invocation_stopped_during_its_upload_leaves_nothing_a_later_step_reads(s3, operation, nth, exception):
    put(s3, TRAIN, records(40))
    dying = KilledAt(s3, operation, nth, exception)
    with pytest.raises(type(exception)):
        run(dying, {"train_data": TRAIN})
    assert dying.left is not None, f"the upload made fewer than {nth} {operation} calls"
    # What it left lies in a folder of its own, which nothing refers to ...
    assert all(SCRATCH.match(key) for key in dying.left), dying.left
    # ... and the execution's next staging (a Step Functions retry) writes and returns another.
    result = run(s3, {"train_data": TRAIN})
    uris = result["train"]["s3_uri"], result["test"]["s3_uri"]
    assert not [key for key in dying.left if key.startswith(tuple(u.removeprefix(f"s3://{BUCKET}/") for u in uris))]
    assert consumed(s3, result) == {uris[0].removeprefix(f"s3://{BUCKET}/") + "train.jsonl",
                                    uris[1].removeprefix(f"s3://{BUCKET}/") + "test.jsonl"}
    assert read(s3, uris[0] + "train.jsonl") + read(s3, uris[1] + "test.jsonl") != b""
    if not isinstance(exception, SystemExit):  # a raised error aborts its upload (a kill leaves it to the lifecycle rule)
        assert pending_uploads(s3) == []


def test_a_file_of_several_parts_is_uploaded_in_parallel_and_in_order(s3, monkeypatch):
    monkeypatch.setattr(upload, "PART_BYTES", 5 * 1024 * 1024)  # S3's smallest part
    data = b"".join(json.dumps({"prompt": f"question {i} " + "x" * 900, "response": f"answer {i}"}).encode() + b"\n"
                    for i in range(12_000))  # 11 MB: three parts
    put(s3, TRAIN, data)
    result = run(s3, {"train_data": TRAIN})
    staged = read(s3, result["train"]["s3_uri"] + "train.jsonl")
    assert staged == b"".join(line + b"\n" for i, line in enumerate(data.splitlines(), 1) if i % 20)
    key = result["train"]["s3_uri"].removeprefix(f"s3://{BUCKET}/") + "train.jsonl"
    assert s3.head_object(Bucket=BUCKET, Key=key)["ETag"].endswith('-3"')  # S3's mark of a 3-part object


def test_staged_objects_are_never_replaced(s3, monkeypatch):
    """Two invocations given the same folder (which the random attempt id rules out): the second
    is refused by S3's conditional write, and the first one's files stay as they were."""
    monkeypatch.setattr(stage_data, "_attempt_id", lambda: "0" * 32)
    put(s3, TRAIN, records(40))
    first = run(s3, {"train_data": TRAIN})
    before = {key: s3.head_object(Bucket=BUCKET, Key=key)["ETag"] for key in written(s3)}
    put(s3, TRAIN, records(40, start=1000))
    with pytest.raises(RuntimeError, match=r"scratch/run-1/data/0{32}/train/train.jsonl already exists; staging never "
                                           "replaces an object"):
        run(s3, {"train_data": TRAIN})
    assert {key: s3.head_object(Bucket=BUCKET, Key=key)["ETag"] for key in written(s3)} == before
    assert read(s3, first["train"]["s3_uri"] + "train.jsonl").startswith(records(1))
    assert pending_uploads(s3) == []


KILLED_WHILE_READING = """
import json, os, signal, sys
sys.path.insert(0, {root!r})
import boto3
from moto import mock_aws
from ftstack.infra.stage_data import handler

class Context:
    calls = 0
    def get_remaining_time_in_millis(self):
        Context.calls += 1
        if Context.calls == 5:  # in the middle of reading: the Lambda is killed (a timeout, an out-of-memory)
            os.kill(os.getpid(), signal.SIGKILL)
        return 900_000

handler.CHUNK_BYTES = 64
with mock_aws():
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket={bucket!r})
    s3.put_bucket_versioning(Bucket={bucket!r}, VersioningConfiguration={{"Status": "Enabled"}})
    s3.put_object(Bucket={bucket!r}, Key="incoming/train.jsonl", Body={data!r})
    handler.stage(handler.Execution("run-1", {{"train_data": {train!r}}}),
                  handler.Settings.from_env(os.environ), s3, handler.Deadline.of(Context()))
"""


def test_what_a_killed_invocation_left_in_tmp_is_removed_by_the_next(s3, tmp_path):
    """/tmp outlives a Lambda timeout; a killed invocation's copy of the data would otherwise sit
    there, and a few of them fill the function's ephemeral storage."""
    lambda_tmp = tmp_path / "lambda-tmp"  # the fixture's temporary directory, checked empty at the end
    script = KILLED_WHILE_READING.format(root=str(ROOT), bucket=BUCKET, data=records(40), train=TRAIN)
    env = os.environ | {"TMPDIR": str(lambda_tmp), "BUCKET": BUCKET, "SETTINGS": json.dumps(SETTINGS)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    (left,) = lambda_tmp.iterdir()
    assert left.name.startswith("ftstack-stage-") and (left / "train.jsonl").is_file()
    put(s3, TRAIN, records(40))
    result = invoke({"train_data": TRAIN})  # the next invocation, on the same /tmp
    assert result["train"]["records"] == 38
    assert not left.exists()


def test_the_readme_states_the_limit_in_the_code():
    text = (ROOT / "README.md").read_text()
    limits = text[text.index("**Staging limits.**"):].split("\n\n", 1)[0]
    found = re.search(r"at most \*\*([\d.]+) GB\*\* \(([\d,]+) bytes\)", limits)
    assert found, "README.md: no 'at most **N GB** (N bytes)' in the staging limits"
    assert int(found[2].replace(",", "")) == MAX_DATA_BYTES == int(float(found[1]) * 1e9)
