"""Two teams' pipelines in one stack, on one brought bucket (and its key), in the folders
``team-a/`` and ``team-b/``: every role of each, statement by statement, keeps to its own folder,
jobs, roles, functions and executions (issue 10: "neither can touch the other's prefix").

The pipelines are named ``team`` and ``team-b``: one name is the start of the other, so a pattern
written as ``<name>*`` instead of ``<name>--*`` or ``<name>-workflow:*`` would let ``team`` reach
``team-b``'s jobs or executions, and these tests would say so."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import aws_cdk as cdk
import pytest
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk.assertions import Template

from ftstack.serving import resource_name

from ftstack.infra.options import TrainingOptions
from ftstack.infra.pipeline import FineTuningPipeline
from ftstack.infra.props import EcrImage, FineTuningPipelineProps

from conftest import TEST_ENV
from iam_model import ACCOUNT, allows, as_list, of_type, resolved_resources, role_statements

REGION = TEST_ENV.region
INFERENCE_IMAGE = f"763104351884.dkr.ecr.{REGION}.amazonaws.com/huggingface-vllm:0.29.0"
INSTANCE_TYPES = {"sagemaker:InstanceTypes": list(TrainingOptions().instance_types)}


@dataclass(frozen=True)
class Team:
    construct_id: str
    name: str
    prefix: str

    def job(self, execution: str = "run1") -> str:
        return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{self.name}--{execution}-0a1b2c3d-a0"

    def execution(self, execution: str = "run1") -> str:
        return f"arn:aws:states:{REGION}:{ACCOUNT}:execution:{self.name}-workflow:{execution}"

    @property
    def state_machine(self) -> str:
        return f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:{self.name}-workflow"


A = Team("TeamA", "team", "team-a/")
B = Team("TeamB", "team-b", "team-b/")
PAIRS = [(A, B), (B, A)]
PAIR_IDS = ["a-not-b", "b-not-a"]

JOB = "team--run1-0a1b2c3d-a0"
KEYS = (
    "incoming/train.jsonl",
    "incoming/nested/test.jsonl",
    "base-models/mpt-7b/config.json",
    "base-models/mpt-7b/model-00001-of-00002.safetensors",
    "scratch/run1/data/0a1b2c3d/train/train.jsonl",
    "scratch/run1/checkpoints/step-00000100/part-0.json",
    "executions/run1/model/team--run1-0a1b2c3d-a0/output/model/final-metrics.json",
    "executions/run1/model/team--run1-0a1b2c3d-a0/output/model/model.safetensors",
    "executions/run1/model/team--run1-0a1b2c3d-a0/output/model/manifest.json",
)
"""Objects, relative to a pipeline's folder, that some role of the pipeline reads or writes."""
LISTINGS = ("incoming/", "incoming/train.jsonl", "base-models/mpt-7b/", "scratch/run1/data/0a1b2c3d/train/",
            "scratch/run1/checkpoints/", "scratch/run1/checkpoints", "executions/run1/model/team--run1-0a1b2c3d-a0/output/model/")
"""Listings, relative to a pipeline's folder, that some role of the pipeline makes."""
OBJECT_ACTIONS = ("s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:DeleteObject", "s3:DeleteObjectVersion",
                  "s3:GetObjectVersion", "s3:GetObjectAttributes", "s3:PutObjectTagging", "s3:RestoreObject")


@dataclass
class Pair:
    stack: cdk.Stack
    resources: dict[str, dict]
    pipelines: dict[str, FineTuningPipeline]
    bucket: str
    """The shared bucket's ARN, as ``iam_model.resolve`` writes it."""
    bucket_key: str

    def roles(self, team: Team) -> dict[str, list[dict]]:
        """Every role of the team's pipeline: its statements by logical id."""
        return {k: role_statements(self.resources, k) for k in of_type(self.resources, "AWS::IAM::Role")
                if k.startswith(team.construct_id)}

    def role(self, team: Team, start: str) -> list[dict]:
        (statements,) = [s for k, s in self.roles(team).items() if k.startswith(team.construct_id + start)]
        return statements

    def ref(self, construct, attribute: str = "Arn") -> str:
        return f"<{self.stack.resolve(construct.node.default_child.logical_id)}.{attribute}>"


