"""What every run of a pipeline may do: instance types and counts, volume, time limits, spot,
staging, the default base model and what happens to its models. One typed, frozen object, checked
when it is made: ``FineTuningPipelineProps.training`` takes it, and the app's ``cdk.json``
configuration (``infra.config.InfraConfig``) extends it with the same keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .instances import INSTANCE_TYPE

APPROVAL_STATUSES = ("PendingManualApproval", "Approved")


class PropsError(ValueError):
    """A construct prop is wrong; the message names the prop and the fix."""


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation (the README's references are generated from it)."""
    return field(metadata={"doc": text}, **kwargs)


Fail = Callable[[str, str], None]
"""Raises the error for a bad value: ``fail(key, message)``."""


@dataclass(frozen=True)
class TrainingOptions:
    """What every run may do; an execution may ask for less (or another allowed instance type)."""

    instance_type: str = doc("Default training instance type.", default="ml.p4d.24xlarge")
    instance_count: int = doc("Default number of training instances (nodes).", default=1)
    fallback_instance_types: tuple[str, ...] = doc(
        "Instance types tried in order when the previous one has no capacity.", default=("ml.g5.48xlarge",)
    )
    allowed_instance_types: tuple[str, ...] = doc(
        "Further instance types an execution may ask for (its instance_type); instance_type and "
        "fallback_instance_types are always allowed. The workflow's role may start no other.",
        default=(),
    )
    max_instance_count: int = doc("Largest instance_count an execution may ask for.", default=4)
    volume_size_gb: int = doc("Encrypted EBS volume per instance, in GB.", default=500)
    max_runtime_hours: float = doc("StoppingCondition.MaxRuntimeInSeconds, in hours.", default=24.0)
    spot: bool = doc("Use managed spot training by default (resumes from checkpoints).", default=False)
    max_wait_hours: float = doc("With spot: longest wait for capacity plus run time, in hours.", default=48.0)
    staging_concurrency: int | None = doc(
        "Reserved concurrency of the data-staging function: the most runs staged at once, and all it can take of "
        "the account's Lambda concurrency (AWS keeps 100 of that unreserved). A run started beyond it waits, retrying "
        "for up to about 40 minutes. Empty: no reservation, for an account whose Lambda quota leaves none to reserve.",
        default=10,
    )
    network_isolation: bool = doc("No network access from the training container (base model must be in S3).", default=False)
    base_model: str = doc("Default base model: a hub id or an s3:// URI in the stack's bucket.", default="mosaicml/mpt-7b")
    model_approval_status: str = doc("Status of newly registered models: PendingManualApproval or Approved.", default="PendingManualApproval")
    quality_threshold: float | None = doc("Highest final eval cross-entropy a model may have to be registered; empty: no gate.", default=None)

    def __post_init__(self) -> None:
        check_training(self, _prop_error(type(self).__name__))

    @property
    def instance_types(self) -> tuple[str, ...]:
        """Every instance type a training job may run on."""
        return tuple(dict.fromkeys((self.instance_type, *self.fallback_instance_types, *self.allowed_instance_types)))


def _prop_error(owner: str) -> Fail:
    def fail(key: str, message: str) -> None:
        raise PropsError(f"{owner}.{key}: {message}")

    return fail


TRAINING_KEYS = tuple(f for f in TrainingOptions.__dataclass_fields__)


def check_endpoint_instance_type(value: Any, fail: Fail) -> None:
    """The deploy endpoint's instance type must be a GPU type ftstack knows: vLLM is given one
    tensor-parallel shard per GPU (``ftstack.serving.instance_gpus``), which the deploy workflow
    reads at synth; anything else would stop the synth with a bare ServingError."""
    from ftstack.serving import ServingError, instance_gpus

    try:
        instance_gpus(value if isinstance(value, str) else repr(value))
    except ServingError as exc:
        fail("endpoint_instance_type", str(exc))


def check_training(cfg: TrainingOptions, fail: Fail) -> None:
    """Rejects contradictory or out-of-range training options, naming the key."""
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
    if cfg.staging_concurrency is not None and cfg.staging_concurrency < 1:
        fail("staging_concurrency", "must be at least 1 (0 would throttle every run's staging), e.g. 10, or empty for "
             "no reservation")
    if cfg.network_isolation and not cfg.base_model.startswith("s3://"):
        fail("base_model", "with network_isolation the container cannot reach the hub; give an s3:// URI of the model")
    if cfg.model_approval_status not in APPROVAL_STATUSES:
        fail("model_approval_status", f"use one of {', '.join(APPROVAL_STATUSES)}")
    if cfg.quality_threshold is not None and cfg.quality_threshold <= 0:
        fail("quality_threshold", "must be a positive cross-entropy, e.g. 1.5")
