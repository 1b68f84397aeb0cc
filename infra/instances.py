"""GPUs per SageMaker training instance type. Standard library only: the staging Lambda checks the
batch arithmetic of a run against it before any instance starts."""

from __future__ import annotations

import re

INSTANCE_TYPE = re.compile(r"^ml\.[a-z0-9]+\.[0-9]*x?large$")
"""What a SageMaker training instance type looks like (the deployment config, the staging step and
the execution input schema all check against it)."""

GPUS = {
    "ml.p5.48xlarge": 8, "ml.p5e.48xlarge": 8, "ml.p5en.48xlarge": 8,
    "ml.p4d.24xlarge": 8, "ml.p4de.24xlarge": 8,
    "ml.p3dn.24xlarge": 8, "ml.p3.16xlarge": 8, "ml.p3.8xlarge": 4, "ml.p3.2xlarge": 1,
    "ml.g6e.48xlarge": 8, "ml.g6e.24xlarge": 4, "ml.g6e.12xlarge": 4,
    "ml.g6e.16xlarge": 1, "ml.g6e.8xlarge": 1, "ml.g6e.4xlarge": 1, "ml.g6e.2xlarge": 1, "ml.g6e.xlarge": 1,
    "ml.g6.48xlarge": 8, "ml.g6.24xlarge": 4, "ml.g6.12xlarge": 4,
    "ml.g6.16xlarge": 1, "ml.g6.8xlarge": 1, "ml.g6.4xlarge": 1, "ml.g6.2xlarge": 1, "ml.g6.xlarge": 1,
    "ml.g5.48xlarge": 8, "ml.g5.24xlarge": 4, "ml.g5.12xlarge": 4,
    "ml.g5.16xlarge": 1, "ml.g5.8xlarge": 1, "ml.g5.4xlarge": 1, "ml.g5.2xlarge": 1, "ml.g5.xlarge": 1,
    "ml.g4dn.12xlarge": 4, "ml.g4dn.16xlarge": 1, "ml.g4dn.8xlarge": 1, "ml.g4dn.4xlarge": 1,
    "ml.g4dn.2xlarge": 1, "ml.g4dn.xlarge": 1,
}
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
