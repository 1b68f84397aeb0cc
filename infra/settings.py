"""What the workflow definition needs from the pipeline's props: plain data, no CDK, so that the
tests build and run the very definition the pipeline deploys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftstack_train.contract import DEFAULT_ROOT, SageMakerPaths

CONTAINER_PATHS = SageMakerPaths(Path(DEFAULT_ROOT))
"""The training container's folders, where SageMaker puts them."""

EXECUTION_TAG = "ftstack:execution"
"""The tag every training job carries with its execution's name, besides the pipeline's tags."""

EXTENSION_POINTS = ("after_staging", "evaluate", "after_registration")
"""Where a pipeline may insert steps of its own, in the order they run."""


@dataclass(frozen=True)
class GateCondition:
    """A bound on a metric that the ``evaluate`` step returns; a model outside it is not registered."""

    metric: str
    at_most: float | None = None
    at_least: float | None = None


@dataclass(frozen=True)
class ExtraMetric:
    """A metric SageMaker reads from the training job's log (``regex``'s first group)."""

    name: str
    regex: str


@dataclass(frozen=True)
class WorkflowSettings:
    """What the definition needs from the pipeline's props."""

    region: str
    volume_size_gb: int
    max_runtime_s: int
    max_wait_s: int
    max_instance_count: int
    network_isolation: bool
    subnets: tuple[str, ...]
    security_groups: tuple[str, ...]
    approval_status: str
    quality_threshold: float | None
    volume_kms_instance_types: tuple[str, ...]
    """Instance types whose training volume is an EBS volume that takes the pipeline's key
    (``infra.instances.volume_kms_instance_types``); every other type gets no VolumeKmsKeyId."""
    prefix: str = ""
    """The pipeline's key prefix in the bucket (``infra.layout``)."""
    encrypt_output: bool = True
    """Whether the model output is encrypted with the bucket's key (``${BucketKeyArn}``); False for
    a brought bucket without one, whose default encryption then applies."""
    tags: tuple[tuple[str, str], ...] = ()
    """Put on every training job (cost allocation), besides the execution's name."""
    extra_metrics: tuple[ExtraMetric, ...] = ()
    gate: tuple[GateCondition, ...] = ()
    extensions: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Each extension point's steps, as a state graph (``{"StartAt", "States"}``)."""
