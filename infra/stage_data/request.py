"""The checks of a staging execution's input that need no S3 access.

``check_input`` turns the execution input into a ``Request``, with the deployment's defaults
(``Settings``, from the function's environment) filled in, or raises ``InvalidInput`` naming the
field and the fix. The hyperparameters are checked by the training job's own config parser.
``job_name_prefix`` makes the start of the training jobs' names. The S3 side is in ``handler``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ftstack_train.config import MODEL_KEY, TOKENIZER_KEY, TrainConfig, batch_split, parse_config
from ftstack_train.contract import is_hub_id
from ftstack_train.errors import ConfigError

from ..layout import BASE_MODELS, Layout
from .fields import (
    DESCRIPTION, HYPERPARAMETER_KEY, HYPERPARAMETER_VALUE, LINE_TERMINATORS, METADATA_VALUE, MODEL_PACKAGE_DESCRIPTION,
    S3_URI, TAG_VALUE, Field,
)
from ..instances import INSTANCE_TYPE, gpus

MAX_JOB_NAME_PREFIX = 52
"""SageMaker job names are at most 63 characters; the workflow appends ``ATTEMPT_SUFFIX<attempt>``."""
MAX_HYPERPARAMETERS = 100
MAX_HYPERPARAMETER_CHARS = 2500
"""SageMaker's limits on a training job's hyperparameters."""
MAX_HYPERPARAMETER_TOTAL = 32 * 1024
"""The workflow's own limit on all hyperparameters together (names and values): they travel in the
execution's state, and twice once the ended job is described, under Step Functions' 256 KB
payload limit (States.DataLimitExceeded cannot be caught)."""

INPUT_KEYS = ("train_data", "test_data", "test_split", "base_model", "hyperparameters",
              "instance_type", "instance_count", "spot", "resume_from", "force")
_EXECUTION_NAME = re.compile(r"^[^\s/<>{}\[\]?*\"#%\\^|~`$&,;:]{1,80}$")
"""What Step Functions allows in an execution name."""
ATTEMPT_SUFFIX = "-a"
"""The workflow names attempt N of an execution's job ``<job_name_prefix>-a<N>``."""


def is_execution_name(value: Any) -> bool:
    """Whether ``value`` can be a Step Functions execution name (and, here, a key part: not . or ..)."""
    return isinstance(value, str) and bool(_EXECUTION_NAME.match(value)) and value not in (".", "..")
_JOB_PREFIX = re.compile(r"^[A-Za-z0-9](-?[A-Za-z0-9])*$")


class InvalidInput(Exception):
    """The execution input is wrong; the message names the field and the fix."""


@dataclass(frozen=True)
class Settings:
    """The deployment's defaults and limits, from the ``BUCKET`` and ``SETTINGS`` variables."""

    bucket: str
    job_prefix: str
    instance_type: str
    fallback_instance_types: tuple[str, ...]
    allowed_instance_types: tuple[str, ...]
    """Every instance type an execution may ask for (the workflow's role may start no other)."""
    instance_count: int
    max_instance_count: int
    spot: bool
    base_model: str
    test_split: float
    key_arn: str
    """The bucket's KMS key: staged data is encrypted with it, not with the account's aws/s3 key;
    empty for a brought bucket without one, whose default encryption then applies."""
    offline: bool
    """Training jobs cannot reach the hub (network isolation, or a VPC without a route out): a hub
    base model is refused here, before any instance starts."""
    prefix: str = ""
    """The pipeline's key prefix in the bucket (``infra.layout``)."""

    def __post_init__(self) -> None:
        for name in ("fallback_instance_types", "allowed_instance_types"):  # JSON gives lists: make them comparable
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def layout(self) -> Layout:
        """Where the pipeline's objects live in the bucket."""
        return Layout(self.prefix)

    def environment(self) -> dict[str, str]:
        """The function's environment variables that ``from_env`` reads back (the stack sets them)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "bucket"}
        return {"BUCKET": self.bucket, "SETTINGS": json.dumps(values, sort_keys=True)}

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Reads and checks the variables; a problem is the deployment's, so it is a RuntimeError."""
        def fail(message: str) -> RuntimeError:
            return RuntimeError(f"staging function environment: {message}; redeploy the stack")

        try:
            raw = json.loads(environ["SETTINGS"])
            settings = cls(bucket=environ["BUCKET"], **{f.name: raw[f.name] for f in fields(cls) if f.name != "bucket"})
        except KeyError as exc:
            raise fail(f"{exc.args[0]} is not set") from None
        except (ValueError, TypeError) as exc:
            raise fail(f"SETTINGS is not the expected JSON object ({exc})") from None
        if not _JOB_PREFIX.match(settings.job_prefix) or len(settings.job_prefix) > MAX_JOB_NAME_PREFIX - 10:
            raise fail(f"job_prefix {settings.job_prefix!r} must be 1-42 letters, digits or single hyphens")
        try:
            settings.layout
        except ValueError as exc:
            raise fail(str(exc)) from None
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
    config: TrainConfig
    """The training configuration the job's own parser makes of the hyperparameters."""
    force: bool = False
    """Start even where the pre-flight memory estimate says the run fits no instance type."""
    resume_from: str | None = None
    """An earlier execution whose checkpoints this run continues from."""


