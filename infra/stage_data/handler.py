"""Step 2 of the workflow: checks an execution's input in depth, validates its data and stages it.

This module holds the Lambda entry and the S3 side; the checks of the execution input that need no
S3 (``check_input``, ``Settings``, ``InvalidInput``, ...) are in ``request``, re-exported here.

The Lambda reads the training JSONL (and the test JSONL, or holds out every Nth record) once, as a
stream, through ``ftstack_train.validation`` -- the same check the training job and ``ftstack
validate`` run -- writing the staged files to /tmp as it goes. Only when all of it is valid does it
upload them, to a folder of its own (``scratch/<execution>/data/<attempt>/``), and only the URIs it
returns are used: an invocation that fails, runs out of time or is killed leaves at most an
unreferenced folder, which expires with ``scratch/``. It returns what the training job needs.

Data over ``MAX_DATA_BYTES`` is refused before anything is read; a slower run stops before the
function's time is up (``StagingTimeout``) instead of being killed.

The execution comes from Step Functions, not from the event (``execution``): the state machine
passes its execution's ARN, and the function stages only a running execution of its own state
machine, with the name and input Step Functions gives for it.

Errors for the user: ``InvalidInput`` (the execution input), ``InvalidDataset`` (the data),
``InsufficientGpuMemory`` (the run's memory estimate fits no instance type it may use; ``preflight``)
and ``StagingTimeout``; Step Functions reports the class name as the error and the message as the cause.
``ExecutionRefused``: the function was invoked for something else than a running execution of its
workflow.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ftstack_train import validation
from ftstack_train.contract import TEST_CHANNEL, TRAIN_CHANNEL, hold_out_every


# Re-exported: infra and the tests import the input checks from this module too.
from .request import (  # noqa: F401
    INPUT_KEYS, MAX_HYPERPARAMETER_CHARS, MAX_HYPERPARAMETERS, MAX_JOB_NAME_PREFIX, MODEL_KEY, InvalidInput, Request,
    Settings, _uri, check_input, check_sagemaker_fields, is_execution_name, job_name_prefix,
)
from .execution import STATE_MACHINE_VARIABLE, Execution, ExecutionRefused, running_execution  # noqa: F401
from .preflight import InsufficientGpuMemory, base_model_shape, check_memory, staged_hyperparameters  # noqa: F401
from .upload import Deadline, StagingTimeout, upload_new

ASSET_MODULES = (
    "ftstack.instances", "ftstack.estimate", "ftstack.model_shapes",
    "ftstack.infra.layout", "ftstack.infra.instances", "ftstack.infra.stage_data",
    *(f"ftstack_train.{name}" for name in ("validation", "config", "references", "sources", "durations", "errors", "contract")),
)
"""Every module the functions import from ftstack (a package stands for all its own modules); the
Lambda asset holds exactly these (``ftstack.infra.assets``)."""
HANDLER = "ftstack.infra.stage_data.handler.handler"
"""The staging function's handler, by its path in that asset."""

CHUNK_BYTES = 1 << 20
MAX_DATA_BYTES = 4_000_000_000
"""The most data (train_data and test_data together, 4 GB) one execution stages: what one vCPU checks
and copies within the function's time at half the speed ``bench/staging.py`` measured for the
shortest records (about 20 MB/s), with the upload's time kept, and a margin of nearly 2 on top.
Larger data is refused before it is read."""
FUNCTION_TIMEOUT_S = 900
"""The function's timeout (Lambda's most), which the limit above is sized for."""
_WORK_PREFIX = "ftstack-stage-"
_MISSING = ("404", "NoSuchKey", "NotFound")
_FORBIDDEN = ("403", "AccessDenied", "Forbidden")
"""What HeadObject answers for a missing key when the caller's s3:ListBucket does not cover the
request (S3 API reference, HeadObject: "If you don't have the s3:ListBucket permission, Amazon S3
returns an HTTP status code 403"): the function may list only under its prefixes, so a 403 may
mean missing as well as unreadable."""


