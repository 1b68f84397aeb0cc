"""Step 2 of the workflow: checks an execution's input in depth, validates its data and stages it.

The Lambda reads the training JSONL (and the test JSONL, or holds out every Nth record) once, as a
stream, through ``ftstack_train.validation`` -- the same check the training job and ``ftstack
validate`` run -- writing the staged files to /tmp as it goes. Only when all of it is valid does it
upload them, so a failed execution leaves nothing behind. It returns what the training job needs.

Errors for the user: ``InvalidInput`` (the execution input) and ``InvalidDataset`` (the data);
Step Functions reports the class name as the error and the message as the cause.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The asset is the repository root filtered to what this function needs (ASSET_PATHS); the
# training package sits under training_code/ there, as in the repository.
_TRAINING_CODE = Path(__file__).resolve().parents[2] / "training_code"
if str(_TRAINING_CODE) not in sys.path:
    sys.path.insert(0, str(_TRAINING_CODE))

from ftstack_train import validation  # noqa: E402
from ftstack_train.config import parse_config  # noqa: E402
from ftstack_train.contract import TEST_CHANNEL, TRAIN_CHANNEL  # noqa: E402
from ftstack_train.errors import ConfigError  # noqa: E402

from infra.layout import BASE_MODELS, INCOMING, checkpoint_prefix, model_prefix, staged_data_prefix  # noqa: E402

ASSET_PATHS = (
    "infra/__init__.py", "infra/layout.py", "infra/stage_data/",
    *(f"training_code/ftstack_train/{name}.py"
      for name in ("__init__", "validation", "config", "durations", "errors", "contract")),
)
"""Everything the function imports from the repository; the Lambda asset needs exactly these."""

MODEL_KEY = "model.pretrained_model_name_or_path"
MAX_JOB_NAME_PREFIX = 52
"""SageMaker job names are at most 63 characters; the workflow appends ``-a<attempt>``."""
MAX_HYPERPARAMETERS = 100
MAX_HYPERPARAMETER_CHARS = 2500
"""SageMaker's limits on a training job's hyperparameters."""
CHUNK_BYTES = 1 << 20

INPUT_KEYS = ("train_data", "test_data", "test_split", "base_model", "hyperparameters",
              "instance_type", "instance_count", "spot")
_INSTANCE = re.compile(r"^ml\.[a-z0-9]+\.[0-9]*x?large$")
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")
_JOB_PREFIX = re.compile(r"^[A-Za-z0-9](-?[A-Za-z0-9])*$")
_UTF8_BOM = b"\xef\xbb\xbf"
_MISSING = ("404", "NoSuchKey", "NotFound")


class InvalidInput(Exception):
    """The execution input is wrong; the message names the field and the fix."""


class InvalidDataset(Exception):
    """The data is not valid training data; the message lists the problems with their lines."""


@dataclass(frozen=True)
class Settings:
    """The deployment's defaults and limits, from the ``BUCKET`` and ``SETTINGS`` variables."""

    bucket: str
    job_prefix: str
    instance_type: str
    fallback_instance_types: tuple[str, ...]
    instance_count: int
    max_instance_count: int
    spot: bool
    base_model: str
    test_split: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Reads and checks the variables; a problem is the deployment's, so it is a RuntimeError."""
        def fail(message: str) -> RuntimeError:
            return RuntimeError(f"staging function environment: {message}; redeploy the stack")

        try:
            raw = json.loads(environ["SETTINGS"])
            settings = cls(bucket=environ["BUCKET"], fallback_instance_types=tuple(raw["fallback_instance_types"]),
                           **{k: raw[k] for k in ("job_prefix", "instance_type", "instance_count",
                                                   "max_instance_count", "spot", "base_model", "test_split")})
        except KeyError as exc:
            raise fail(f"{exc.args[0]} is not set") from None
        except (ValueError, TypeError) as exc:
            raise fail(f"SETTINGS is not the expected JSON object ({exc})") from None
        if not _JOB_PREFIX.match(settings.job_prefix) or len(settings.job_prefix) > MAX_JOB_NAME_PREFIX - 10:
            raise fail(f"job_prefix {settings.job_prefix!r} must be 1-42 letters, digits or single hyphens")
        return settings


