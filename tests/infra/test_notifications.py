"""The Notifications construct: an SSE-KMS, TLS-only topic with e-mail subscribers, on a bare stack."""

from __future__ import annotations

import aws_cdk as cdk
import pytest
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk.assertions import Match, Template

from ftstack.infra.notifications import Notifications

EMAILS = ("ops@example.com", "ml-team@example.org")


@pytest.fixture(scope="module")
def built(new_stack):
    app, stack = new_stack("Notify")
    key = kms.Key(stack, "Key", enable_key_rotation=True)
    notifications = Notifications(stack, "Notifications", key=key, emails=EMAILS)
    # What the workflow's role will do; shows that the grant covers the key too.
    role = iam.Role(stack, "Publisher", assumed_by=iam.ServicePrincipal("states.amazonaws.com"))
    notifications.topic.grant_publish(role)
    cdk.Validations.of(role).acknowledge(cdk.Acknowledgment(
        id="AwsSolutions-IAM5[Action::kms:GenerateDataKey*]",
        reason="Test scaffolding: the key-usage action pattern that grant_publish generates for an encrypted topic.",
    ))
    _, empty = new_stack("NoEmails", app)
    Notifications(empty, "Notifications", key=kms.Key(empty, "Key", enable_key_rotation=True), emails=[])
    return app, Template.from_stack(stack), Template.from_stack(empty)


@pytest.fixture(scope="module")
def template(built):
    return built[1]


def key_id(template: Template) -> str:
    (key,) = template.find_resources("AWS::KMS::Key")
    return key


def test_topic_is_encrypted_with_the_key(template):
    template.resource_count_is("AWS::SNS::Topic", 1)
    template.has_resource_properties("AWS::SNS::Topic", {
        "KmsMasterKeyId": {"Fn::GetAtt": [key_id(template), "Arn"]},
        "DisplayName": "Notify fine-tuning",
    })


def test_topic_only_accepts_publishes_over_tls(template):
    (topic,) = template.find_resources("AWS::SNS::Topic")
    template.has_resource_properties("AWS::SNS::TopicPolicy", {
        "Topics": [{"Ref": topic}],
        "PolicyDocument": {"Statement": Match.array_with([Match.object_like({
            "Effect": "Deny", "Action": "sns:Publish", "Principal": "*",
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        })])},
    })


def test_one_email_subscription_per_address(template):
    (topic,) = template.find_resources("AWS::SNS::Topic")
    template.resource_count_is("AWS::SNS::Subscription", len(EMAILS))
    for email in EMAILS:
        template.has_resource_properties("AWS::SNS::Subscription", {
            "Protocol": "email", "Endpoint": email, "TopicArn": {"Ref": topic},
        })


def test_no_addresses_no_subscriptions(built):
    empty = built[2]
    empty.resource_count_is("AWS::SNS::Topic", 1)
    empty.resource_count_is("AWS::SNS::Subscription", 0)


def test_grant_publish_covers_the_key(template):
    (topic,) = template.find_resources("AWS::SNS::Topic")
    template.has_resource_properties("AWS::IAM::Policy", {"PolicyDocument": {"Statement": Match.array_with([
        Match.object_like({"Effect": "Allow", "Action": "sns:Publish", "Resource": {"Ref": topic}}),
        Match.object_like({"Effect": "Allow", "Action": ["kms:Decrypt", "kms:GenerateDataKey*"],
                           "Resource": {"Fn::GetAtt": [key_id(template), "Arn"]}}),
    ])}})


def test_no_unacknowledged_cdk_nag_findings(built, nag_findings):
    assert nag_findings(built[0]) == []
