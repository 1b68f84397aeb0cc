"""Every role of the synthesized app, statement by statement: what each may do to the bucket, the
key and SageMaker, and what none of them may do (issue 11, items 4 and 5). The questions are the
ones S3, KMS and SageMaker will ask, answered by the policies as synthesized (``iam_model``)."""

from __future__ import annotations

import pytest
from iam_model import ACCOUNT, allows, as_list, of_type, resolved_resources, role_statements

ROLES = {"training": "TrainingRole", "workflow": "WorkflowRole", "staging": "StagingRole", "reaper": "JobReaperRole",
         "serving": "ServingRole", "deploy": "DeployOnApprovalRole", "model_check": "ModelCheckRole",
         "deploy_events": "DeployOnApprovalEventsRole"}
"""Each role of the stack by the start of its logical id."""

REGION = "us-east-1"
JOB = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/ftstack--run1-0a1b2c3d-a0"
MODEL = "executions/run1/model/ftstack--run1-0a1b2c3d-a0/output/model/"
METRICS = f"{MODEL}final-metrics.json"
WEIGHTS = f"{MODEL}model.safetensors"


@pytest.fixture(scope="module")
def resources(synthesized) -> dict[str, dict]:
    _, stack, template, _ = synthesized
    return resolved_resources(stack, template)


@pytest.fixture(scope="module")
def policies(resources) -> dict[str, list[dict]]:
    """Each role's statements, by the short names of ROLES."""
    found = {}
    for name, start in ROLES.items():
        (role_id,) = [k for k in of_type(resources, "AWS::IAM::Role") if k.startswith(start)]
        found[name] = role_statements(resources, role_id)
    return found


@pytest.fixture(scope="module")
def bucket(resources) -> str:
    """The data bucket's ARN placeholder (the access-log bucket is the one without a KMS key)."""
    (bucket_id,) = [k for k, v in of_type(resources, "AWS::S3::Bucket").items()
                    if "KMSMasterKeyID" in str(v["Properties"]["BucketEncryption"])]
    return f"<{bucket_id}.Arn>"


@pytest.fixture(scope="module")
def key(resources) -> str:
    (key_id,) = of_type(resources, "AWS::KMS::Key")
    return f"<{key_id}.Arn>"


def test_every_role_of_the_stack_is_covered(resources):
    roles = set(of_type(resources, "AWS::IAM::Role"))
    covered = {r for r in roles if r.startswith(tuple(ROLES.values()))}
    # CDK's own helper roles (log retention, bucket auto-delete) would show up here.
    assert roles == covered, roles - covered


MAY = [
    ("training", "s3:GetObject", "scratch/run1/data/train/train.jsonl"),
    ("training", "s3:GetObject", "base-models/mpt-7b/model-00001-of-00002.safetensors"),
    ("training", "s3:GetObject", "scratch/run1/checkpoints/step-00000100/part-0.json"),
    ("training", "s3:PutObject", "scratch/run1/checkpoints/step-00000100/part-0.json"),
    ("training", "s3:DeleteObject", "scratch/run1/checkpoints/step-00000050/part-0.json"),
    ("training", "s3:PutObject", WEIGHTS),
    ("staging", "s3:GetObject", "incoming/train.jsonl"),
    ("staging", "s3:GetObject", "base-models/mpt-7b/config.json"),
    ("staging", "s3:PutObject", "scratch/run1/data/train/train.jsonl"),
    ("workflow", "s3:GetObject", METRICS),
    ("model_check", "s3:GetObject", f"{MODEL}model-manifest.json"),
]

