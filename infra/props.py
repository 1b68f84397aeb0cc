"""The props of ``FineTuningPipeline``: one frozen dataclass, checked when it is made, with a
message that names the prop and the fix.

Each resource the pipeline needs is either brought (an existing object, as aws-solutions-constructs'
``existingBucketObj``) or created: the bucket and its key, the notification topic, the network,
the model package group and the training image. The README's props reference is generated from
the field docs below (``reference_table``; a test keeps them equal).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_stepfunctions as sfn

from ftstack.serving import DEFAULT_INSTANCE_TYPE
from ftstack_train.metrics import METRIC_DEFINITIONS

from .layout import Layout
from .options import PropsError, TrainingOptions, check_endpoint_instance_type, doc
from .settings import EXECUTION_TAG, ExtraMetric, GateCondition

NAME = re.compile(r"^[A-Za-z](-?[A-Za-z0-9]){0,39}$")
"""A pipeline's name: no "--" (job names separate it from the rest with that, see
stage_data.request.JOB_SEPARATOR) and no hyphen at the end."""
ROLE_NAME_PREFIX = re.compile(r"^[\w+=,.@-]{1,32}$")
"""IAM role names take ``[\\w+=,.@-]``; 32 leaves room for the pipeline's part of the name."""
GROUP_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
"""SageMaker's ModelPackageGroupName (botocore's sagemaker model)."""
TAG_TEXT = re.compile(r"^(?:[\w.:/=+\-@]|[^\S\t\n\r\v\f\x1c-\x1f\x85])*\Z")
"""SageMaker's Tag Key and Value pattern, ``^([\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*)$``: ``\\w`` is
``\\p{L}``, ``\\p{N}`` and ``_``; ``\\p{Z}`` is ``\\s`` without its control characters (tab, line
feed...), which CloudFormation and CreateTrainingJob refuse. ``\\Z``: ``$`` would let a final line
feed through."""
METRIC_NAME = re.compile(r"^[A-Za-z0-9_.:/+=@-]{1,255}$")
"""What an extra metric may be called (a CloudWatch metric name)."""
GATE_METRIC = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
"""What a gate's metric may be called: a plain JSONPath member (the gate reads
``$.evaluation.output.metrics.<name>``) that is also a model package metadata key."""
MAX_TAGS = 49
"""CreateTrainingJob takes 50 tags; the workflow adds ``ftstack:execution``."""
MAX_METRIC_DEFINITIONS = 40
"""AlgorithmSpecification.MetricDefinitions takes at most 40 (botocore's sagemaker model)."""
MAX_METRIC_REGEX = 500
"""MetricDefinition.Regex's maximum length (botocore's sagemaker model)."""


@dataclass(frozen=True)
class BuiltImage:
    """The training image built from ftstack's ``training_code/`` at deploy time (the default)."""

    base_image: str | None = None
    """The image it builds FROM; None: the AWS PyTorch training image for the stack's region."""
    base_image_digest: str | None = None
    """``sha256:...``: build FROM ``<repository>@<digest>`` instead of the tag."""
    pytorch_version: str = "2.8"
    python_version: str = "py312"


@dataclass(frozen=True)
class EcrImage:
    """An existing training image in ECR, e.g. one your pipeline built and scanned."""

    repository: ecr.IRepository
    tag_or_digest: str
    """A tag (``v1``) or a digest (``sha256:...``)."""

    @property
    def image_uri(self) -> str:
        """``<repository URI>:<tag>`` or ``<repository URI>@<digest>``."""
        if self.tag_or_digest.startswith("sha256:"):
            return self.repository.repository_uri_for_digest(self.tag_or_digest)
        return self.repository.repository_uri_for_tag(self.tag_or_digest)


@dataclass(frozen=True)
class ExistingNetwork:
    """Training jobs run in these subnets of your VPC. They need a route to S3 (a gateway endpoint
    or NAT) and, for a hub base model, to the internet."""

    subnets: tuple[ec2.ISubnet, ...]
    security_groups: tuple[ec2.ISecurityGroup, ...] = ()
    """They must allow all traffic in and out between their own members (a job's instances talk
    NCCL, encrypted). Empty: one is created in ``vpc`` that does."""
    vpc: ec2.IVpc | None = None
    """Needed only to create the security group."""
    reaches_hub: bool = True
    """False when the subnets have no route to the internet: base models must then be in S3."""


