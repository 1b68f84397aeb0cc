"""The Storage construct: key, data bucket and access-log bucket, on bare stacks."""

from __future__ import annotations

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Match, Template

from ftstack.infra import layout, storage
from ftstack.infra.storage import Storage, scratch_days_for

BLOCK_ALL = {"BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True}


@pytest.fixture(scope="module")
def built(new_stack):
    """One app with a retaining stack (default scratch_days) and a destroying one (7 days)."""
    app, retain = new_stack("Retain")
    _, destroy = new_stack("Destroy", app)
    Storage(retain, "Storage", removal_policy=cdk.RemovalPolicy.RETAIN)
    Storage(destroy, "Storage", removal_policy=cdk.RemovalPolicy.DESTROY, scratch_days=7)
    return app, {"retain": Template.from_stack(retain), "destroy": Template.from_stack(destroy)}


@pytest.fixture(scope="module")
def templates(built):
    return built[1]


def only(resources: dict) -> str:
    """The logical id of the single resource found (looked up, never hard-coded)."""
    assert len(resources) == 1, resources
    return next(iter(resources))


def encrypted_with(algorithm: str) -> dict:
    by_default = Match.object_like({"ServerSideEncryptionByDefault": Match.object_like({"SSEAlgorithm": algorithm})})
    return {"Properties": {"BucketEncryption": {"ServerSideEncryptionConfiguration": [by_default]}}}


def bucket_ids(template: Template) -> tuple[str, str]:
    """(data bucket, access-log bucket), told apart by their encryption."""
    data = only(template.find_resources("AWS::S3::Bucket", encrypted_with("aws:kms")))
    logs = only(template.find_resources("AWS::S3::Bucket", encrypted_with("AES256")))
    return data, logs


def lifecycle_rules(template: Template, bucket_id: str) -> list[dict]:
    return template.to_json()["Resources"][bucket_id]["Properties"]["LifecycleConfiguration"]["Rules"]


def test_prefixes_are_the_layout_ones():
    assert (storage.INCOMING, storage.EXECUTIONS, storage.SCRATCH) == (layout.INCOMING, layout.EXECUTIONS, layout.SCRATCH)
    assert (storage.INCOMING, storage.EXECUTIONS, storage.SCRATCH) == ("incoming/", "executions/", "scratch/")


def test_key_rotates_has_an_alias_and_is_always_retained(templates):
    for name, template in templates.items():
        template.resource_count_is("AWS::KMS::Key", 1)
        template.has_resource("AWS::KMS::Key", {
            "Properties": Match.object_like({"EnableKeyRotation": True, "Description": Match.string_like_regexp("data bucket")}),
            "DeletionPolicy": "Retain", "UpdateReplacePolicy": "Retain",
        })
        key = only(template.find_resources("AWS::KMS::Key"))
        template.has_resource_properties("AWS::KMS::Alias", {
            "AliasName": f"alias/{name.capitalize()}/data", "TargetKeyId": {"Fn::GetAtt": [key, "Arn"]},
        })


def test_data_bucket_is_encrypted_with_the_key_and_a_bucket_key(templates):
    template = templates["retain"]
    key = only(template.find_resources("AWS::KMS::Key"))
    template.has_resource_properties("AWS::S3::Bucket", {"BucketEncryption": {"ServerSideEncryptionConfiguration": [{
        "BucketKeyEnabled": True,
        "ServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": {"Fn::GetAtt": [key, "Arn"]}},
    }]}})