JOB_SEPARATOR = "--"
"""Between the stack's job prefix and the rest of a job name. Stack names have no ``--`` and the
rest never starts with a hyphen, so ``<prefix>--*`` (the IAM resource of a stack's jobs) matches
no job of a stack whose name merely starts the same (``ftstack`` and ``ftstack-dev``)."""


def training_jobs(job_prefix: str) -> str:
    """The resource name of every training job of the stack with ``job_prefix``, for IAM."""
    return f"{job_prefix}{JOB_SEPARATOR}*"


def job_name_prefix(job_prefix: str, execution: str) -> str:
    """``<job_prefix>--<execution>-<digest>``, a valid start of a SageMaker job name of at most 52 chars.

    Characters other than letters, digits and hyphens become hyphens (runs collapsed, none at the
    ends), and the name is shortened to fit. The 8 hex digits of the raw execution name's SHA-256
    always follow: were they added only to changed names, an execution literally named
    ``alice-run-603ae7d3`` would get the job names of the execution ``alice_run``.
    """
    name = re.sub(r"[^A-Za-z0-9]+", "-", execution).strip("-")
    digest = hashlib.sha256(execution.encode("utf-8")).hexdigest()[:8]
    head = job_prefix + JOB_SEPARATOR
    room = max(0, MAX_JOB_NAME_PREFIX - len(head) - len(digest) - 1)
    name = name[:room].rstrip("-")
    return f"{head}{name}-{digest}" if name else f"{head}{digest}"