class InvalidDataset(Exception):
    """The data is not valid training data; the message lists the problems with their lines."""


class UnversionedBucket(Exception):
    """The bucket keeps no object versions, so the trained model could not be pinned and registered
    (``ftstack.s3_model``): said before any GPU time is spent."""


def handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """Lambda entry point: ``{"execution_arn": $$.Execution.Id}`` -> what was staged."""
    _remove_stale_work()
    settings = Settings.from_env(os.environ)
    if not os.environ.get(STATE_MACHINE_VARIABLE):
        raise RuntimeError(f"staging function environment: {STATE_MACHINE_VARIABLE} is not set; redeploy the stack")
    execution = running_execution(event, _client("stepfunctions"), os.environ[STATE_MACHINE_VARIABLE])
    return stage(execution, settings, _client("s3"), Deadline.of(context))


def _remove_stale_work() -> None:
    """Removes what a killed invocation left in /tmp: an environment runs one invocation at a
    time, and /tmp outlives a timeout, so a folder left there would fill the disk for the next."""
    for path in Path(tempfile.gettempdir()).glob(_WORK_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)


@functools.cache
def _client(service: str) -> Any:
    """One client per service and Lambda environment, reused by warm invocations."""
    import boto3  # here, so that infra code can import this module's helpers without it

    return boto3.client(service)


