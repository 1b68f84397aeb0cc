"""What the workflow definition needs from the deployment's configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftstack_train.contract import DEFAULT_ROOT, SageMakerPaths

CONTAINER_PATHS = SageMakerPaths(Path(DEFAULT_ROOT))
"""The training container's folders, where SageMaker puts them."""


@dataclass(frozen=True)
class WorkflowSettings:
    """What the definition needs from the deployment's configuration."""

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
    """Instance types whose training volume is an EBS volume that takes the stack's key
    (``infra.instances.volume_kms_instance_types``); every other type gets no VolumeKmsKeyId."""
