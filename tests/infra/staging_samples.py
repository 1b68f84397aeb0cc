"""The staging function's settings as the infrastructure tests use them: one set of values, each
test overriding only what it is about."""

from __future__ import annotations

import json
from typing import Any

from ftstack.infra.stage_data.request import Settings

BUCKET = "ftstack-bucket"
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
"""A key ARN of the shape KMS gives (the tests check requests against SageMaker's patterns)."""


def staging_values(**overrides: Any) -> dict[str, Any]:
    """The ``SETTINGS`` variable's values (JSON types), as the stack writes them."""
    return {
        "job_prefix": "ftstack", "instance_type": "ml.p4d.24xlarge", "fallback_instance_types": ["ml.g5.48xlarge"],
        "instance_count": 1, "max_instance_count": 4, "spot": False, "base_model": "mosaicml/mpt-7b", "test_split": 0.05,
        "key_arn": KEY_ARN, "offline": False, "prefix": "",
        # What the infrastructure tests ask for; test_allowed_instance_types checks the refusal.
        "allowed_instance_types": ["ml.p4d.24xlarge", "ml.g5.48xlarge", "ml.g5.12xlarge", "ml.p5.48xlarge",
                                   "ml.p3.16xlarge", "ml.trn9.48xlarge"],
    } | overrides


def staging_settings(bucket: str = BUCKET, **overrides: Any) -> Settings:
    """The settings the function reads from its environment."""
    return Settings.from_env({"BUCKET": bucket, "SETTINGS": json.dumps(staging_values(**overrides))})
