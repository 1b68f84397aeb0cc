"""The stack's KMS key against every service that uses it, on the synthesized app.

KMS allows a call only if the key policy does, directly or by delegating to IAM through the
account's root statement. AWS services that call KMS as their own service principal (CloudWatch
Logs for an encrypted log group, EventBridge or CloudWatch alarms publishing to an encrypted topic)
can only be allowed by the key policy; roles are allowed by their IAM policies. Each test below
asks the synthesized policies the question KMS will ask, with the principal, action and
encryption context that the service sends.
"""

from __future__ import annotations

import pytest
from iam_model import ACCOUNT, allows, as_list, of_type, resolved_resources, role_statements

# The calls CloudWatch Logs makes on the key of a log group ("Encrypt log data in CloudWatch Logs
# using AWS KMS": it associates, encrypts new events, decrypts on read, re-encrypts on rotation).
LOGS_CALLS = ("kms:DescribeKey", "kms:GenerateDataKey", "kms:Encrypt", "kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo")


@pytest.fixture(scope="module")
def resources(synthesized) -> dict[str, dict]:
    _, stack, template, _ = synthesized
    return resolved_resources(stack, template)


@pytest.fixture(scope="module")
def stack(synthesized):
    return synthesized[1]


@pytest.fixture(scope="module")
def key(resources) -> tuple[str, list[dict]]:
    """``(key ARN placeholder, key policy statements)`` of the stack's only KMS key."""
    ((key_id, resource),) = of_type(resources, "AWS::KMS::Key").items()
    return f"<{key_id}.Arn>", resource["Properties"]["KeyPolicy"]["Statement"]


# ---------------------------------------------------------------------------------------------
# The key policy itself
# ---------------------------------------------------------------------------------------------

def test_the_key_policy_delegates_to_iam_and_names_no_one_else(key):
    """The account root statement lets IAM policies of the account's roles use the key (S3,
    SageMaker, SNS publishers, the Lambda); every other statement is for an AWS service."""
    _, statements = key
    root = f"arn:aws:iam::{ACCOUNT}:root"
    assert allows(statements, "kms:*", "*", principal=("AWS", root))
    for statement in statements:
        principal = statement["Principal"]
        assert principal != "*" and set(principal) <= {"AWS", "Service"}, statement
        assert as_list(principal.get("AWS", [])) in ([], [root]), statement


# ---------------------------------------------------------------------------------------------
# CloudWatch Logs: the state machine's, the staging Lambda's and the job reaper's log groups
# ---------------------------------------------------------------------------------------------

def encrypted_log_group_arns(resources: dict, key_arn: str, stack) -> dict[str, str]:
    """Each log group encrypted with the key and the ARN CloudWatch Logs will put in the
    encryption context: its own name, or the name CloudFormation generates for it
    (``<stack>-<logical id>-<random>``, e.g. in aws-cdk issue 28304)."""
    arns = {}
    for logical_id, group in of_type(resources, "AWS::Logs::LogGroup").items():
        if group["Properties"].get("KmsKeyId") == key_arn:
            name = group["Properties"].get("LogGroupName", f"{stack.stack_name}-{logical_id}-1A2B3C4D5E6F")
            arns[logical_id] = f"arn:aws:logs:{stack.region}:{ACCOUNT}:log-group:{name}"
    return arns


def test_every_log_group_is_encrypted_with_the_key(resources, key, stack):
    key_arn, _ = key
    groups = encrypted_log_group_arns(resources, key_arn, stack)
    assert sorted(g.rstrip("0123456789ABCDEF") for g in groups) == [
        "DeployOnApprovalLogs", "JobReaperLogs", "ModelCheckLogs", "StagingLogs", "WorkflowLogs"]
    assert len(of_type(resources, "AWS::Logs::LogGroup")) == len(groups), "every log group of the stack is encrypted"


@pytest.mark.parametrize("action", LOGS_CALLS)
def test_cloudwatch_logs_may_use_the_key_for_the_stacks_log_groups(resources, key, stack, action):
    key_arn, statements = key
    logs = ("Service", f"logs.{stack.region}.amazonaws.com")
    for logical_id, arn in encrypted_log_group_arns(resources, key_arn, stack).items():
        assert allows(statements, action, "*", principal=logs, context={"kms:EncryptionContext:aws:logs:arn": arn}), (
            f"{logical_id}: the key policy does not let CloudWatch Logs call {action} for {arn}: "
            "creating the log group fails and the stack rolls back (aws-cdk issue 28304)")