def two_pipelines(a: Team, b: Team) -> Pair:
    """Pipelines ``a`` and ``b`` on one brought bucket and key, each deploying its approved models."""
    # A role is a pipeline's when its logical id starts with the pipeline's construct id.
    assert not a.construct_id.startswith(b.construct_id) and not b.construct_id.startswith(a.construct_id)
    app = cdk.App()
    stack = cdk.Stack(app, "Platform", env=TEST_ENV)
    bucket_key = kms.Key(stack, "DataKey", enable_key_rotation=True)
    bucket = s3.Bucket(stack, "Shared", encryption=s3.BucketEncryption.KMS, encryption_key=bucket_key, enforce_ssl=True,
                       versioned=True)
    pipelines = {}
    for team in (a, b):
        image = EcrImage(ecr.Repository.from_repository_name(stack, f"{team.construct_id}Repo", f"{team.name}/train"), "v1")
        pipelines[team.name] = FineTuningPipeline(stack, team.construct_id, FineTuningPipelineProps(
            name=team.name, prefix=team.prefix, bucket=bucket, bucket_key=bucket_key, training_image=image,
            inference_image=INFERENCE_IMAGE, role_name_prefix="org-", deploy_on_approval=True))
    template = Template.from_stack(stack)
    resources = resolved_resources(stack, template)
    bucket_id = stack.resolve(bucket.node.default_child.logical_id)
    key_id = stack.resolve(bucket_key.node.default_child.logical_id)
    return Pair(stack, resources, pipelines, f"<{bucket_id}.Arn>", f"<{key_id}.Arn>")


@pytest.fixture(scope="module")
def pair() -> Pair:
    return two_pipelines(A, B)


def test_every_role_of_the_stack_belongs_to_one_of_the_pipelines(pair):
    roles = set(of_type(pair.resources, "AWS::IAM::Role"))
    mine, theirs = set(pair.roles(A)), set(pair.roles(B))
    assert len(mine) >= 4 and len(mine) == len(theirs)
    assert roles == mine | theirs, roles - mine - theirs


def test_role_names_of_the_two_pipelines_are_unique(pair):
    names = [r["Properties"]["RoleName"] for r in of_type(pair.resources, "AWS::IAM::Role").values()]
    assert len(set(names)) == len(names), names


# ---------------------------------------------------------------------------------------------
# The bucket, statement by statement and request by request
# ---------------------------------------------------------------------------------------------

def _s3_actions(statement: dict) -> list[str]:
    return [a for a in as_list(statement["Action"]) if a.lower().startswith("s3:")]


@pytest.mark.parametrize(("mine", "theirs"), PAIRS, ids=PAIR_IDS)
def test_every_s3_statement_names_only_the_pipelines_own_folder(pair, mine, theirs):
    seen = 0
    for role_id, statements in pair.roles(mine).items():
        for statement in statements:
            if not _s3_actions(statement):
                continue
            seen += 1
            assert statement["Effect"] == "Allow"
            for resource in as_list(statement["Resource"]):
                if resource == pair.bucket:  # the bucket itself: listing within the folder, or its versioning state
                    assert _s3_actions(statement) == as_list(statement["Action"]), (role_id, statement)
                    if as_list(statement["Action"]) == ["s3:GetBucketVersioning"]:  # staging: whether it keeps versions
                        continue
                    assert as_list(statement["Action"]) in (["s3:ListBucket"], ["s3:ListBucketVersions"]), (role_id, statement)
                    (patterns,) = statement["Condition"]["StringLike"].values()
                    assert set(statement["Condition"]) == {"StringLike"}, (role_id, statement)
                    assert all(p.startswith(mine.prefix) for p in as_list(patterns)), (role_id, patterns)
                else:
                    assert resource.startswith(f"{pair.bucket}/{mine.prefix}"), (role_id, resource)
    assert seen >= 4


@pytest.mark.parametrize(("mine", "theirs"), PAIRS, ids=PAIR_IDS)
def test_no_role_may_touch_an_object_of_the_other_pipeline_or_outside_its_folder(pair, mine, theirs):
    may = set()
    for role_id, statements in pair.roles(mine).items():
        for key in KEYS:
            for action in OBJECT_ACTIONS:
                if allows(statements, action, f"{pair.bucket}/{mine.prefix}{key}"):
                    may.add(key)
                for elsewhere in (f"{theirs.prefix}{key}", key, f"{mine.prefix.rstrip('/')}{key}"):
                    assert not allows(statements, action, f"{pair.bucket}/{elsewhere}"), (role_id, action, elsewhere)
    # The requests above are ones the pipeline makes in its own folder: each object is some role's.
    assert may == set(KEYS)


LIST_ACTIONS = ("s3:ListBucket", "s3:ListBucketVersions")
"""Listings (the model check lists a model folder's versions; ftstack.s3_model)."""