MAY_NOT = [
    # A training job cannot touch the users' uploads, the staged data or the base models ...
    ("training", "s3:GetObject", "incoming/train.jsonl"),
    ("training", "s3:PutObject", "scratch/run2/data/train/train.jsonl"),
    ("training", "s3:DeleteObject", "scratch/run2/data/train/train.jsonl"),
    ("training", "s3:PutObject", "base-models/mpt-7b/model-00001-of-00002.safetensors"),
    ("training", "s3:PutObject", "incoming/train.jsonl"),
    # ... nor delete or read any execution's model (an overwrite leaves the old version, and the
    # package's manifest digest no longer matches).
    ("training", "s3:DeleteObject", WEIGHTS),
    ("training", "s3:GetObject", WEIGHTS),
    # Staging reads uploads and each model's config.json, and writes staged data only.
    ("staging", "s3:GetObject", "base-models/mpt-7b/model-00001-of-00002.safetensors"),
    ("staging", "s3:GetObject", "scratch/run1/checkpoints/step-00000100/part-0.json"),
    ("staging", "s3:PutObject", WEIGHTS),
    ("staging", "s3:PutObject", "scratch/run1/checkpoints/step-00000100/part-0.json"),
    ("staging", "s3:PutObject", "incoming/train.jsonl"),
    ("staging", "s3:DeleteObject", "incoming/train.jsonl"),
    # The workflow reads the final metrics, and nothing else of a model.
    ("workflow", "s3:GetObject", WEIGHTS),
    ("workflow", "s3:GetObject", "executions/run1/model/ftstack--run1-0a1b2c3d-a0/output/model/metrics.json"),
    ("workflow", "s3:GetObject", "scratch/run1/data/train/train.jsonl"),
    ("workflow", "s3:PutObject", METRICS),
    ("reaper", "s3:GetObject", METRICS),
    # The model check reads manifests, and no weights; it writes nothing.
    ("model_check", "s3:GetObject", WEIGHTS),
    ("model_check", "s3:GetObject", "scratch/run1/data/train/train.jsonl"),
    ("model_check", "s3:PutObject", f"{MODEL}model-manifest.json"),
    ("model_check", "s3:DeleteObject", WEIGHTS),
]


@pytest.mark.parametrize(("role", "action", "key_name"), MAY, ids=[f"{r} {a} {k}" for r, a, k in MAY])
def test_each_role_may_do_what_its_step_needs(policies, bucket, role, action, key_name):
    assert allows(policies[role], action, f"{bucket}/{key_name}")


@pytest.mark.parametrize(("role", "action", "key_name"), MAY_NOT, ids=[f"{r} {a} {k}" for r, a, k in MAY_NOT])
def test_no_role_may_touch_what_its_step_does_not_need(policies, bucket, role, action, key_name):
    assert not allows(policies[role], action, f"{bucket}/{key_name}")


@pytest.mark.parametrize("role", ROLES)
def test_no_role_may_delete_an_object_version_or_change_the_bucket(policies, bucket, role):
    for key_name in (WEIGHTS, METRICS, "scratch/run1/checkpoints/step-00000100/part-0.json",
                     "scratch/run1/data/train/train.jsonl", "incoming/train.jsonl"):
        for action in ("s3:DeleteObjectVersion", "s3:PutObjectVersionAcl", "s3:PutObjectRetention", "s3:BypassGovernanceRetention"):
            assert not allows(policies[role], action, f"{bucket}/{key_name}"), (action, key_name)
    for action in ("s3:PutBucketPolicy", "s3:PutLifecycleConfiguration", "s3:PutBucketVersioning", "s3:DeleteBucket",
                   "s3:GetBucketPolicy", "s3:GetBucketLocation"):
        assert not allows(policies[role], action, bucket), action


@pytest.mark.parametrize("role", ROLES)
def test_every_listing_is_limited_to_prefixes(policies, bucket, role):
    for statement in policies[role]:
        if any(a.lower().startswith("s3:list") for a in as_list(statement["Action"])):
            # Only the model check lists versions (ftstack.s3_model pins a model by them).
            assert statement["Action"] == ("s3:ListBucketVersions" if role == "model_check" else "s3:ListBucket"), statement
            assert set(statement["Condition"]) == {"StringLike"} and set(statement["Condition"]["StringLike"]) == {"s3:prefix"}
    for prefix in ("", "executions/", "scratch/"):  # the whole bucket, every model, every run's scratch
        for action in ("s3:ListBucket", "s3:ListBucketVersions"):
            assert not allows(policies[role], action, bucket, context={"s3:prefix": prefix}), (action, prefix)
            assert not allows(policies[role], action, bucket), f"{action} without a prefix"


def test_only_staging_reads_whether_the_bucket_keeps_versions(policies, bucket):
    for role, statements in policies.items():
        assert allows(statements, "s3:GetBucketVersioning", bucket) == (role == "staging"), role


def test_the_model_check_lists_the_versions_of_a_model_folder_only(policies, bucket):
    assert allows(policies["model_check"], "s3:ListBucketVersions", bucket, context={"s3:prefix": MODEL})
    for prefix in ("executions/run1/model/", "scratch/run1/", "incoming/", "base-models/mpt-7b/"):
        assert not allows(policies["model_check"], "s3:ListBucketVersions", bucket, context={"s3:prefix": prefix}), prefix
    assert not allows(policies["model_check"], "s3:ListBucket", bucket, context={"s3:prefix": MODEL})


