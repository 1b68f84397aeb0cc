"""The deployment's configuration: one typed, frozen object read from ``cdk.json`` context (and
``cdk synth -c key=value``) in ``app.py``, validated there with errors that name the key and the
fix. Constructs receive it (or parts of it); they never read context themselves."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ftstack.aws import DEFAULT_STACK

from .instances import INSTANCE_TYPE

APPROVAL_STATUSES = ("PendingManualApproval", "Approved")
REMOVAL_POLICIES = ("retain", "destroy")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z](-?[A-Za-z0-9]){0,39}$")
"""No "--" (job names separate the stack's prefix with it, see stage_data.request.JOB_SEPARATOR) and
no hyphen at the end."""


class InfraConfigError(ValueError):
    """A context value is missing or wrong; the message names the key and the fix."""


def _doc(doc: str, **kwargs: Any) -> Any:
    return field(metadata={"doc": doc}, **kwargs)


@dataclass(frozen=True)
class InfraConfig:
    """Every deployment option; each field is a ``cdk.json`` context key of the same name."""

    stack_name: str = _doc("CloudFormation stack name; also prefixes training job names.", default=DEFAULT_STACK)
    region: str = _doc("Region to deploy to (the base and inference images are resolved for it).", default="us-east-1")
    instance_type: str = _doc("Default training instance type.", default="ml.p4d.24xlarge")
    instance_count: int = _doc("Default number of training instances (nodes).", default=1)
    fallback_instance_types: tuple[str, ...] = _doc(
        "Instance types tried in order when the previous one has no capacity.", default=("ml.g5.48xlarge",)
    )
    allowed_instance_types: tuple[str, ...] = _doc(
        "Further instance types an execution may ask for (its instance_type); instance_type and "
        "fallback_instance_types are always allowed. The workflow's role may start no other.",
        default=(),
    )
    max_instance_count: int = _doc("Largest instance_count an execution may ask for.", default=4)
    volume_size_gb: int = _doc("Encrypted EBS volume per instance, in GB.", default=500)
    max_runtime_hours: float = _doc("StoppingCondition.MaxRuntimeInSeconds, in hours.", default=24.0)
    spot: bool = _doc("Use managed spot training by default (resumes from checkpoints).", default=False)
    max_wait_hours: float = _doc("With spot: longest wait for capacity plus run time, in hours.", default=48.0)
    staging_concurrency: int = _doc(
        "Reserved concurrency of the data-staging function: the most runs staged at once, and all it can take of "
        "the account's Lambda concurrency (AWS keeps 100 of that unreserved). A run started beyond it waits, retrying for up to about 40 minutes.",
        default=10,
    )
    vpc_subnet_ids: tuple[str, ...] = _doc("Run training jobs in these subnets (empty: no VPC).", default=())
    vpc_security_group_ids: tuple[str, ...] = _doc("Security groups of the training jobs in the VPC.", default=())
    network_isolation: bool = _doc("No network access from the training container (base model must be in S3).", default=False)
    base_model: str = _doc("Default base model: a hub id or an s3:// URI in the stack's bucket.", default="mosaicml/mpt-7b")
    model_approval_status: str = _doc("Status of newly registered models: PendingManualApproval or Approved.", default="PendingManualApproval")
    quality_threshold: float | None = _doc("Highest final eval cross-entropy a model may have to be registered; empty: no gate.", default=None)
    notification_emails: tuple[str, ...] = _doc("E-mail addresses subscribed to run notifications.", default=())
    removal_policy: str = _doc("retain or destroy for the access-log bucket when the stack is deleted; the data bucket and its key are always retained (they hold the models).", default="retain")
    base_image: str | None = _doc("Training base image URI; empty: the AWS PyTorch training image for the region.", default=None)
    base_image_digest: str | None = _doc(
        "Digest of the base image in the region deployed to (`sha256:` and 64 hex digits, as `docker inspect` shows it after a pull; see Deploy): "
        "the image builds FROM `<repository>@<digest>`, whatever the tag points to later; empty: the tag, which AWS re-publishes with patches.",
        default=None,
    )
    pytorch_version: str = _doc("PyTorch version of the resolved training base image.", default="2.8")
    python_version: str = _doc("Python version of the resolved training base image.", default="py312")
    inference_image: str | None = _doc("Inference image URI of registered models; empty: the Hugging Face LLM (TGI) image for the region.", default=None)

    def __post_init__(self) -> None:
        _check(self)

    @property
    def instance_types(self) -> tuple[str, ...]:
        """Every instance type a training job of the stack may run on."""
        return tuple(dict.fromkeys((self.instance_type, *self.fallback_instance_types, *self.allowed_instance_types)))

    @property
    def job_prefix(self) -> str:
        """Every training job of the stack starts with this; IAM is scoped to it."""
        return self.stack_name.lower()


def _check(cfg: InfraConfig) -> None:
    def fail(key: str, message: str) -> None:
        raise InfraConfigError(f"context key {key!r}: {message}")

    if not _NAME.match(cfg.stack_name):
        fail("stack_name", "use 1-40 letters, digits or single hyphens, starting with a letter and not ending with a hyphen")
    if not re.match(r"^[a-z]{2}(-[a-z]+)+-\d$", cfg.region):
        fail("region", f"{cfg.region!r} is not a region name, e.g. us-east-1")
    for key, value in [("instance_type", cfg.instance_type)] + [("fallback_instance_types", t) for t in cfg.fallback_instance_types] \
            + [("allowed_instance_types", t) for t in cfg.allowed_instance_types]:
        if not INSTANCE_TYPE.match(value):
            fail(key, f"{value!r} is not a SageMaker instance type, e.g. ml.p4d.24xlarge")
    if not 1 <= cfg.instance_count <= cfg.max_instance_count:
        fail("instance_count", f"must be between 1 and max_instance_count ({cfg.max_instance_count})")
    if not 30 <= cfg.volume_size_gb <= 16384:
        fail("volume_size_gb", "must be between 30 and 16384 (MPT-7B needs about 100 GB with checkpoints)")
    if not 0 < cfg.max_runtime_hours <= 28 * 24:
        fail("max_runtime_hours", "must be positive and at most 672 (28 days, SageMaker's limit)")
    if cfg.max_wait_hours < cfg.max_runtime_hours:
        fail("max_wait_hours", f"must be at least max_runtime_hours ({cfg.max_runtime_hours}); SageMaker requires it for spot")
    if cfg.staging_concurrency < 1:
        fail("staging_concurrency", "must be at least 1 (0 would throttle every run's staging), e.g. 10")
    if bool(cfg.vpc_subnet_ids) != bool(cfg.vpc_security_group_ids):
        fail("vpc_subnet_ids" if not cfg.vpc_subnet_ids else "vpc_security_group_ids", "give both subnets and security groups, or neither")
    for key, values, prefix in (("vpc_subnet_ids", cfg.vpc_subnet_ids, "subnet-"), ("vpc_security_group_ids", cfg.vpc_security_group_ids, "sg-")):
        for value in values:
            if not value.startswith(prefix):
                fail(key, f"{value!r} does not look like an id starting with {prefix}")
    if cfg.network_isolation and not cfg.base_model.startswith("s3://"):
        fail("base_model", "with network_isolation the container cannot reach the hub; give an s3:// URI of the model")
    if cfg.model_approval_status not in APPROVAL_STATUSES:
        fail("model_approval_status", f"use one of {', '.join(APPROVAL_STATUSES)}")
    if cfg.quality_threshold is not None and cfg.quality_threshold <= 0:
        fail("quality_threshold", "must be a positive cross-entropy, e.g. 1.5")
    for email in cfg.notification_emails:
        if not _EMAIL.match(email):
            fail("notification_emails", f"{email!r} is not an e-mail address")
    if cfg.removal_policy not in REMOVAL_POLICIES:
        fail("removal_policy", f"use one of {', '.join(REMOVAL_POLICIES)}")
    if cfg.base_image_digest is not None and not _DIGEST.match(cfg.base_image_digest):
        fail("base_image_digest", f"{cfg.base_image_digest!r} is not an image digest: give sha256: and 64 lowercase hex digits, "
             "as `docker inspect --format '{{index .RepoDigests 0}}' IMAGE` prints it after the @, or leave it empty")
    if cfg.base_image_digest is not None and "@" in (cfg.base_image or ""):
        fail("base_image_digest", "base_image already names a digest (...@sha256:...): keep only one of the two")


def load_config(context: Mapping[str, Any]) -> InfraConfig:
    """Builds the config from context values (``cdk.json`` gives JSON types, ``-c`` gives strings)."""
    kwargs = {}
    for f in fields(InfraConfig):
        if f.name in context and context[f.name] is not None:
            kwargs[f.name] = _coerce(f.name, f.type, context[f.name])
    return InfraConfig(**kwargs)


def _coerce(key: str, annotation: str, value: Any) -> Any:
    def bad(expected: str) -> InfraConfigError:
        return InfraConfigError(f"context key {key!r}: {value!r} is not {expected}")

    base = annotation.replace(" | None", "")
    if isinstance(value, str) and base != "str":
        text = value.strip()
        if base == "tuple[str, ...]":
            value = json.loads(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
        elif text == "":
            return None
        else:
            try:
                value = json.loads(text.lower() if base == "bool" else text)
            except ValueError:
                raise bad({"bool": "true or false", "int": "a whole number", "float": "a number"}.get(base, f"a {base}")) from None
    if base == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value if value.strip() else None if "None" in annotation else value
    if base == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if base == "tuple[str, ...]":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return tuple(value)
    raise AssertionError(annotation)


CONTEXT_KEYS = tuple(f.name for f in fields(InfraConfig))


def reference_table() -> str:
    """The deployment options as a Markdown table (the README embeds it; a test keeps them equal)."""
    lines = ["| context key | default | meaning |", "|---|---|---|"]
    for f in fields(InfraConfig):
        default = f.default
        shown = "(empty)" if default in (None, ()) else json.dumps(list(default)) if isinstance(default, tuple) else json.dumps(default)
        lines.append(f"| `{f.name}` | `{shown}` | {f.metadata['doc']} |")
    return "\n".join(lines)