def check_input(data: Any, settings: Settings) -> Request:
    """Checks everything about the execution input that needs no S3 access; raises InvalidInput."""
    if not isinstance(data, Mapping):
        raise InvalidInput('the execution input must be a JSON object, e.g. {"train_data": '
                           f'"s3://{settings.bucket}/{settings.layout.incoming}train.jsonl"}}')
    unknown = sorted(set(data) - set(INPUT_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], INPUT_KEYS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"the keys are {', '.join(INPUT_KEYS)}"
        raise InvalidInput(f"{unknown[0]}: unknown key in the execution input; {hint}")
    if not isinstance(data.get("train_data"), str):
        raise InvalidInput(f"train_data is required: the s3:// URI of the training JSONL, uploaded under "
                           f"s3://{settings.bucket}/{settings.layout.incoming}")
    train_key = _data_key("train_data", data["train_data"], settings)
    test_key = None
    if "test_data" in data:
        if "test_split" in data:
            raise InvalidInput("test_split: give test_data or test_split, not both")
        test_key = _data_key("test_data", data["test_data"], settings)
        if test_key == train_key:
            raise InvalidInput("test_data: is the same file as train_data; give a separate test file, "
                               "or leave test_data out to hold out part of train_data")
    test_split = data.get("test_split", settings.test_split)
    if isinstance(test_split, bool) or not isinstance(test_split, (int, float)) or not 0 < test_split <= 0.5:
        raise InvalidInput(f"test_split: {test_split!r} is not a number above 0 and at most 0.5; e.g. 0.05 "
                           "holds out every 20th record")
    base_model, base_model_key = _base_model(data.get("base_model", settings.base_model), settings)
    hyperparameters, cfg = _hyperparameters(data.get("hyperparameters", {}), base_model)
    if settings.offline:
        _check_isolated(cfg, base_model_key, settings)
    instance_types = _instance_types(data.get("instance_type", settings.instance_type), settings)
    instance_count = _instance_count(data.get("instance_count", settings.instance_count), settings)
    _check_batches(cfg, instance_types, instance_count)
    return Request(
        train_key=train_key, test_key=test_key, test_split=test_split, base_model=base_model,
        base_model_key=base_model_key, hyperparameters=hyperparameters, instance_types=instance_types,
        instance_count=instance_count, spot=_flag("spot", data.get("spot", settings.spot)), config=cfg,
        force=_flag("force", data.get("force", False)),
        resume_from=_resume_from(data.get("resume_from")),
    )


def check_sagemaker_fields(execution: str, request: Request) -> None:
    """Checks each value that the workflow will put in a SageMaker request against that field's
    limits (``fields``), so that a name SageMaker refuses fails now, not after training."""
    restart = "start a new execution under a name without it (Step Functions allows names that SageMaker does not)"
    checks: list[tuple[str, Field, str, str]] = [
        (f"the execution name {execution!r}", TAG_VALUE, execution, restart),
        (f"the execution name {execution!r}", METADATA_VALUE, execution, restart),
        (f"base_model {request.base_model!r}", METADATA_VALUE, request.base_model,
         f"copy the model to a prefix under {BASE_MODELS} made of such characters and give that URI"),
        ("the model package description (base_model and execution name)", DESCRIPTION,
         MODEL_PACKAGE_DESCRIPTION.format(request.base_model, execution), "shorten the base_model URI"),
    ]
    if request.base_model_key is not None:
        checks.append((f"base_model {request.base_model!r}", S3_URI, request.base_model,
                       f"copy the model to a shorter prefix under {BASE_MODELS}"))
    for key, value in request.hyperparameters.items():
        checks.append((f"hyperparameters.{key}", HYPERPARAMETER_KEY, key, "rename it"))
        checks.append((f"hyperparameters.{key}", HYPERPARAMETER_VALUE, value, "shorten it"))
    for what, field, value, fix in checks:
        problem = field.problem(value)
        if problem:
            raise InvalidInput(f"{what} {problem}; {fix}")


def _resume_from(value: Any) -> str | None:
    if value is None:
        return None
    if not is_execution_name(value):
        raise InvalidInput(f"resume_from: {value!r} is not an execution name; give the name of the execution whose "
                           "checkpoints to continue from (it is in its notification)")
    return value


def _check_batches(cfg: TrainConfig, instance_types: list[str], instance_count: int) -> None:
    """Rejects batch sizes that the GPUs of an instance type the run may use cannot split, before
    any instance starts (the job's launcher would reject them only after start-up)."""
    for instance_type in instance_types:
        count = gpus(instance_type)
        if count is None:
            continue
        try:
            batch_split(cfg, count * instance_count, "cuda")
        except ConfigError as exc:
            raise InvalidInput(
                f"hyperparameters: {exc} (on {instance_count} x {instance_type}, {count * instance_count} GPUs)"
            ) from None


def _data_key(field: str, value: Any, settings: Settings) -> str:
    bucket, incoming = settings.bucket, settings.layout.incoming
    example = f"s3://{bucket}/{incoming}{'train' if field == 'train_data' else 'test'}.jsonl"
    if not isinstance(value, str):
        raise InvalidInput(f"{field}: must be an s3:// URI of a JSONL file under s3://{bucket}/{incoming}, e.g. {example}")
    got_bucket, key = _split_uri(value)
    if got_bucket != bucket or not key.startswith(incoming):
        raise InvalidInput(f"{field}: {value!r} is not under s3://{bucket}/{incoming}, the only place the "
                           f"workflow reads data from; upload the file there and give its URI, e.g. {example}")
    if key == incoming or key.endswith("/"):
        raise InvalidInput(f"{field}: {value!r} is a folder; give the URI of one JSONL file, e.g. {example}")
    return key


def _split_uri(value: str) -> tuple[str | None, str]:
    match = re.match(r"^s3://([^/]+)/(.*)$", value, re.DOTALL)
    return (match.group(1), match.group(2)) if match else (None, "")


def _base_model(value: Any, settings: Settings) -> tuple[str, str | None]:
    """(name, key prefix in the bucket or None for a hub id)."""
    bucket, base_models = settings.bucket, settings.layout.base_models
    if isinstance(value, str) and value.startswith("s3://"):
        got_bucket, key = _split_uri(value)
        if got_bucket != bucket or not key.startswith(base_models) or not key[len(base_models):].strip("/"):
            raise InvalidInput(f"base_model: {value!r} is not a folder under s3://{bucket}/{base_models}, where the "
                               f"training jobs read base models; copy the Hugging Face model directory to "
                               f"s3://{bucket}/{base_models}<name>/ and give that URI")
        key = key.rstrip("/") + "/"
        return _uri(bucket, key), key
    if not is_hub_id(value):
        raise InvalidInput(f"base_model: {value!r} is neither a Hugging Face hub id (e.g. mosaicml/mpt-7b) nor an "
                           f"s3:// URI of a model directory under s3://{bucket}/{base_models}")
    return value, None


def _check_isolated(cfg: TrainConfig, base_model_key: str | None, settings: Settings) -> None:
    """A job that cannot reach the hub (network isolation, or a VPC without a route out) needs
    every source in S3."""
    fix = (f"copy the Hugging Face model directory to s3://{settings.bucket}/{settings.layout.base_models}<name>/ (`ftstack stage-model`) "
           "and give that URI as base_model; this deployment's training jobs cannot reach the hub (network isolation, "
           "or a network without a route to the internet)")
    if base_model_key is None:
        raise InvalidInput(f"base_model: {cfg.model!r} is a hub id, which a training job without network "
                           f"cannot download; {fix}")
    if not cfg.own_tokenizer:
        raise InvalidInput(f"hyperparameters.{TOKENIZER_KEY}: {cfg.tokenizer!r} would be downloaded from the hub, "
                           "which a training job without network cannot reach; leave it out to use the base "
                           "model's own tokenizer")


def _hyperparameters(value: Any, base_model: str) -> tuple[dict[str, str], TrainConfig]:
    """The hyperparameters as the strings the job gets, with the config the job's own parser
    makes of them."""
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
    total = sum(len(k) + len(v) for k, v in texts.items())
    if total > MAX_HYPERPARAMETER_TOTAL:
        raise InvalidInput(f"hyperparameters: {total:,} characters in all, over the workflow's limit of "
                           f"{MAX_HYPERPARAMETER_TOTAL:,} (they travel in the execution's state, which Step Functions "
                           "caps at 256 KB); shorten the longest values")
    try:
        cfg, ignored = parse_config(hyperparameters=texts)
    except ConfigError as exc:
        raise InvalidInput(f"hyperparameters: {exc}") from None
    for warning in ignored:
        print(f"hyperparameters: {warning}")  # the job ignores them too; CloudWatch keeps the note
    return texts, cfg


def _hyperparameter_text(key: str, value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = _one_line(value)
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


def _one_line(text: str) -> str:
    """``text``, or where it has line breaks (which no SageMaker hyperparameter value may hold: its
    pattern is ``.*``) the JSON string of it, which the job's config parser decodes, as it does the
    SageMaker Python SDK's values: a multi-line prompt template arrives intact."""
    if not any(char in text for char in LINE_TERMINATORS):
        return text
    encoded = json.dumps(text, ensure_ascii=False)
    for char in LINE_TERMINATORS:  # json.dumps leaves U+0085, U+2028 and U+2029 as they are
        encoded = encoded.replace(char, f"\\u{ord(char):04x}")
    return encoded


def _instance_types(value: Any, settings: Settings) -> list[str]:
    if not isinstance(value, str) or not INSTANCE_TYPE.match(value):
        raise InvalidInput(f"instance_type: {value!r} is not a SageMaker training instance type, e.g. ml.p4d.24xlarge")
    if value not in settings.allowed_instance_types:
        raise InvalidInput(f"instance_type: {value!r} is not one this deployment allows ({', '.join(settings.allowed_instance_types)}); "
                           "choose one of those, or ask the platform team to add it to the allowed_instance_types context key")
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


def _uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"
