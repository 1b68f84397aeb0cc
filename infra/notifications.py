"""The run notifications: one SNS topic, encrypted with the stack's key, with e-mail subscribers."""

from __future__ import annotations

from collections.abc import Sequence

import aws_cdk as cdk
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from constructs import Construct


class Notifications(Construct):
    """An SSE-KMS topic that only accepts publishes over TLS, and one e-mail subscription per address.

    Publishers get access with ``topic.grant_publish(role)``, which also grants ``kms:GenerateDataKey*``
    and ``kms:Decrypt`` on the key. E-mail delivery needs no key policy for SNS itself; an AWS service
    principal that publishes directly (EventBridge, CloudWatch alarms) needs a key policy statement.
    """

    def __init__(self, scope: Construct, construct_id: str, *, key: kms.IKey, emails: Sequence[str],
                 name: str | None = None, topic: sns.ITopic | None = None) -> None:
        """``topic``: a brought topic, which gets the subscriptions; ``name``: the pipeline's (the
        stack's by default), shown as the created topic's display name."""
        super().__init__(scope, construct_id)
        self.topic = topic or sns.Topic(
            self,
            "Topic",
            display_name=f"{name or cdk.Stack.of(self).stack_name} fine-tuning",
            master_key=key,
            enforce_ssl=True,
        )
        for email in emails:
            self.topic.add_subscription(subscriptions.EmailSubscription(email))