@dataclass(frozen=True)
class CreatedNetwork:
    """A VPC of its own for the training jobs: isolated subnets (no internet, so base models come
    from S3), an S3 gateway endpoint, flow logs, and a security group for the job's instances."""

    max_azs: int = 2


@dataclass(frozen=True, kw_only=True)
class FineTuningPipelineProps:
    """Everything a platform team chooses about one pipeline."""

    name: str = doc("Names the pipeline's resources: the state machine `<name>-workflow`, training jobs "
                    "`<name>--...`, the model package group `<name>-models` when created, and its roles. "
                    "1-40 letters, digits or single hyphens, unique in the account and region.")
    prefix: str = doc("Key prefix of everything the pipeline reads and writes in the bucket (`team-a/`); "
                      "IAM is scoped to it, so pipelines sharing a bucket cannot touch each other's data.", default="")
    training: TrainingOptions = doc("Instance types and counts, limits, spot, default base model, gate "
                                    "(`TrainingOptions`, the same keys as the app's context).", default=TrainingOptions())
    bucket: s3.IBucket | None = doc("Brought: the bucket to use; it must keep object versions (see README). "
                                    "Created: an SSE-KMS, versioned, access-logged bucket, kept when the stack is "
                                    "deleted.", default=None)
    bucket_key: kms.IKey | None = doc("With a brought bucket: the KMS key its objects are encrypted with. None: "
                                      "the bucket's default encryption (SSE-S3 or its own key policy).", default=None)
    key: kms.IKey | None = doc("Brought: the key for the pipeline's logs, topic, training volumes and created "
                               "bucket (its policy must delegate to IAM and let CloudWatch Logs use it, see "
                               "README). Created: a rotating KMS key, kept when the stack is deleted.", default=None)
    removal_policy: cdk.RemovalPolicy = doc("For a created bucket's access-log bucket (the data bucket and key "
                                            "are always kept).", default=cdk.RemovalPolicy.RETAIN)
    topic: sns.ITopic | None = doc("Brought: the SNS topic run notifications go to. Created: one encrypted "
                                   "with `key`.", default=None)
    topic_key: kms.IKey | None = doc("With a brought topic encrypted with a KMS key (SSE): that key; the roles that "
                                     "publish get the data-key actions on it (the key policy must delegate to IAM).",
                                     default=None)
    notification_emails: tuple[str, ...] = doc("E-mail addresses subscribed to the topic.", default=())
    network: ExistingNetwork | CreatedNetwork | None = doc("`ExistingNetwork` (your subnets, security "
                                                           "groups), `CreatedNetwork`, or None: no VPC.", default=None)
    model_package_group_name: str | None = doc("Brought: an existing model package group's name. None: "
                                               "`<name>-models` is created.", default=None)
    training_image: BuiltImage | EcrImage = doc("`BuiltImage` (built from training_code/ at deploy) or "
                                                "`EcrImage` (an existing image).", default=BuiltImage())
    inference_image: str | None = doc("Inference image of registered models; None: the region's Hugging Face "
                                      "vLLM image.", default=None)
    deploy_on_approval: bool = doc("Serve each approved model behind the group's endpoint (named after the "
                                   "group), replacing the model it served.", default=False)
    endpoint_instance_type: str = doc("Instance type of that endpoint (and `ftstack deploy`'s default).",
                                      default=DEFAULT_INSTANCE_TYPE)
    permissions_boundary: iam.IManagedPolicy | None = doc("Set as the permissions boundary of every role "
                                                          "the pipeline creates.", default=None)
    role_name_prefix: str | None = doc("Prefix of every role name the pipeline creates "
                                       "(`<prefix><name>-<role>`); None: CloudFormation names them.", default=None)
    tags: Mapping[str, str] = doc("Put on every resource of the pipeline and every training job (cost "
                                  "allocation).", default_factory=dict)
    after_staging: sfn.IChainable | None = doc("Runs after the data is staged, before training (e.g. a PII "
                                               "scan). Fails the run by failing.", default=None)
    evaluate: sfn.IChainable | None = doc("Runs after training, before the quality gate (e.g. a SageMaker "
                                          "Processing job); returns `{\"metrics\": {name: number}}` for `gate`.", default=None)
    after_registration: sfn.IChainable | None = doc("Runs after the model is registered (e.g. open a "
                                                    "ticket).", default=None)
    gate: tuple[GateCondition, ...] = doc("Bounds on metrics that `evaluate` returns; each must hold for the "
                                          "model to be registered.", default=())
    extra_metrics: tuple[ExtraMetric, ...] = doc("More metrics SageMaker reads from the training log.", default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", dict(self.tags))
        for name in ("notification_emails", "gate", "extra_metrics"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check(self)

    @property
    def layout(self) -> Layout:
        """Where the pipeline's objects live in the bucket."""
        return Layout(self.prefix)

    @property
    def job_prefix(self) -> str:
        """Every training job of the pipeline starts with this; IAM is scoped to it."""
        return self.name.lower()

    @property
    def reaches_hub(self) -> bool:
        """Whether the training jobs can download a base model from the Hugging Face hub."""
        if self.training.network_isolation or isinstance(self.network, CreatedNetwork):
            return False
        return self.network.reaches_hub if isinstance(self.network, ExistingNetwork) else True


def _fail(prop: str, message: str) -> None:
    raise PropsError(f"FineTuningPipelineProps.{prop}: {message}")


def _is_chainable(value: Any) -> bool:
    return hasattr(value, "start_state") and hasattr(value, "end_states")


def _check(p: FineTuningPipelineProps) -> None:
    fail = _fail
    if not isinstance(p.name, str) or not NAME.match(p.name):
        fail("name", f"{p.name!r}: use 1-40 letters, digits or single hyphens, starting with a letter and not ending with one")
    try:
        p.layout
    except ValueError as exc:
        fail("prefix", str(exc))
    if not isinstance(p.training, TrainingOptions):
        fail("training", "give a TrainingOptions(...)")
    if p.bucket_key is not None and p.bucket is None:
        fail("bucket_key", "is the key of a brought bucket; give bucket too, or leave bucket_key out (a created "
             "bucket is encrypted with key)")
    if p.topic_key is not None and p.topic is None:
        fail("topic_key", "is the key of a brought topic; give topic too, or leave topic_key out (a created topic is "
             "encrypted with key)")
    if not isinstance(p.network, (ExistingNetwork, CreatedNetwork, type(None))):
        fail("network", "give ExistingNetwork(subnets=...), CreatedNetwork() or None")
    if isinstance(p.network, ExistingNetwork):
        if not p.network.subnets:
            fail("network", "ExistingNetwork needs at least one subnet")
        if not p.network.security_groups and p.network.vpc is None:
            fail("network", "ExistingNetwork without security_groups needs vpc, to create one in it")
    if isinstance(p.network, CreatedNetwork) and not 1 <= p.network.max_azs <= 6:
        fail("network", "CreatedNetwork.max_azs must be between 1 and 6")
    if not p.reaches_hub and not p.training.base_model.startswith("s3://"):
        fail("training", "base_model must be an s3:// URI (`ftstack stage-model`): the training jobs cannot reach "
             "the hub (network isolation, or a network without a route to the internet)")
    if p.model_package_group_name is not None and not GROUP_NAME.match(p.model_package_group_name):
        fail("model_package_group_name", f"{p.model_package_group_name!r}: use 1-63 letters, digits or hyphens, "
             "starting and ending with a letter or digit")
    if not isinstance(p.training_image, (BuiltImage, EcrImage)):
        fail("training_image", "give BuiltImage(...) or EcrImage(repository, tag_or_digest)")
    check_endpoint_instance_type(p.endpoint_instance_type, fail)
    if p.role_name_prefix is not None and not ROLE_NAME_PREFIX.match(p.role_name_prefix):
        fail("role_name_prefix", f"{p.role_name_prefix!r}: use 1-32 of letters, digits and + = , . @ _ -")
    _check_tags(p.tags)
    for point in ("after_staging", "evaluate", "after_registration"):
        value = getattr(p, point)
        if value is not None and not _is_chainable(value):
            fail(point, f"{type(value).__name__} is not a Step Functions chainable; give a state, a task or a Chain")
    _check_gate(p)
    _check_metrics(p.extra_metrics)


def _check_tags(tags: Mapping[str, str]) -> None:
    if len(tags) > MAX_TAGS:
        _fail("tags", f"{len(tags)} tags: training jobs take {MAX_TAGS + 1}, and ftstack adds one (ftstack:execution)")
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            _fail("tags", f"{key!r}: keys and values must be strings")
        if not 1 <= len(key) <= 128 or len(value) > 256 or not TAG_TEXT.match(key) or not TAG_TEXT.match(value):
            _fail("tags", f"{key!r}={value!r}: keys take 1-128 and values 0-256 letters, digits, spaces and _ . : / = + - @")
        if key.lower().startswith("aws:") or key == EXECUTION_TAG:
            _fail("tags", f"{key!r}: reserved (aws: for AWS, {EXECUTION_TAG} for the run's name)")


def _check_gate(p: FineTuningPipelineProps) -> None:
    if p.gate and p.evaluate is None:
        _fail("gate", "bounds metrics that the evaluate step returns; give evaluate too")
    seen = set()
    for condition in p.gate:
        if not isinstance(condition, GateCondition) or not GATE_METRIC.match(condition.metric):
            _fail("gate", f"{condition!r}: give GateCondition(metric=<name of letters, digits and _, not starting with a digit>, ...)")
        if condition.metric in seen:
            _fail("gate", f"{condition.metric!r} appears twice; give one condition with at_most and at_least")
        seen.add(condition.metric)
        if condition.at_most is None and condition.at_least is None:
            _fail("gate", f"{condition.metric!r}: give at_most, at_least or both")
        if None not in (condition.at_most, condition.at_least) and condition.at_least > condition.at_most:
            _fail("gate", f"{condition.metric!r}: at_least {condition.at_least} is above at_most {condition.at_most}")


def _check_metrics(extra: tuple[ExtraMetric, ...]) -> None:
    names = {d.name for d in METRIC_DEFINITIONS}
    if len(extra) + len(names) > MAX_METRIC_DEFINITIONS:
        _fail("extra_metrics", f"SageMaker takes {MAX_METRIC_DEFINITIONS} metric definitions and ftstack uses "
              f"{len(names)}: give at most {MAX_METRIC_DEFINITIONS - len(names)}")
    for metric in extra:
        if not isinstance(metric, ExtraMetric) or not METRIC_NAME.match(metric.name):
            _fail("extra_metrics", f"{metric!r}: give ExtraMetric(name, regex) with a name of letters, digits and _ . : / + = @ -")
        if metric.name in names:
            _fail("extra_metrics", f"{metric.name!r} is already defined (by ftstack or twice); choose another name")
        names.add(metric.name)
        if not 1 <= len(metric.regex) <= MAX_METRIC_REGEX:
            _fail("extra_metrics", f"{metric.name!r}: the regex must be 1-{MAX_METRIC_REGEX} characters")
        try:
            if re.compile(metric.regex).groups < 1:
                _fail("extra_metrics", f"{metric.name!r}: the regex needs a group around the value, e.g. acc=([0-9.]+)")
        except re.error as exc:
            _fail("extra_metrics", f"{metric.name!r}: the regex does not compile ({exc})")


def reference_table() -> str:
    """The props as a Markdown table (the README embeds it; a test keeps them equal)."""
    lines = ["| prop | default | meaning |", "|---|---|---|"]
    for f in fields(FineTuningPipelineProps):
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        lines.append(f"| `{f.name}` | `{_shown(default)}` | {f.metadata['doc']} |")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    if value == "(required)":
        return value
    if value is None or value in ((), {}):
        return "(none)" if value is None else json.dumps(value if value != () else [])
    if isinstance(value, cdk.RemovalPolicy):
        return f"RemovalPolicy.{value.name}"
    if isinstance(value, (TrainingOptions, BuiltImage)):
        return f"{type(value).__name__}()"
    return json.dumps(value)