@pytest.mark.parametrize(("mine", "theirs"), PAIRS, ids=PAIR_IDS)
def test_no_role_may_list_the_other_pipelines_folder_or_the_whole_bucket(pair, mine, theirs):
    listed = set()
    for role_id, statements in pair.roles(mine).items():
        for prefix in LISTINGS:
            if allows(statements, "s3:ListBucket", pair.bucket, context={"s3:prefix": mine.prefix + prefix}):
                listed.add(prefix)
            for elsewhere in (theirs.prefix + prefix, prefix):
                for action in LIST_ACTIONS:
                    assert not allows(statements, action, pair.bucket, context={"s3:prefix": elsewhere}), (role_id, action, elsewhere)
        for action in LIST_ACTIONS:
            for whole in ("", "team", "team-", theirs.prefix):
                assert not allows(statements, action, pair.bucket, context={"s3:prefix": whole}), (role_id, action, whole)
            assert not allows(statements, action, pair.bucket), (role_id, action)  # no prefix: the whole bucket
        for action in ("s3:ListBucketMultipartUploads", "s3:PutLifecycleConfiguration", "s3:PutBucketPolicy", "s3:GetBucketPolicy"):
            assert not allows(statements, action, pair.bucket), (role_id, action)
    assert listed == set(LISTINGS)


# ---------------------------------------------------------------------------------------------
# Keys: the shared bucket's, and each pipeline's own
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mine", "theirs"), PAIRS, ids=PAIR_IDS)
def test_no_role_may_use_the_other_pipelines_key(pair, mine, theirs):
    own, other = (pair.ref(pair.pipelines[t.name].key) for t in (mine, theirs))
    assert len({own, other, pair.bucket_key}) == 3
    kms_actions = {a for statements in pair.roles(mine).values() for s in statements for a in as_list(s["Action"])
                   if a.startswith("kms:")}
    assert kms_actions
    for role_id, statements in pair.roles(mine).items():
        for statement in statements:
            if any(a.startswith("kms:") for a in as_list(statement["Action"])):
                assert set(as_list(statement["Resource"])) <= {own, pair.bucket_key}, (role_id, statement)
        for action in kms_actions | {"kms:Decrypt", "kms:GenerateDataKey", "kms:CreateGrant", "kms:ReEncryptFrom"}:
            assert not allows(statements, action, other, context={"kms:GrantIsForAWSResource": "true"}), (role_id, action)


# ---------------------------------------------------------------------------------------------
# Jobs, roles, functions, executions, topics, groups
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mine", "theirs"), PAIRS, ids=PAIR_IDS)
def test_each_workflow_starts_and_describes_only_its_own_training_jobs(pair, mine, theirs):
    workflow = pair.role(mine, "Workflow")
    for action in ("sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob", "sagemaker:AddTags"):
        assert allows(workflow, action, mine.job(), context=INSTANCE_TYPES), action
    for role_id, statements in pair.roles(mine).items():
        for action in ("sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob", "sagemaker:AddTags",
                       "sagemaker:StopTrainingJob", "sagemaker:UpdateTrainingJob"):
            assert not allows(statements, action, theirs.job(), context=INSTANCE_TYPES), (role_id, action)
    assert allows(pair.role(mine, "JobReaper"), "sagemaker:StopTrainingJob", mine.job())


@pytest.mark.parametrize(("mine", "theirs"), PAIRS, ids=PAIR_IDS)
def test_sagemaker_may_assume_a_training_role_for_its_own_pipelines_jobs_only(pair, mine, theirs):
    (role_id,) = [k for k in pair.roles(mine) if k.startswith(mine.construct_id + "TrainingRole")]
    (trust,) = pair.resources[role_id]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    (source,) = as_list(trust["Condition"]["ArnLike"]["aws:SourceArn"])
    assert fnmatchcase(mine.job(), source) and not fnmatchcase(theirs.job(), source)


@pytest.mark.parametrize(("mine", "theirs"), PAIRS, ids=PAIR_IDS)
def test_no_role_may_pass_a_role_of_the_other_pipeline(pair, mine, theirs):
    training = pair.ref(pair.pipelines[mine.name].training_role)
    passed = {"iam:PassedToService": "sagemaker.amazonaws.com"}
    assert allows(pair.role(mine, "Workflow"), "iam:PassRole", training, context=passed)
    theirs_roles = [f"<{k}.Arn>" for k in pair.roles(theirs)]
    for role_id, statements in pair.roles(mine).items():
        for role_arn in theirs_roles:
            for service in ("sagemaker.amazonaws.com", "states.amazonaws.com", "lambda.amazonaws.com"):
                assert not allows(statements, "iam:PassRole", role_arn, context={"iam:PassedToService": service}), (role_id, role_arn)


