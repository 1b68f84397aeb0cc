"""Step 2 of the workflow: checks an execution's input in depth, validates its data and stages it.

This module holds the Lambda entry and the S3 side; the checks of the execution input that need no
S3 (``check_input``, ``Settings``, ``InvalidInput``, ...) are in ``request``, re-exported here.

The Lambda reads the training JSONL (and the test JSONL, or holds out every Nth record) once, as a
stream, through ``ftstack_train.validation`` -- the same check the training job and ``ftstack
validate`` run -- writing the staged files to /tmp as it goes. Only when all of it is valid does it
upload them, so a failed execution leaves nothing behind. It returns what the training job needs.

Errors for the user: ``InvalidInput`` (the execution input) and ``InvalidDataset`` (the data);
Step Functions reports the class name as the error and the message as the cause.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

# The asset is the repository root filtered to what this function needs (ASSET_PATHS); the
# training package sits under training_code/ there, as in the repository.
_TRAINING_CODE = Path(__file__).resolve().parents[2] / "training_code"
if str(_TRAINING_CODE) not in sys.path:
    sys.path.insert(0, str(_TRAINING_CODE))

from ftstack_train import validation  # noqa: E402
from ftstack_train.contract import TEST_CHANNEL, TRAIN_CHANNEL, hold_out_every  # noqa: E402

from infra.layout import checkpoint_prefix, model_prefix, staged_data_prefix  # noqa: E402

# Re-exported: infra and the tests import the input checks from this module too.
from .request import (  # noqa: E402, F401
    INPUT_KEYS, MAX_HYPERPARAMETER_CHARS, MAX_HYPERPARAMETERS, MAX_JOB_NAME_PREFIX, MODEL_KEY, InvalidInput, Request,
    Settings, _uri, check_input, check_sagemaker_fields, is_execution_name, job_name_prefix,
)

ASSET_PATHS = (
    "infra/__init__.py", "infra/layout.py", "infra/instances.py", "infra/stage_data/",
    *(f"training_code/ftstack_train/{name}.py"
      for name in ("__init__", "validation", "config", "durations", "errors", "contract")),
)
"""Everything the function imports from the repository; the Lambda asset needs exactly these."""

CHUNK_BYTES = 1 << 20
_UTF8_BOM = b"\xef\xbb\xbf"
_MISSING = ("404", "NoSuchKey", "NotFound")


class InvalidDataset(Exception):
    """The data is not valid training data; the message lists the problems with their lines."""


def handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """Lambda entry point: ``{"execution": name, "input": execution input}`` -> what was staged."""
    return stage(event, Settings.from_env(os.environ), _s3_client())


@functools.cache
def _s3_client() -> Any:
    """One client per Lambda environment, reused by warm invocations."""
    import boto3  # here, so that infra code can import this module's helpers without it

    return boto3.client("s3")


def stage(event: Mapping[str, Any], settings: Settings, s3: Any) -> dict[str, Any]:
    """Checks the input and the data, and only when all is valid uploads the staged files."""
    execution = _execution_name(event)
    request = check_input(event.get("input"), settings)
    check_sagemaker_fields(execution, request)
    bucket = settings.bucket
    _check_objects(s3, bucket, request)
    prefixes = {channel: staged_data_prefix(execution, channel) for channel in (TRAIN_CHANNEL, TEST_CHANNEL)}
    every = hold_out_every(request.test_split)
    with tempfile.TemporaryDirectory(prefix="ftstack-stage-") as tmp:
        train, test = _StagedFile(Path(tmp) / "train.jsonl"), _StagedFile(Path(tmp) / "test.jsonl")
        problems = _Problems()
        try:
            if request.test_key is None:
                _copy_records(s3, bucket, request.train_key, "train_data", problems,
                              lambda n: test if n % every == 0 else train)
            else:
                _copy_records(s3, bucket, request.train_key, "train_data", problems, lambda n: train)
                _copy_records(s3, bucket, request.test_key, "test_data", problems, lambda n: test)
        finally:
            train.close()
            test.close()
        if problems.total:
            raise InvalidDataset(problems.message())
        if not test.records or not train.records:
            raise InvalidDataset(
                f"train_data {_uri(bucket, request.train_key)}: {train.records + test.records} records are too few "
                f"to hold out every {every}th as test data (test_split {request.test_split}); give test_data, a "
                f"larger test_split, or at least {every} records")
        _upload(s3, bucket, settings.key_arn, [(train.path, prefixes[TRAIN_CHANNEL] + "train.jsonl"),
                             (test.path, prefixes[TEST_CHANNEL] + "test.jsonl")])
    return {
        "train": train.summary(_uri(bucket, prefixes[TRAIN_CHANNEL])),
        "test": {**test.summary(_uri(bucket, prefixes[TEST_CHANNEL])),
                 "source": "split" if request.test_key is None else "test_data"},
        "dataset_sha256": train.sha256,
        "hyperparameters": request.hyperparameters,
        "base_model": {"name": request.base_model,
                       "s3_uri": "" if request.base_model_key is None else _uri(bucket, request.base_model_key)},
        "instance_types": request.instance_types,
        "instance_count": request.instance_count,
        "spot": request.spot,
        "job_name_prefix": job_name_prefix(settings.job_prefix, execution),
        "output_uri": _uri(bucket, model_prefix(execution)),
        "output_prefix": model_prefix(execution),
        "checkpoint_uri": _uri(bucket, checkpoint_prefix(request.resume_from or execution)),
    }


def _execution_name(event: Mapping[str, Any]) -> str:
    execution = event.get("execution") if isinstance(event, Mapping) else None
    if not is_execution_name(execution):
        # Not the user's input: the state machine passes $$.Execution.Name.
        raise ValueError(f"event['execution'] must be the Step Functions execution name, got {execution!r}")
    return execution


def _check_objects(s3: Any, bucket: str, request: Request) -> None:
    """Fails fast on a missing file or model, and on data that /tmp cannot hold."""
    from botocore.exceptions import ClientError

    checks = [("train_data", request.train_key, "the file does not exist; upload it there, or check the URI "
                                                "(keys are case-sensitive)")]
    if request.test_key is not None:
        checks.append(("test_data", request.test_key, checks[0][2]))
    if request.base_model_key is not None:
        checks.append(("base_model", request.base_model_key + "config.json",
                       "has no config.json; give the folder of a Hugging Face model directory (config.json, "
                       "tokenizer and weights)"))
    if request.resume_from is not None:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=checkpoint_prefix(request.resume_from), MaxKeys=1)
        if not listed.get("KeyCount"):
            raise InvalidInput(f"resume_from: execution {request.resume_from!r} left no checkpoints in "
                               f"{_uri(bucket, checkpoint_prefix(request.resume_from))} (none was saved, or they "
                               "expired); start without resume_from")
    size = 0
    for field, key, fix in checks:
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                where = _uri(bucket, request.base_model_key if field == "base_model" else key)
                raise InvalidInput(f"{field}: {where}: {fix}") from None
            raise
        size += head["ContentLength"] if field != "base_model" else 0
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if size + 2 > free:  # the staged copies are at most one newline each longer than the input
        raise InvalidInput(f"train_data: the data ({size:,} bytes) is larger than the staging function's "
                           f"temporary storage ({free:,} bytes free); raise its ephemeral storage or use less data")


class _StagedFile:
    """A staged file being written to /tmp, counting and hashing what goes in."""

    def __init__(self, path: Path) -> None:
        self.path, self.records, self.bytes = path, 0, 0
        self._hash = hashlib.sha256()
        self._file = path.open("wb")

    def write(self, line: bytes) -> None:
        if not line.endswith(b"\n"):
            line += b"\n"
        self._file.write(line)
        self._hash.update(line)
        self.records += 1
        self.bytes += len(line)

    def close(self) -> None:
        self._file.close()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def summary(self, s3_uri: str) -> dict[str, Any]:
        return {"s3_uri": s3_uri, "records": self.records, "bytes": self.bytes, "sha256": self.sha256}


class _Problems:
    """The problems of every file read, the first MAX_LISTED kept, all counted."""

    def __init__(self) -> None:
        self.kept: list[validation.Problem] = []
        self.total = 0
        self.fields: dict[str, str] = {}

    def add(self, field: str, uri: str, problem: validation.Problem) -> None:
        self.total += 1
        self.fields[field] = uri
        if len(self.kept) < validation.MAX_LISTED:
            self.kept.append(problem)

    def message(self) -> str:
        what = " and ".join(f"{field} {uri}" for field, uri in self.fields.items())
        return (f"{what}: not valid training data; fix the lines below (check a file locally with "
                f"`ftstack validate FILE`) and start a new execution:\n{validation.DataError(self.kept, self.total)}")


class _Cursor:
    """Passes lines through, remembering the last one and its number."""

    def __init__(self, lines: Iterable[bytes]) -> None:
        self._lines, self.line, self.number = lines, b"", 0

    def __iter__(self) -> Iterator[bytes]:
        for line in self._lines:
            self.line, self.number = line, self.number + 1
            yield line


def _copy_records(s3: Any, bucket: str, key: str, field: str, problems: _Problems,
                  route: Callable[[int], _StagedFile]) -> None:
    """Streams one object through the validator, writing its n-th record to ``route(n)``.

    After a problem nothing more is written (nothing will be uploaded), but the scan goes on so
    the message lists the problems of the whole file.
    """
    uri = _uri(bucket, key)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        cursor = _Cursor(validation.split_chunks(body.iter_chunks(CHUNK_BYTES)))
        records = 0
        for item in validation.scan_lines(cursor, uri):
            if isinstance(item, validation.Problem):
                problems.add(field, uri, item)
            elif not problems.total:
                # scan_lines pulls a line and yields its result before pulling the next one.
                assert item.line == cursor.number, (item.line, cursor.number)
                records += 1
                line = cursor.line.removeprefix(_UTF8_BOM) if item.line == 1 else cursor.line
                route(records).write(line)
    finally:
        body.close()


def _upload(s3: Any, bucket: str, key_arn: str, files: list[tuple[Path, str]]) -> None:
    """Uploads the staged files, encrypted with the stack's key (``aws:kms`` without a key id
    would mean the account's ``aws/s3`` key); on a failure removes the ones already uploaded, so
    that a failed execution has no staged data."""
    done = []
    try:
        for path, key in files:
            s3.upload_file(str(path), bucket, key, ExtraArgs={
                "ServerSideEncryption": "aws:kms", "SSEKMSKeyId": key_arn, "ContentType": "application/jsonlines"})
            done.append(key)
    except BaseException:
        for key in done:
            try:
                s3.delete_object(Bucket=bucket, Key=key)
            except Exception as exc:  # the upload's error is the one to report; note this one
                print(f"could not remove s3://{bucket}/{key} after a failed upload: {exc}")
        raise