@pytest.mark.parametrize(("role", "prefix"), [
    ("training", "scratch/run1/data/train/"), ("training", "scratch/run1/checkpoints/"), ("training", "scratch/run1/checkpoints"),
    ("training", "base-models/mpt-7b/"), ("training", "executions/run1/model/"),
    ("staging", "incoming/train.jsonl"), ("staging", "base-models/mpt-7b/config.json"), ("staging", "scratch/run0/checkpoints/"),
])
def test_sagemaker_and_staging_may_list_what_they_read(policies, bucket, role, prefix):
    assert allows(policies[role], "s3:ListBucket", bucket, context={"s3:prefix": prefix})


def test_no_role_may_re_encrypt_and_only_the_training_role_may_encrypt(policies, key):
    for role, statements in policies.items():
        for action in ("kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:CreateKey", "kms:ScheduleKeyDeletion", "kms:PutKeyPolicy"):
            assert not allows(statements, action, key), (role, action)
        # OutputDataConfig.KmsKeyId's documentation asks the training job's role for kms:Encrypt.
        assert allows(statements, "kms:Encrypt", key) == (role == "training"), role


def test_the_only_action_wildcard_is_the_topics_data_key(policies):
    wildcards = {a for statements in policies.values() for s in statements for a in as_list(s["Action"]) if "*" in a}
    assert wildcards == {"kms:GenerateDataKey*"}  # topic.grant_publish's; its resource is the key alone


@pytest.mark.parametrize(("types", "allowed"), [
    (["ml.p4d.24xlarge"], True), (["ml.g5.48xlarge"], True),
    (["ml.p5.48xlarge"], False), (["ml.p4d.24xlarge", "ml.p5.48xlarge"], False), (None, False),
])
def test_the_workflow_starts_jobs_on_the_allowed_instance_types_only(policies, types, allowed):
    context = {} if types is None else {"sagemaker:InstanceTypes": types}
    assert allows(policies["workflow"], "sagemaker:CreateTrainingJob", JOB, context=context) == allowed


def test_the_workflow_starts_only_this_stacks_jobs(policies):
    other_stack = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/ftstack-dev--run1-0a1b2c3d-a0"
    context = {"sagemaker:InstanceTypes": ["ml.p4d.24xlarge"]}
    assert not allows(policies["workflow"], "sagemaker:CreateTrainingJob", other_stack, context=context)
    assert not allows(policies["reaper"], "sagemaker:StopTrainingJob", other_stack)
    assert allows(policies["reaper"], "sagemaker:StopTrainingJob", JOB)


def test_service_trust_policies_carry_the_confused_deputy_conditions(resources):
    """SageMaker, Step Functions and EventBridge send aws:SourceAccount and aws:SourceArn when they
    assume a role (each service's "Cross-service confused deputy prevention" page); Lambda
    documents neither for its execution roles, so its roles trust lambda.amazonaws.com alone. The
    serving role is assumed for models and endpoints named at deploy time: the account only."""
    sources = {}
    for role_id, role in of_type(resources, "AWS::IAM::Role").items():
        trust = trust_of(role)
        service = trust["Principal"]["Service"]
        if service == "lambda.amazonaws.com":
            continue
        assert service in ("sagemaker.amazonaws.com", "states.amazonaws.com", "events.amazonaws.com"), role_id
        assert trust["Condition"]["StringEquals"] == {"aws:SourceAccount": ACCOUNT}, role_id
        if role_id.startswith(ROLES["serving"]):
            assert set(trust["Condition"]) == {"StringEquals"}, role_id
            continue
        assert set(trust["Condition"]["ArnLike"]) == {"aws:SourceArn"}, role_id
        sources[role_id.rstrip("0123456789ABCDEF")] = trust["Condition"]["ArnLike"]["aws:SourceArn"]
    assert sources == {
        "TrainingRole": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/ftstack--*",
        "WorkflowRole": f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:ftstack-workflow",
        "DeployOnApprovalRole": f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:ftstack-models-deploy",
        "DeployOnApprovalEventsRole": f"arn:aws:events:{REGION}:{ACCOUNT}:rule/ftstack-models-approved",
    }


def trust_of(role: dict) -> dict:
    (trust,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    return trust


def test_every_log_group_outlives_the_stack(resources):
    """The log groups are the audit trail: deleting the stack keeps them (their retention still applies)."""
    groups = of_type(resources, "AWS::Logs::LogGroup")
    assert groups
    for group_id, group in groups.items():
        assert (group.get("DeletionPolicy"), group.get("UpdateReplacePolicy")) == ("Retain", "Retain"), group_id