@pytest.mark.parametrize(("mine", "theirs"), PAIRS, ids=PAIR_IDS)
def test_no_role_may_invoke_the_other_pipelines_functions(pair, mine, theirs):
    staging = pair.ref(pair.pipelines[mine.name].staging_function)
    assert allows(pair.role(mine, "Workflow"), "lambda:InvokeFunction", staging)
    functions = [f"<{k}.Arn>" for k in of_type(pair.resources, "AWS::Lambda::Function") if k.startswith(theirs.construct_id)]
    assert pair.ref(pair.pipelines[theirs.name].staging_function) in functions
    for role_id, statements in pair.roles(mine).items():
        for function in functions:
            for arn in (function, f"{function}:1", f"{function}:$LATEST"):
                assert not allows(statements, "lambda:InvokeFunction", arn), (role_id, arn)


@pytest.mark.parametrize(("mine", "theirs"), PAIRS, ids=PAIR_IDS)
def test_no_role_may_describe_start_or_stop_the_other_pipelines_executions(pair, mine, theirs):
    assert allows(pair.role(mine, "Staging"), "states:DescribeExecution", mine.execution())
    # Their state machine by its ARN and as a reference to it (what a grant on the construct writes).
    machines = (theirs.state_machine, f"<{pair.stack.resolve(pair.pipelines[theirs.name].state_machine.node.default_child.logical_id)}>")
    for role_id, statements in pair.roles(mine).items():
        for action in ("states:DescribeExecution", "states:StopExecution", "states:GetExecutionHistory"):
            assert not allows(statements, action, theirs.execution()), (role_id, action)
        for action in ("states:StartExecution", "states:StartSyncExecution", "states:DescribeStateMachine"):
            for machine in machines:
                assert not allows(statements, action, machine), (role_id, action, machine)


@pytest.mark.parametrize(("mine", "theirs"), PAIRS, ids=PAIR_IDS)
def test_no_role_may_publish_to_the_other_pipelines_topic_or_register_in_its_group(pair, mine, theirs):
    topic = f"<{pair.stack.resolve(pair.pipelines[theirs.name].topic.node.default_child.logical_id)}>"
    group = pair.pipelines[theirs.name].model_package_group_name
    packages = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{group}/1"
    assert allows(pair.role(mine, "Workflow"), "sagemaker:CreateModelPackage",
                  f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{pair.pipelines[mine.name].model_package_group_name}/1")
    for role_id, statements in pair.roles(mine).items():
        assert not allows(statements, "sns:Publish", topic), role_id
        for action in ("sagemaker:CreateModelPackage", "sagemaker:DescribeModelPackage", "sagemaker:UpdateModelPackage"):
            assert not allows(statements, action, packages), (role_id, action)
            assert not allows(statements, action, f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package-group/{group}"), (role_id, action)


def deploy_reach(pair: Pair, mine: Team, theirs: Team) -> list[tuple[str, str, str]]:
    """What the roles of ``mine`` may do to the endpoint, models and configs that ``theirs``
    deploys its approved models with (the endpoint is named after its model package group)."""
    endpoint = pair.pipelines[theirs.name].model_package_group_name
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:"
    made = resource_name(endpoint, "execution-1")
    requests = [("sagemaker:CreateModel", f"{arn}model/{made}"), ("sagemaker:CreateEndpointConfig", f"{arn}endpoint-config/{made}")] + [
        (action, f"{arn}endpoint/{endpoint}") for action in
        ("sagemaker:CreateEndpoint", "sagemaker:UpdateEndpoint", "sagemaker:DescribeEndpoint", "sagemaker:DeleteEndpoint")]
    return [(role_id, action, resource) for role_id, statements in pair.roles(mine).items()
            for action, resource in requests if allows(statements, action, resource)]


@pytest.mark.parametrize(("mine", "theirs"), PAIRS, ids=PAIR_IDS)
def test_no_role_may_deploy_to_the_other_pipelines_endpoint(pair, mine, theirs):
    assert deploy_reach(pair, mine, mine), "the pipeline deploys to its own endpoint"
    assert deploy_reach(pair, mine, theirs) == []


def test_no_role_may_deploy_to_the_endpoint_of_a_pipeline_named_after_its_group():
    team, models = Team("First", "team", "team/"), Team("Second", "team-models", "team-models/")
    near = two_pipelines(team, models)
    assert deploy_reach(near, team, models) == []
