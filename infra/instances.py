"""GPUs per SageMaker training instance type, from the one table of them (``ftstack.instances``).
No third-party import: the staging Lambda checks the batch arithmetic of a run against it before
any instance starts."""

from __future__ import annotations

import re

from ftstack.instances import INSTANCE_TYPES

INSTANCE_TYPE = re.compile(r"^ml\.[a-z0-9]+\.[0-9]*x?large$")
"""What a SageMaker training instance type looks like (the deployment config, the staging step and
the execution input schema all check against it)."""

GPUS = {name: t.gpus for name, t in INSTANCE_TYPES.items()}
"""Instance types missing here are not checked in advance; the job's launcher checks at start."""


def gpus(instance_type: str) -> int | None:
    """The GPU count of ``instance_type``, or None when it is not known here."""
    return GPUS.get(instance_type)


def volume_kms_instance_types(extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The known instance types (``GPUS`` and ``extra``) whose training volume takes a KMS key,
    by sagemaker-core's own rule (``instance_supports_kms``): types with local NVMe storage
    (p4d, p5, g5, g6, ...) have none, and CreateTrainingJob rejects VolumeKmsKeyId for them.
    Called at synth only; the staging Lambda never imports sagemaker-core."""
    from sagemaker.core.common_utils import instance_supports_kms

    return tuple(sorted(t for t in {*GPUS, *extra} if instance_supports_kms(t)))
