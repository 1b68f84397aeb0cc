"""The deployment's configuration: one typed, frozen object read from ``cdk.json`` context (and
``cdk synth -c key=value``) in ``app.py``, validated there with errors that name the key and the
fix. Constructs receive it (or parts of it); they never read context themselves."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ftstack.aws import DEFAULT_STACK
from ftstack.serving import DEFAULT_INSTANCE_TYPE

from .options import TRAINING_KEYS, TrainingOptions, check_endpoint_instance_type, check_training, doc
from .props import NAME

REMOVAL_POLICIES = ("retain", "destroy")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_POLICY_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:policy/[\w+=,.@/-]{1,512}$")


class InfraConfigError(ValueError):
    """A context value is missing or wrong; the message names the key and the fix."""


@dataclass(frozen=True)
class InfraConfig(TrainingOptions):
    """Every deployment option of the app; each field is a ``cdk.json`` context key of the same
    name. The training options (``TrainingOptions``) come first; the rest say where and how the
    app deploys its one pipeline."""

    stack_name: str = doc("CloudFormation stack name; also names the pipeline (its state machine, training jobs and model package group).", default=DEFAULT_STACK)
    region: str = doc("Region to deploy to (the base and inference images are resolved for it).", default="us-east-1")
    vpc_subnet_ids: tuple[str, ...] = doc("Run training jobs in these subnets (empty: no VPC).", default=())
    vpc_security_group_ids: tuple[str, ...] = doc("Security groups of the training jobs in the VPC.", default=())
    notification_emails: tuple[str, ...] = doc("E-mail addresses subscribed to run notifications.", default=())
    removal_policy: str = doc("retain or destroy for the access-log bucket when the stack is deleted; the data bucket and its key are always retained (they hold the models).", default="retain")
    permissions_boundary: str | None = doc("ARN of a managed policy set as the permissions boundary of every role the stack creates; empty: none.", default=None)
    role_name_prefix: str | None = doc("Prefix of the name of every role the stack creates (e.g. an organisation's required `app-`); empty: names chosen by CloudFormation.", default=None)
    tags: tuple[str, ...] = doc("`Key=Value` tags put on every resource of the stack and every training job (cost allocation).", default=())
    base_image: str | None = doc("Training base image URI; empty: the AWS PyTorch training image for the region.", default=None)
    base_image_digest: str | None = doc(
        "Digest of the base image in the region deployed to (`sha256:` and 64 hex digits, as `docker inspect` shows it after a pull; see Deploy): "
        "the image builds FROM `<repository>@<digest>`, whatever the tag points to later; empty: the tag, which AWS re-publishes with patches.",
        default=None,
    )
    pytorch_version: str = doc("PyTorch version of the resolved training base image.", default="2.8")
    python_version: str = doc("Python version of the resolved training base image.", default="py312")
    inference_image: str | None = doc("Inference image URI of registered models; empty: the Hugging Face vLLM image for the region.", default=None)
    deploy_on_approval: bool = doc("Serve each approved model behind the model package group's endpoint (named after the group), replacing the model it served.", default=False)
    endpoint_instance_type: str = doc("Instance type of that endpoint (and `ftstack deploy`'s default).", default=DEFAULT_INSTANCE_TYPE)

    def __post_init__(self) -> None:
        check_training(self, _fail)
        _check(self)

    @property
    def job_prefix(self) -> str:
        """Every training job of the stack starts with this; IAM is scoped to it."""
        return self.stack_name.lower()

    @property
    def training(self) -> TrainingOptions:
        """The training options alone, as the pipeline takes them."""
        return TrainingOptions(**{key: getattr(self, key) for key in TRAINING_KEYS})

    @property
    def tag_map(self) -> dict[str, str]:
        """``tags`` as a mapping."""
        return dict(tag.split("=", 1) for tag in self.tags)


def _fail(key: str, message: str) -> None:
    raise InfraConfigError(f"context key {key!r}: {message}")


def _check(cfg: InfraConfig) -> None:
    fail = _fail
    if not NAME.match(cfg.stack_name):  # it names the stack's pipeline
        fail("stack_name", "use 1-40 letters, digits or single hyphens, starting with a letter and not ending with a hyphen")
    if not re.match(r"^[a-z]{2}(-[a-z]+)+-\d$", cfg.region):
        fail("region", f"{cfg.region!r} is not a region name, e.g. us-east-1")
    if bool(cfg.vpc_subnet_ids) != bool(cfg.vpc_security_group_ids):
        fail("vpc_subnet_ids" if not cfg.vpc_subnet_ids else "vpc_security_group_ids", "give both subnets and security groups, or neither")
    for key, values, prefix in (("vpc_subnet_ids", cfg.vpc_subnet_ids, "subnet-"), ("vpc_security_group_ids", cfg.vpc_security_group_ids, "sg-")):
        for value in values:
            if not value.startswith(prefix):
                fail(key, f"{value!r} does not look like an id starting with {prefix}")
    for email in cfg.notification_emails:
        if not _EMAIL.match(email):
            fail("notification_emails", f"{email!r} is not an e-mail address")
    if cfg.removal_policy not in REMOVAL_POLICIES:
        fail("removal_policy", f"use one of {', '.join(REMOVAL_POLICIES)}")
    check_endpoint_instance_type(cfg.endpoint_instance_type, fail)
    if cfg.permissions_boundary is not None and not _POLICY_ARN.match(cfg.permissions_boundary):
        fail("permissions_boundary", f"{cfg.permissions_boundary!r} is not a managed policy ARN, e.g. "
             "arn:aws:iam::123456789012:policy/team-boundary")
    for tag in cfg.tags:
        if "=" not in tag or not tag.split("=", 1)[0]:
            fail("tags", f"{tag!r} is not Key=Value, e.g. cost-center=ml-platform")
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