def stage(run: Execution, settings: Settings, s3: Any, deadline: Deadline | None = None) -> dict[str, Any]:
    """Checks the input and the data of a running execution, and only when all is valid uploads
    the staged files, to a new folder of this invocation's."""
    deadline = deadline or Deadline()
    execution = _execution_name(run)
    request = check_input(run.input, settings)
    check_sagemaker_fields(execution, request)
    bucket = settings.bucket
    size = _check_objects(s3, settings, request)
    # Before the data is read: a run that fits no instance type fails in seconds, not minutes.
    preflight = check_memory(request, settings, *base_model_shape(s3, bucket, request))
    _check_versioning(s3, bucket)
    attempt = _attempt_id()  # a new folder per invocation: a retry never writes where another did
    prefixes = {channel: settings.layout.staged_data_prefix(execution, attempt, channel) for channel in (TRAIN_CHANNEL, TEST_CHANNEL)}
    every = hold_out_every(request.test_split)
    with tempfile.TemporaryDirectory(prefix=_WORK_PREFIX) as tmp:
        train, test = _StagedFile(Path(tmp) / "train.jsonl"), _StagedFile(Path(tmp) / "test.jsonl")
        reading = _Reading(bucket, deadline, size, _Problems(), (train, test))
        try:
            if request.test_key is None:
                _copy_records(s3, request.train_key, "train_data", reading, train, hold_out=(test, every))
            else:
                _copy_records(s3, request.train_key, "train_data", reading, train)
                _copy_records(s3, request.test_key, "test_data", reading, test)
        finally:
            train.close()
            test.close()
        if reading.problems.total:
            raise InvalidDataset(reading.problems.message())
        if not test.records or not train.records:
            raise InvalidDataset(
                f"train_data {_uri(bucket, request.train_key)}: {train.records + test.records} records are too few "
                f"to hold out every {every}th as test data (test_split {request.test_split}); give test_data, a "
                f"larger test_split, or at least {every} records")
        extra = {"ContentType": "application/jsonlines"}
        if settings.key_arn:  # else the bucket's default encryption (a brought bucket without a key of ours)
            extra |= {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": settings.key_arn}
        for staged, channel in ((train, TRAIN_CHANNEL), (test, TEST_CHANNEL)):
            upload_new(s3, bucket, prefixes[channel] + staged.path.name, staged.path, extra, deadline)
    return {
        "train": train.summary(_uri(bucket, prefixes[TRAIN_CHANNEL])),
        "test": {**test.summary(_uri(bucket, prefixes[TEST_CHANNEL])),
                 "source": "split" if request.test_key is None else "test_data"},
        "dataset_sha256": train.sha256,
        "hyperparameters": staged_hyperparameters(request, preflight),
        # The serving container's maximum length (the registered vLLM environment).
        "max_seq_len": request.config.max_seq_len,
        "base_model": {"name": request.base_model,
                       "s3_uri": "" if request.base_model_key is None else _uri(bucket, request.base_model_key)},
        "instance_types": request.instance_types,
        "instance_count": request.instance_count,
        "spot": request.spot,
        "job_name_prefix": job_name_prefix(settings.job_prefix, execution),
        "output_uri": _uri(bucket, settings.layout.model_prefix(execution)),
        "output_prefix": settings.layout.model_prefix(execution),
        "checkpoint_uri": _uri(bucket, settings.layout.checkpoint_prefix(request.resume_from or execution)),
        "preflight": preflight,
    }


def _check_versioning(s3: Any, bucket: str) -> None:
    """The stack's own bucket keeps versions; a brought one may not, and the model check after
    training would then refuse to register the model: fail now, before the job is paid for."""
    status = s3.get_bucket_versioning(Bucket=bucket).get("Status")
    if status != "Enabled":
        raise UnversionedBucket(
            f"bucket {bucket}: versioning is {status or 'off'}, and ftstack registers a model only from a bucket that "
            "keeps object versions (they pin the model against later overwrites): turn on versioning for the bucket "
            "(S3 console, Properties, Bucket Versioning), then start the run again")


def _attempt_id() -> str:
    """A name for this invocation's folder, unique among all invocations'."""
    return uuid.uuid4().hex


def _execution_name(run: Execution) -> str:
    if not is_execution_name(run.name):  # Step Functions allows "." and "..", which cannot name a folder
        raise InvalidInput(f"the execution name {run.name!r} cannot name the run's folders; start the execution "
                           "again with a name of letters, digits, - and _")
    return run.name


def _check_objects(s3: Any, settings: Settings, request: Request) -> int:
    """Fails fast on a missing file or model, and on data over the limit or more than /tmp holds;
    returns the data's size."""
    from botocore.exceptions import ClientError

    bucket = settings.bucket
    checks = [("train_data", request.train_key, "the file does not exist; upload it there, or check the URI "
                                                "(keys are case-sensitive)")]
    if request.test_key is not None:
        checks.append(("test_data", request.test_key, checks[0][2]))
    if request.base_model_key is not None:
        checks.append(("base_model", request.base_model_key + "config.json",
                       "has no config.json; give the folder of a Hugging Face model directory (config.json, "
                       "tokenizer and weights)"))
    if request.resume_from is not None:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=settings.layout.checkpoint_prefix(request.resume_from), MaxKeys=1)
        if not listed.get("KeyCount"):
            raise InvalidInput(f"resume_from: execution {request.resume_from!r} left no checkpoints in "
                               f"{_uri(bucket, settings.layout.checkpoint_prefix(request.resume_from))} (none was saved, or they "
                               "expired); start without resume_from")
    sizes = {}
    for field, key, fix in checks:
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            where = _uri(bucket, request.base_model_key if field == "base_model" else key)
            if code in _MISSING:
                raise InvalidInput(f"{field}: {where}: {fix}") from None
            if code in _FORBIDDEN:
                raise InvalidInput(f"{field}: {where}: S3 refused it (403): it does not exist, or it is encrypted with "
                                   "a KMS key other than the stack's; upload it again with the bucket's default "
                                   "encryption, or check the URI (keys are case-sensitive)") from None
            raise
        if field != "base_model":
            sizes[f"{field} {_uri(bucket, key)}"] = head["ContentLength"]
    size = sum(sizes.values())
    if size > MAX_DATA_BYTES:
        files = " and ".join(f"{name} ({n:,} bytes)" for name, n in sizes.items()) if len(sizes) > 1 else next(iter(sizes))
        raise InvalidInput(
            f"{files}: {size:,} bytes of data, over staging's limit of {MAX_DATA_BYTES:,} bytes (what the staging "
            f"function can check and copy in its {FUNCTION_TIMEOUT_S // 60} minutes, short records included); "
            "use less data, e.g. a sample of it (see Staging limits in the README)")
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if size + 2 > free:  # the staged copies are at most one newline each longer than the input
        raise InvalidInput(f"train_data: the data ({size:,} bytes) is larger than the staging function's "
                           f"temporary storage ({free:,} bytes free); raise its ephemeral storage or use less data")
    return size