def test_cloudwatch_logs_may_use_the_key_only_for_log_groups_of_this_account_and_region(key, stack):
    _, statements = key
    logs = ("Service", f"logs.{stack.region}.amazonaws.com")
    context = "kms:EncryptionContext:aws:logs:arn"
    elsewhere = [f"arn:aws:logs:{stack.region}:210987654321:log-group:theirs",
                 f"arn:aws:logs:eu-central-1:{ACCOUNT}:log-group:{stack.stack_name}-x"]
    for arn in elsewhere:
        assert not allows(statements, "kms:Decrypt", "*", principal=logs, context={context: arn}), arn
    assert not allows(statements, "kms:Decrypt", "*", principal=logs), "a request without the log group's context"
    assert not allows(statements, "kms:Decrypt", "*", principal=("Service", "logs.eu-central-1.amazonaws.com"),
                      context={context: f"arn:aws:logs:eu-central-1:{ACCOUNT}:log-group:x"})


def test_cloudwatch_logs_gets_no_more_than_the_documented_actions(key):
    _, statements = key
    for statement in statements:
        services = as_list(statement["Principal"].get("Service", []))
        if any(s.startswith("logs.") for s in services):
            assert sorted(as_list(statement["Action"])) == sorted(
                ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"])
            assert not allows([statement], "kms:CreateGrant", "*", principal=("Service", services[0]),
                              context={"kms:EncryptionContext:aws:logs:arn": "arn:aws:logs:x"})


# ---------------------------------------------------------------------------------------------
# SNS: who publishes to the encrypted topic
# ---------------------------------------------------------------------------------------------

def encrypted_topics(resources: dict, key_arn: str) -> list[str]:
    return [f"<{k}>" for k, v in of_type(resources, "AWS::SNS::Topic").items() if v["Properties"].get("KmsMasterKeyId") == key_arn]


def service_publishers(resources: dict, topic: str) -> set[str]:
    """AWS service principals that publish to ``topic`` themselves: EventBridge targets,
    CloudWatch alarm actions and topic-policy grants to a service."""
    services = set()
    for rule in of_type(resources, "AWS::Events::Rule").values():
        if any(t.get("Arn") == topic for t in rule["Properties"].get("Targets", [])):
            services.add("events.amazonaws.com")
    for alarm in of_type(resources, "AWS::CloudWatch::Alarm").values():
        props = alarm["Properties"]
        if topic in props.get("AlarmActions", []) + props.get("OKActions", []) + props.get("InsufficientDataActions", []):
            services.add("cloudwatch.amazonaws.com")
    for policy in of_type(resources, "AWS::SNS::TopicPolicy").values():
        if topic in policy["Properties"]["Topics"]:
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
                if statement["Effect"] == "Allow" and isinstance(statement["Principal"], dict):
                    services.update(as_list(statement["Principal"].get("Service", [])))
    return services


def test_the_topic_is_encrypted_with_the_key(resources, key):
    assert len(encrypted_topics(resources, key[0])) == 1


def test_every_aws_service_that_publishes_to_the_topic_may_use_the_key(resources, key):
    """An AWS service publishing to an encrypted topic calls KMS as itself: only the key policy can
    allow it. Today no service publishes (only the state machine's role, through IAM)."""
    key_arn, statements = key
    for topic in encrypted_topics(resources, key_arn):
        for service in service_publishers(resources, topic):
            for action in ("kms:GenerateDataKey", "kms:Decrypt"):
                assert allows(statements, action, "*", principal=("Service", service)), f"{service} publishes to {topic}"


def test_every_role_that_publishes_to_the_topic_may_encrypt_with_the_key(resources, key):
    key_arn, _ = key
    (topic,) = encrypted_topics(resources, key_arn)
    publishers = [r for r in of_type(resources, "AWS::IAM::Role") if allows(role_statements(resources, r), "sns:Publish", topic)]
    assert sorted(p.rstrip("0123456789ABCDEF") for p in publishers) == ["DeployOnApprovalRole", "WorkflowRole"]
    for role in publishers:
        for action in ("kms:GenerateDataKey", "kms:Decrypt"):
            assert allows(role_statements(resources, role), action, key_arn), (role, action)


# ---------------------------------------------------------------------------------------------
# S3: SSE-KMS with a bucket key; every role that reads or writes objects needs the key too
# ---------------------------------------------------------------------------------------------

def test_the_data_bucket_uses_the_key_with_a_bucket_key(resources, key):
    key_arn, _ = key
    rules = [v["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
             for v in of_type(resources, "AWS::S3::Bucket").values()]
    assert {"BucketKeyEnabled": True, "ServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_arn}} in rules


@pytest.mark.parametrize("s3_action, kms_actions", [
    ("s3:GetObject", ["kms:Decrypt"]),
    # PutObject with SSE-KMS asks for a data key; a multipart upload also decrypts it per part.
    ("s3:PutObject", ["kms:GenerateDataKey", "kms:Decrypt"]),
])
def test_every_role_that_uses_objects_of_the_bucket_may_use_the_key(resources, key, s3_action, kms_actions):
    key_arn, _ = key
    (bucket,) = [k for k, v in of_type(resources, "AWS::S3::Bucket").items()
                 if v["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"].get("KMSMasterKeyID") == key_arn]
    users = []
    for role in of_type(resources, "AWS::IAM::Role"):
        statements = role_statements(resources, role)
        granted = {r for s in statements if s["Effect"] == "Allow" for r in as_list(s["Resource"]) if str(r).startswith(f"<{bucket}.Arn>/")}
        if any(allows(statements, s3_action, resource) for resource in granted):
            users.append(role)
            for action in kms_actions:
                assert allows(statements, action, key_arn), f"{role} may {s3_action} but not {action} on the bucket's key"
    assert users, f"no role may {s3_action}: the test would check nothing"


# ---------------------------------------------------------------------------------------------
# SageMaker: the training volume (VolumeKmsKeyId) and the model output (OutputDataConfig.KmsKeyId)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("role", "actions"), [
    # The job's execution role encrypts the output: kms:Encrypt per OutputDataConfig.KmsKeyId's documentation.
    ("TrainingRole", ("kms:DescribeKey", "kms:GenerateDataKey", "kms:Decrypt", "kms:Encrypt")),
    # The caller of CreateTrainingJob; it also reads the final metrics and publishes to the encrypted topic.
    ("WorkflowRole", ("kms:DescribeKey", "kms:GenerateDataKey", "kms:Decrypt")),
], ids=["training role", "state machine role"])
def test_sagemaker_callers_may_use_the_key_and_create_grants_only_for_aws_resources(resources, key, role, actions):
    """SageMaker creates grants on the key for the job's volume, with the caller's and the
    execution role's permissions: only grants for AWS resources. No role may re-encrypt."""
    key_arn, _ = key
    (role_id,) = [r for r in of_type(resources, "AWS::IAM::Role") if r.startswith(role)]
    statements = role_statements(resources, role_id)
    for action in actions:
        assert allows(statements, action, key_arn), action
    for action in ("kms:ReEncryptFrom", "kms:ReEncryptTo", *({"kms:Encrypt"} - set(actions))):
        assert not allows(statements, action, key_arn), action
    assert allows(statements, "kms:CreateGrant", key_arn, context={"kms:GrantIsForAWSResource": "true"})
    assert not allows(statements, "kms:CreateGrant", key_arn, context={"kms:GrantIsForAWSResource": "false"}), (
        "kms:CreateGrant needs the condition Bool kms:GrantIsForAWSResource = true")
    assert not allows(statements, "kms:CreateGrant", key_arn)


# ---------------------------------------------------------------------------------------------
# Lambda: the staging function
# ---------------------------------------------------------------------------------------------

def test_lambda_environment_is_not_encrypted_with_the_key(resources, key):
    """The functions' environment (bucket name and deployment settings, no secrets) is encrypted
    with Lambda's AWS managed key, so Lambda itself never calls KMS on the stack's key. The staging
    role uses the key only through S3 (checked above) and its log group through CloudWatch Logs."""
    functions = of_type(resources, "AWS::Lambda::Function")
    assert functions
    for logical_id, function in functions.items():
        assert "KmsKeyArn" not in function["Properties"], logical_id
    key_arn, statements = key
    assert not any(as_list(s["Principal"].get("Service", [])) == ["lambda.amazonaws.com"] for s in statements)
