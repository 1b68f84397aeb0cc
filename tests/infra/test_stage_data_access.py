"""Staging with the narrow listing grant: S3 answers HeadObject on a missing key with 403 when the
caller's s3:ListBucket does not cover the request, which the staging role's prefix-conditioned
grant may not; the user still gets a message naming the file and the fix, not AccessDenied."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber
from staging_samples import BUCKET, staging_settings

from ftstack.infra.stage_data import handler
from ftstack.infra.stage_data.request import InvalidInput, check_input


@pytest.mark.parametrize("code", ["403", "AccessDenied"])
def test_a_forbidden_head_names_the_file_and_the_fix(code):
    s3 = boto3.client("s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    request = check_input({"train_data": f"s3://{BUCKET}/incoming/missing.jsonl"}, staging_settings())
    with Stubber(s3) as stub:
        stub.add_client_error("head_object", service_error_code=code, http_status_code=403,
                              expected_params={"Bucket": BUCKET, "Key": "incoming/missing.jsonl"})
        with pytest.raises(InvalidInput) as error:
            handler._check_objects(s3, staging_settings(), request)
    assert str(error.value).startswith(f"train_data: s3://{BUCKET}/incoming/missing.jsonl: S3 refused it (403): it does "
                                       "not exist, or it is encrypted with a KMS key other than the stack's")