class _StagedFile:
    """A staged file being written to /tmp, counting and hashing what goes in.

    The copy loop appends lines to ``pending``; ``flush`` writes them, hashes and counts them in
    one go, so that a record costs a list append rather than a write and a hash update of its own.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.records, self.bytes = path, 0, 0
        self.pending: list[bytes] = []
        self._hash = hashlib.sha256()
        self._file = path.open("wb")

    def flush(self) -> None:
        if not self.pending:
            return
        if not self.pending[-1].endswith(b"\n"):  # only a file's last line can lack its ending
            self.pending[-1] += b"\n"
        data = b"".join(self.pending)
        self._file.write(data)
        self._hash.update(data)
        self.records += len(self.pending)
        self.bytes += len(data)
        self.pending.clear()

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


class _Reading:
    """What the reads of one invocation share: the problems found, the files being staged, and
    the deadline, checked at every chunk so that staging ends with time left to upload."""

    def __init__(self, bucket: str, deadline: Deadline, size: int, problems: _Problems,
                 files: tuple[_StagedFile, ...]) -> None:
        self.bucket, self.deadline, self.size, self.problems, self.files = bucket, deadline, size, problems, files
        self.read = 0

    def chunks(self, body: Any, field: str, uri: str) -> Iterator[bytes]:
        """The object's chunks; between two, the lines of the last one are all copied: written
        out here, then the time checked."""
        for chunk in body.iter_chunks(CHUNK_BYTES):
            for staged in self.files:
                staged.flush()
            self._check_time(field, uri)
            self.read += len(chunk)
            yield chunk

    def _check_time(self, field: str, uri: str) -> None:
        staged = sum(f.bytes for f in self.files)
        left = self.deadline.seconds_left()
        if left >= self.deadline.upload_reserve(staged):
            return
        where = f"stopped at byte {self.read:,} of {self.size:,} after {self.deadline.elapsed():.0f} s, to end before the " \
                f"function's {FUNCTION_TIMEOUT_S // 60}-minute limit"
        if self.problems.total:  # what was found is worth more than the timeout
            raise InvalidDataset(f"{self.problems.message()}\n(the check {where}; the rest was not checked)")
        raise StagingTimeout(
            f"{field} {uri}: staging {where}; nothing was staged. Reading went slower than staging's limit "
            f"({MAX_DATA_BYTES:,} bytes) allows for (very short records or blank lines, or a slow S3): use less "
            f"data than the {self.read:,} bytes it got through (see Staging limits in the README)")


def _copy_records(s3: Any, key: str, field: str, reading: _Reading, into: _StagedFile,
                  hold_out: tuple[_StagedFile, int] | None = None) -> None:
    """Streams one object through the validator, copying its records ``into`` a staged file, or
    with ``hold_out = (file, n)`` every n-th record into that file instead.

    After a problem nothing more is written (nothing will be uploaded), but the scan goes on so
    the message lists the problems of the whole file.
    """
    uri = _uri(reading.bucket, key)
    body = s3.get_object(Bucket=reading.bucket, Key=key)["Body"]
    kept, (held, every) = into.pending, (hold_out[0].pending, hold_out[1]) if hold_out else ([], 0)
    problems, problem, records = reading.problems, validation.Problem, 0
    try:
        lines = validation.split_chunks(reading.chunks(body, field, uri))
        for item in validation.scan_lines(lines, uri, copy=True):
            if item.__class__ is problem:
                problems.add(field, uri, item)
            elif not problems.total:
                records += 1
                (held if every and records % every == 0 else kept).append(item)
        for staged in reading.files:
            staged.flush()  # the last lines, after the last chunk
    finally:
        body.close()