def test_access_log_bucket_uses_s3_managed_encryption(templates):
    templates["retain"].has_resource_properties("AWS::S3::Bucket", {"BucketEncryption": {
        "ServerSideEncryptionConfiguration": [{"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]}})


def test_both_buckets_block_public_access_disable_acls_and_are_versioned(templates):
    template = templates["retain"]
    template.resource_count_is("AWS::S3::Bucket", 2)
    template.resource_properties_count_is("AWS::S3::Bucket", {"PublicAccessBlockConfiguration": BLOCK_ALL}, 2)
    template.resource_properties_count_is("AWS::S3::Bucket", {"VersioningConfiguration": {"Status": "Enabled"}}, 2)
    template.resource_properties_count_is(
        "AWS::S3::Bucket", {"OwnershipControls": {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}}, 2
    )


def test_both_buckets_deny_requests_without_tls(templates):
    template = templates["retain"]
    for bucket in bucket_ids(template):
        template.has_resource_properties("AWS::S3::BucketPolicy", {
            "Bucket": {"Ref": bucket},
            "PolicyDocument": {"Statement": Match.array_with([Match.object_like({
                "Effect": "Deny", "Action": "s3:*", "Principal": {"AWS": "*"},
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            })])},
        })


def test_data_bucket_logs_to_the_log_bucket_through_a_bucket_policy(templates):
    template = templates["retain"]
    data, logs = bucket_ids(template)
    template.has_resource_properties("AWS::S3::Bucket", {
        "LoggingConfiguration": {"DestinationBucketName": {"Ref": logs}, "LogFilePrefix": "bucket/"},
    })
    template.has_resource_properties("AWS::S3::BucketPolicy", {
        "Bucket": {"Ref": logs},
        "PolicyDocument": {"Statement": Match.array_with([Match.object_like({
            "Effect": "Allow", "Action": "s3:PutObject", "Principal": {"Service": "logging.s3.amazonaws.com"},
            "Condition": Match.object_like({"ArnLike": {"aws:SourceArn": {"Fn::GetAtt": [data, "Arn"]}}}),
        })])},
    })
    assert "LoggingConfiguration" not in template.to_json()["Resources"][logs]["Properties"]


@pytest.mark.parametrize("name, days", [("retain", 14), ("destroy", 7)])
def test_scratch_expires_after_scratch_days(templates, name, days):
    templates[name].has_resource_properties("AWS::S3::Bucket", {"LifecycleConfiguration": {"Rules": Match.array_with([
        {"Id": "ExpireScratch", "Prefix": "scratch/", "ExpirationInDays": days, "Status": "Enabled"},
    ])}})


def test_noncurrent_versions_and_incomplete_uploads_are_cleaned_up(templates):
    templates["retain"].has_resource_properties("AWS::S3::Bucket", {"LifecycleConfiguration": {"Rules": Match.array_with([
        {"Id": "ExpireNoncurrentVersions", "NoncurrentVersionExpiration": {"NoncurrentDays": 30},
         "ExpiredObjectDeleteMarker": True, "Status": "Enabled"},
        {"Id": "AbortIncompleteUploads", "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7}, "Status": "Enabled"},
    ])}})


def test_only_scratch_expires_in_the_data_bucket(templates):
    template = templates["retain"]
    data, _ = bucket_ids(template)
    rules = lifecycle_rules(template, data)
    expiring = [rule for rule in rules if {"ExpirationInDays", "ExpirationDate", "Transitions"} & rule.keys()]
    assert [rule.get("Prefix") for rule in expiring] == ["scratch/"]
    assert not any("Filter" in rule for rule in rules)


def test_access_logs_expire_after_a_year(templates):
    templates["retain"].has_resource_properties("AWS::S3::Bucket", {"LifecycleConfiguration": {"Rules": [{
        "Id": "ExpireAccessLogs", "ExpirationInDays": 365, "NoncurrentVersionExpiration": {"NoncurrentDays": 30},
        "Status": "Enabled",
    }]}})


@pytest.mark.parametrize("name", ["retain", "destroy"])
def test_data_bucket_is_always_retained_and_never_emptied(templates, name):
    template = templates[name]
    data, _ = bucket_ids(template)
    resource = template.to_json()["Resources"][data]
    assert (resource["DeletionPolicy"], resource["UpdateReplacePolicy"]) == ("Retain", "Retain")
    assert "Tags" not in resource["Properties"]  # aws-cdk:auto-delete-objects would be tagged here
    template.resource_properties_count_is("Custom::S3AutoDeleteObjects", {"BucketName": {"Ref": data}}, 0)


def test_access_log_bucket_follows_the_removal_policy(templates):
    retain, destroy = templates["retain"], templates["destroy"]
    _, logs = bucket_ids(retain)
    assert retain.to_json()["Resources"][logs]["DeletionPolicy"] == "Retain"
    retain.resource_count_is("Custom::S3AutoDeleteObjects", 0)
    _, logs = bucket_ids(destroy)
    assert destroy.to_json()["Resources"][logs]["DeletionPolicy"] == "Delete"
    # A deleted bucket must be empty: DESTROY empties the log bucket first.
    destroy.has_resource_properties("Custom::S3AutoDeleteObjects", {"BucketName": {"Ref": logs}})
    destroy.resource_count_is("Custom::S3AutoDeleteObjects", 1)


def test_scratch_days_must_be_positive(new_stack):
    _, stack = new_stack()
    with pytest.raises(ValueError, match="scratch_days"):
        Storage(stack, "Storage", removal_policy=cdk.RemovalPolicy.RETAIN, scratch_days=0)


def test_no_unacknowledged_cdk_nag_findings(built, nag_findings):
    app, _ = built
    assert nag_findings(app) == []


def test_cloudwatch_logs_of_the_region_may_use_the_key_for_log_groups_of_the_account():
    """The statement that lets CloudWatch Logs encrypt the stack's log groups (the whole app is
    checked against every service using the key in test_key_policy.py)."""
    stack = cdk.Stack(cdk.App(), "West", env=cdk.Environment(account="123456789012", region="eu-west-1"))
    Storage(stack, "Storage", removal_policy=cdk.RemovalPolicy.RETAIN)
    (key,) = Template.from_stack(stack).find_resources("AWS::KMS::Key").values()
    (logs,) = [s for s in key["Properties"]["KeyPolicy"]["Statement"] if "Service" in s["Principal"]]
    assert logs["Principal"] == {"Service": {"Fn::Join": ["", ["logs.eu-west-1.", {"Ref": "AWS::URLSuffix"}]]}}
    assert sorted(logs["Action"]) == sorted(storage.LOGS_KEY_ACTIONS) and logs["Resource"] == "*"
    assert logs["Condition"] == {"ArnLike": {"kms:EncryptionContext:aws:logs:arn": {"Fn::Join": ["", [
        "arn:", {"Ref": "AWS::Partition"}, ":logs:eu-west-1:123456789012:log-group:*"]]}}}


@pytest.mark.parametrize(("hours", "days"), [(24, 14), (48, 14), (7 * 24, 14), (8 * 24, 15), (672, 35), (672.5, 36)])
def test_scratch_outlives_the_longest_job_and_a_week_to_resume(hours, days):
    # Issue 11, item 6: scratch expired after 14 days while a spot job could wait and run longer.
    assert scratch_days_for(hours) == days