@dataclass(frozen=True)
class Request:
    """A checked execution input, with the deployment's defaults filled in."""

    train_key: str
    test_key: str | None
    test_split: float
    base_model: str
    base_model_key: str | None
    hyperparameters: dict[str, str]
    instance_types: list[str]
    instance_count: int
    spot: bool


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
    bucket = settings.bucket
    _check_objects(s3, bucket, request)
    prefixes = {channel: staged_data_prefix(execution, channel) for channel in (TRAIN_CHANNEL, TEST_CHANNEL)}
    every = round(1 / request.test_split)
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
        _upload(s3, bucket, [(train.path, prefixes[TRAIN_CHANNEL] + "train.jsonl"),
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
        "checkpoint_uri": _uri(bucket, checkpoint_prefix(execution)),
    }


def job_name_prefix(job_prefix: str, execution: str) -> str:
    """``<job_prefix>-<execution>``, made a valid start of a SageMaker job name of at most 52 chars.

    Characters other than letters, digits and hyphens become hyphens (runs collapsed, none at the
    ends). When that changed the name or it had to be shortened, 8 hex digits of the execution
    name's SHA-256 are appended: two executions ``a_b`` and ``a.b`` must not get the same job names.
    """
    name = re.sub(r"[^A-Za-z0-9]+", "-", execution).strip("-")
    if name == execution and len(job_prefix) + 1 + len(name) <= MAX_JOB_NAME_PREFIX:
        return f"{job_prefix}-{name}"
    digest = hashlib.sha256(execution.encode("utf-8")).hexdigest()[:8]
    room = MAX_JOB_NAME_PREFIX - len(job_prefix) - len(digest) - 2
    return "-".join(part for part in (job_prefix, name[:room].rstrip("-"), digest) if part)


def check_input(data: Any, settings: Settings) -> Request:
    """Checks everything about the execution input that needs no S3 access; raises InvalidInput."""
    if not isinstance(data, Mapping):
        raise InvalidInput('the execution input must be a JSON object, e.g. {"train_data": '
                           f'"s3://{settings.bucket}/{INCOMING}train.jsonl"}}')
    unknown = sorted(set(data) - set(INPUT_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], INPUT_KEYS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"the keys are {', '.join(INPUT_KEYS)}"
        raise InvalidInput(f"{unknown[0]}: unknown key in the execution input; {hint}")
    if not isinstance(data.get("train_data"), str):
        raise InvalidInput(f"train_data is required: the s3:// URI of the training JSONL, uploaded under "
                           f"s3://{settings.bucket}/{INCOMING}")
    train_key = _data_key("train_data", data["train_data"], settings.bucket)
    test_key = None
    if "test_data" in data:
        if "test_split" in data:
            raise InvalidInput("test_split: give test_data or test_split, not both")
        test_key = _data_key("test_data", data["test_data"], settings.bucket)
        if test_key == train_key:
            raise InvalidInput("test_data: is the same file as train_data; give a separate test file, "
                               "or leave test_data out to hold out part of train_data")
    test_split = data.get("test_split", settings.test_split)
    if isinstance(test_split, bool) or not isinstance(test_split, (int, float)) or not 0 < test_split <= 0.5:
        raise InvalidInput(f"test_split: {test_split!r} is not a number above 0 and at most 0.5; e.g. 0.05 "
                           "holds out every 20th record")
    base_model, base_model_key = _base_model(data.get("base_model", settings.base_model), settings.bucket)
    return Request(
        train_key=train_key, test_key=test_key, test_split=test_split, base_model=base_model,
        base_model_key=base_model_key, hyperparameters=_hyperparameters(data.get("hyperparameters", {}), base_model),
        instance_types=_instance_types(data.get("instance_type", settings.instance_type), settings),
        instance_count=_instance_count(data.get("instance_count", settings.instance_count), settings),
        spot=_flag("spot", data.get("spot", settings.spot)),
    )


def split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Splits a byte stream into lines at ``\\n`` only, endings kept, as a file opened ``'rb'`` does.

    Not botocore's ``iter_lines``: it also splits at a lone ``\\r`` (which is JSON whitespace, so
    line numbers would differ from ``ftstack validate``'s) and holds a line of any length in memory.
    A line over ``validation.MAX_LINE_BYTES`` comes out as its start, carrying its full size, the
    way ``validation`` reads files, so that ``scan_lines`` reports it without holding all of it.
    """
    limit = validation.MAX_LINE_BYTES
    head, size = bytearray(), 0  # the unfinished line: its first limit + 1 bytes, its full length
    for chunk in chunks:
        start = 0
        while start < len(chunk):
            end = chunk.find(b"\n", start)
            stop = len(chunk) if end < 0 else end + 1
            if end >= 0 and not size and stop - start <= limit:
                yield chunk[start:stop]  # the common case: a whole line inside one chunk
            else:
                head += chunk[start:min(stop, start + max(0, limit + 1 - len(head)))]
                size += stop - start
                if end >= 0:
                    yield _finished(head, size, limit)
                    head, size = bytearray(), 0
            start = stop
    if size:
        yield _finished(head, size, limit)


def _finished(head: bytearray, size: int, limit: int) -> bytes:
    if size <= limit:
        return bytes(head)
    # validation's marker for an over-long line; scan_lines takes its size from it.
    line = validation._LongLine(head)
    line.size = size
    return line


def _execution_name(event: Mapping[str, Any]) -> str:
    execution = event.get("execution") if isinstance(event, Mapping) else None
    if not isinstance(execution, str) or not 0 < len(execution) <= 80 or "/" in execution or execution in (".", ".."):
        # Not the user's input: the state machine passes $$.Execution.Name.
        raise ValueError(f"event['execution'] must be the Step Functions execution name, got {execution!r}")
    return execution


def _data_key(field: str, value: Any, bucket: str) -> str:
    example = f"s3://{bucket}/{INCOMING}{'train' if field == 'train_data' else 'test'}.jsonl"
    if not isinstance(value, str):
        raise InvalidInput(f"{field}: must be an s3:// URI of a JSONL file under s3://{bucket}/{INCOMING}, e.g. {example}")
    got_bucket, key = _split_uri(value)
    if got_bucket != bucket or not key.startswith(INCOMING):
        raise InvalidInput(f"{field}: {value!r} is not under s3://{bucket}/{INCOMING}, the only place the "
                           f"workflow reads data from; upload the file there and give its URI, e.g. {example}")
    if key == INCOMING or key.endswith("/"):
        raise InvalidInput(f"{field}: {value!r} is a folder; give the URI of one JSONL file, e.g. {example}")
    return key


def _split_uri(value: str) -> tuple[str | None, str]:
    match = re.match(r"^s3://([^/]+)/(.*)$", value, re.DOTALL)
    return (match.group(1), match.group(2)) if match else (None, "")


def _base_model(value: Any, bucket: str) -> tuple[str, str | None]:
    """(name, key prefix in the bucket or None for a hub id)."""
    if isinstance(value, str) and value.startswith("s3://"):
        got_bucket, key = _split_uri(value)
        if got_bucket != bucket or not key.startswith(BASE_MODELS) or not key[len(BASE_MODELS):].strip("/"):
            raise InvalidInput(f"base_model: {value!r} is not a folder under s3://{bucket}/{BASE_MODELS}, where the "
                               f"training jobs read base models; copy the Hugging Face model directory to "
                               f"s3://{bucket}/{BASE_MODELS}<name>/ and give that URI")
        key = key.rstrip("/") + "/"
        return _uri(bucket, key), key
    if not isinstance(value, str) or not _HUB_ID.match(value) or "--" in value or ".." in value:
        raise InvalidInput(f"base_model: {value!r} is neither a Hugging Face hub id (e.g. mosaicml/mpt-7b) nor an "
                           f"s3:// URI of a model directory under s3://{bucket}/{BASE_MODELS}")
    return value, None


def _hyperparameters(value: Any, base_model: str) -> dict[str, str]:
    """The hyperparameters as the strings the job gets, checked by the job's own config parser."""
    if not isinstance(value, Mapping):
        raise InvalidInput('hyperparameters: must be an object of names to values, e.g. {"optimizer.lr": "1e-5"}')
    if MODEL_KEY in value:
        raise InvalidInput(f"hyperparameters.{MODEL_KEY}: use base_model to choose the base model")
    if len(value) >= MAX_HYPERPARAMETERS:
        raise InvalidInput(f"hyperparameters: {len(value)} given; SageMaker takes at most {MAX_HYPERPARAMETERS - 1} "
                           "besides the base model")
    texts = {}
    for key, item in value.items():
        if key.startswith("sagemaker_"):
            raise InvalidInput(f"hyperparameters.{key}: names starting with sagemaker_ are SageMaker's own; remove it")
        texts[key] = _hyperparameter_text(key, item)
    texts[MODEL_KEY] = base_model
    try:
        _, ignored = parse_config(hyperparameters=texts)
    except ConfigError as exc:
        raise InvalidInput(f"hyperparameters: {exc}") from None
    for warning in ignored:
        print(f"hyperparameters: {warning}")  # the job ignores them too; CloudWatch keeps the note
    return texts


def _hyperparameter_text(key: str, value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        text = repr(value)
    elif isinstance(value, list):
        text = json.dumps(value)
    else:
        raise InvalidInput(f"hyperparameters.{key}: {json.dumps(value)} is not a value; give a string, a number, "
                           "true/false or a list")
    if len(text) > MAX_HYPERPARAMETER_CHARS:
        raise InvalidInput(f"hyperparameters.{key}: {len(text)} characters, over SageMaker's limit of "
                           f"{MAX_HYPERPARAMETER_CHARS}; shorten it")
    return text


def _instance_types(value: Any, settings: Settings) -> list[str]:
    if not isinstance(value, str) or not _INSTANCE.match(value):
        raise InvalidInput(f"instance_type: {value!r} is not a SageMaker training instance type, e.g. ml.p4d.24xlarge")
    return list(dict.fromkeys((value, *settings.fallback_instance_types)))


def _instance_count(value: Any, settings: Settings) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= settings.max_instance_count:
        raise InvalidInput(f"instance_count: {value!r} is not a whole number from 1 to {settings.max_instance_count} "
                           "(the deployment's max_instance_count)")
    return value


def _flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{field}: {value!r} is not true or false")
    return value


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
        cursor = _Cursor(split_lines(body.iter_chunks(CHUNK_BYTES)))
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


def _upload(s3: Any, bucket: str, files: list[tuple[Path, str]]) -> None:
    """Uploads the staged files, KMS-encrypted with the bucket's key; on a failure removes the
    ones already uploaded, so that a failed execution has no staged data."""
    done = []
    try:
        for path, key in files:
            s3.upload_file(str(path), bucket, key,
                           ExtraArgs={"ServerSideEncryption": "aws:kms", "ContentType": "application/jsonlines"})
            done.append(key)
    except BaseException:
        for key in done:
            try:
                s3.delete_object(Bucket=bucket, Key=key)
            except Exception as exc:  # the upload's error is the one to report; note this one
                print(f"could not remove s3://{bucket}/{key} after a failed upload: {exc}")
        raise


def _uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"
