"""``FineTuningPipeline`` on a bare stack, once per way a platform team composes it: each resource
brought (an object of the same stack, or one imported by name or ARN) or created, with no
duplicate when brought; the props' validation, naming the prop; and the organisation's constraints
(permissions boundary, role names, tags) on everything the pipeline creates.

Four pipelines are synthesized, once each: ``created`` (everything created), ``brought`` (objects
of the same stack), ``imported`` (imported by name or ARN, a bucket without a key) and
``constrained`` (a created network under a boundary, a role-name prefix and tags)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aws_cdk as cdk
import pytest
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk.assertions import Annotations, Match, Template

from ftstack.infra.options import PropsError, TrainingOptions
from ftstack.infra.pipeline import FineTuningPipeline
from ftstack.infra.props import BuiltImage, CreatedNetwork, EcrImage, ExistingNetwork, FineTuningPipelineProps
from ftstack.infra.settings import ExtraMetric, GateCondition
from ftstack.infra.storage import scratch_days_for

from conftest import TEST_ENV
from iam_model import ACCOUNT, allows, as_list, of_type, resolve, role_statements

REGION = TEST_ENV.region
BASE_IMAGE = f"763104351884.dkr.ecr.{REGION}.amazonaws.com/pytorch-training:2.8-gpu-py312"
INFERENCE_IMAGE = f"763104351884.dkr.ecr.{REGION}.amazonaws.com/huggingface-vllm:0.29.0"
REPOSITORY = "team/train"
DIGEST = "sha256:" + "ab" * 32
KEY_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
BOUNDARY = f"arn:aws:iam::{ACCOUNT}:policy/org-boundary"
ROLE_NAME_PREFIX = "platform-ml-"
TAGS = {"cost-center": "ml-42", "team": "research"}
S3_BASE_MODEL = "s3://shared-models/base-models/mpt-7b/"
SUBNETS = ("subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb")
SECURITY_GROUP = "sg-0123456789abcdef0"
VPC_ID = "vpc-0123456789abcdef0"


@dataclass
class Built:
    """One synthesized pipeline: its stack, the construct, the template (and resolved), what was brought."""

    stack: cdk.Stack
    pipeline: FineTuningPipeline
    template: Template
    resources: dict[str, dict]
    brought: dict[str, Any]
    assembly_dir: Path

    def logical_id(self, construct) -> str:
        """The logical id of a brought construct's resource, as CDK computes it (never hard-coded)."""
        return self.stack.resolve(construct.node.default_child.logical_id)

    def ref(self, construct, attribute: str = "Arn") -> str:
        return f"<{self.logical_id(construct)}.{attribute}>"

    def roles(self) -> dict[str, dict]:
        return of_type(self.resources, "AWS::IAM::Role")

    def role(self, start: str) -> list[dict]:
        """The statements of the pipeline's role whose logical id starts with ``Pipeline<start>``."""
        (role_id,) = [k for k in self.roles() if k.startswith("Pipeline" + start)]
        return role_statements(self.resources, role_id)

    def substitutions(self) -> dict[str, Any]:
        (machine,) = of_type(self.resources, "AWS::StepFunctions::StateMachine").values()
        return machine["Properties"]["DefinitionSubstitutions"]

    def definition(self) -> dict:
        """The state machine's definition as deployed: its tokens resolved (``iam_model.resolve``)
        and its ``${Name}`` placeholders substituted."""
        (machine,) = of_type(self.resources, "AWS::StepFunctions::StateMachine").values()
        text = machine["Properties"]["DefinitionString"]
        for name, value in self.substitutions().items():
            text = text.replace("${" + name + "}", json.dumps(value)[1:-1])
        return json.loads(text)

    def training_job(self) -> dict:
        """The CreateTrainingJob request's Parameters."""
        return self.definition()["States"]["Train"]["Parameters"]

    def staging_settings(self) -> dict:
        (function,) = [f for f in of_type(self.resources, "AWS::Lambda::Function").values()
                       if "SETTINGS" in f["Properties"].get("Environment", {}).get("Variables", {})]
        return json.loads(function["Properties"]["Environment"]["Variables"]["SETTINGS"])

    def docker_images(self) -> dict:
        manifest = json.loads((self.assembly_dir / f"{self.stack.artifact_id}.assets.json").read_text())
        return manifest.get("dockerImages", {})


def synth(make: Callable[[cdk.Stack], dict[str, Any]], **props) -> Built:
    """A pipeline with ``props`` and what ``make(stack)`` brings (props of the same names, and
    anything else the tests look up), in a stack of its own app."""
    app = cdk.App()
    stack = cdk.Stack(app, "Platform", env=TEST_ENV)
    brought = make(stack)
    given = {k: v for k, v in brought.items() if k in FineTuningPipelineProps.__dataclass_fields__}
    pipeline = FineTuningPipeline(stack, "Pipeline", FineTuningPipelineProps(
        **{"inference_image": INFERENCE_IMAGE} | props | given))
    template = Template.from_stack(stack)
    assembly = app.synth()
    resources = {k: resolve(_substituted(v, stack), stack) for k, v in template.to_json()["Resources"].items()}
    return Built(stack, pipeline, template, resources, brought, Path(assembly.directory))


def _substituted(value: Any, stack: cdk.Stack) -> Any:
    """``value`` with each ``Fn::Sub`` of pseudo parameters (a Docker asset's URI) written out, for ``resolve``."""
    if isinstance(value, list):
        return [_substituted(v, stack) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Fn::Sub"} and isinstance(value["Fn::Sub"], str):
        pseudo = {"AWS::AccountId": ACCOUNT, "AWS::Region": stack.region, "AWS::Partition": "aws", "AWS::URLSuffix": "amazonaws.com"}
        text = value["Fn::Sub"]
        for name, given in pseudo.items():
            text = text.replace("${" + name + "}", given)
        assert "${" not in text, text
        return text
    return {k: _substituted(v, stack) for k, v in value.items()}


@pytest.fixture(scope="module")
def created() -> Built:
    """Everything created: bucket and key, topic, model package group, the image built; no VPC."""
    return synth(lambda stack: {}, name="alpha", prefix="team-a/", training_image=BuiltImage(base_image=BASE_IMAGE),
                 notification_emails=("ml@example.com",))


@pytest.fixture(scope="module")
def brought() -> Built:
    """Everything brought as objects of the same stack: a bucket with its key, a key for the
    pipeline, a topic, a model package group (by name), an ECR image by tag, subnets and a security group."""
    def make(stack: cdk.Stack) -> dict[str, Any]:
        bucket_key = kms.Key(stack, "DataKey", enable_key_rotation=True)
        return {
            "bucket": s3.Bucket(stack, "DataBucket", encryption=s3.BucketEncryption.KMS, encryption_key=bucket_key,
                                enforce_ssl=True, versioned=True),
            "bucket_key": bucket_key,
            "key": kms.Key(stack, "PlatformKey", enable_key_rotation=True),
            "topic": sns.Topic(stack, "Alerts"),
            "training_image": EcrImage(ecr.Repository.from_repository_name(stack, "TrainRepo", REPOSITORY), "v1"),
            "network": ExistingNetwork(
                subnets=tuple(ec2.Subnet.from_subnet_id(stack, f"Subnet{i}", s) for i, s in enumerate(SUBNETS)),
                security_groups=(ec2.SecurityGroup.from_security_group_id(stack, "JobGroup", SECURITY_GROUP, mutable=False),)),
        }

    return synth(make, name="alpha", prefix="team-a/", model_package_group_name="platform-models",
                 notification_emails=("ml@example.com", "ops@example.com"))


@pytest.fixture(scope="module")
def imported() -> Built:
    """Imported by name or ARN: a bucket without a key (its default encryption), a key, an ECR
    image by digest, and subnets of a VPC without a security group (one is created)."""
    def make(stack: cdk.Stack) -> dict[str, Any]:
        vpc = ec2.Vpc.from_vpc_attributes(stack, "Vpc", vpc_id=VPC_ID, availability_zones=[f"{REGION}a", f"{REGION}b"],
                                          isolated_subnet_ids=list(SUBNETS))
        return {
            "bucket": s3.Bucket.from_bucket_name(stack, "SharedBucket", "shared-data"),
            "key": kms.Key.from_key_arn(stack, "OrgKey", KEY_ARN),
            "training_image": EcrImage(ecr.Repository.from_repository_name(stack, "TrainRepo", REPOSITORY), DIGEST),
            "network": ExistingNetwork(subnets=tuple(vpc.isolated_subnets), vpc=vpc),
        }

    return synth(make, name="beta", prefix="team-b/")


@pytest.fixture(scope="module")
def constrained() -> Built:
    """A created network, under a permissions boundary, a role-name prefix and tags; the access-log
    bucket destroyed with the stack (so CDK adds its auto-delete provider role). The name is long,
    so that some role names need shortening."""
    def make(stack: cdk.Stack) -> dict[str, Any]:
        return {"permissions_boundary": iam.ManagedPolicy.from_managed_policy_arn(stack, "Boundary", BOUNDARY)}

    return synth(make, name="research-platform-fine-tuning", training_image=BuiltImage(base_image=BASE_IMAGE),
                 network=CreatedNetwork(), training=TrainingOptions(base_model=S3_BASE_MODEL), role_name_prefix=ROLE_NAME_PREFIX,
                 tags=TAGS, removal_policy=cdk.RemovalPolicy.DESTROY, notification_emails=("ml@example.com",))


# ---------------------------------------------------------------------------------------------
# The bucket and its key
# ---------------------------------------------------------------------------------------------

def test_a_created_bucket_is_kms_encrypted_versioned_logged_and_expires_scratch_under_the_prefix(created):
    t = created.template
    t.resource_count_is("AWS::S3::Bucket", 2)  # the data bucket and its access-log bucket
    (key_id,) = of_type(created.resources, "AWS::KMS::Key")
    t.has_resource("AWS::S3::Bucket", {"DeletionPolicy": "Retain", "Properties": {
        "BucketEncryption": {"ServerSideEncryptionConfiguration": [{"ServerSideEncryptionByDefault": {
            "SSEAlgorithm": "aws:kms", "KMSMasterKeyID": {"Fn::GetAtt": [key_id, "Arn"]}}, "BucketKeyEnabled": True}]},
        "VersioningConfiguration": {"Status": "Enabled"},
        "LoggingConfiguration": {"DestinationBucketName": {"Ref": Match.any_value()}, "LogFilePrefix": Match.any_value()},
        "LifecycleConfiguration": {"Rules": Match.array_with([{
            "Id": "ExpireScratch-team-a", "Prefix": "team-a/scratch/", "Status": "Enabled",
            "ExpirationInDays": scratch_days_for(TrainingOptions().max_wait_hours)}])},
    }})
    (bucket,) = [b for b in of_type(created.resources, "AWS::S3::Bucket").values() if "LoggingConfiguration" in b["Properties"]]
    # Only what this pipeline writes expires: nothing outside its prefix, and its models never.
    prefixes = [r.get("Prefix") for r in bucket["Properties"]["LifecycleConfiguration"]["Rules"] if "ExpirationInDays" in r]
    assert prefixes == ["team-a/scratch/"]
    assert created.pipeline.bucket_key is created.pipeline.key


def test_a_brought_bucket_is_used_as_it_is_and_gets_the_scratch_rule(brought):
    brought.template.resource_count_is("AWS::S3::Bucket", 1)  # the platform's own; no access-log bucket either
    bucket = brought.resources[brought.logical_id(brought.brought["bucket"])]
    assert {"Id": "ExpireScratch-team-a", "Prefix": "team-a/scratch/", "Status": "Enabled",
            "ExpirationInDays": scratch_days_for(TrainingOptions().max_wait_hours)} in bucket["Properties"]["LifecycleConfiguration"]["Rules"]
    assert brought.substitutions()["Bucket"] == f"<{brought.logical_id(brought.brought['bucket'])}>"
    assert brought.pipeline.bucket is brought.brought["bucket"]


def test_a_bucket_imported_by_name_is_used_and_its_missing_lifecycle_rule_is_a_warning(imported):
    imported.template.resource_count_is("AWS::S3::Bucket", 0)
    assert imported.substitutions()["Bucket"] == "shared-data"
    Annotations.from_stack(imported.stack).has_warning(
        "/Platform/SharedBucket", Match.string_like_regexp(r"lifecycle rules.*team-b/scratch/.*\[ack: ftstack:ScratchNotExpired\]"))


def test_with_a_bucket_key_every_role_that_touches_objects_gets_its_actions_and_the_output_is_encrypted(brought):
    data_key = brought.ref(brought.brought["bucket_key"])
    training, staging, workflow = brought.role("TrainingRole"), brought.role("Staging"), brought.role("Workflow")
    for action in ("kms:GenerateDataKey", "kms:Decrypt", "kms:Encrypt"):
        assert allows(training, action, data_key), action
    for action in ("kms:GenerateDataKey", "kms:Decrypt"):
        assert allows(staging, action, data_key), action
    assert allows(workflow, "kms:Decrypt", data_key)  # the final metrics
    assert brought.training_job()["OutputDataConfig"]["KmsKeyId"] == data_key
    assert brought.staging_settings()["key_arn"] == data_key


def test_without_a_bucket_key_the_bucket_default_encrypts_the_output_and_the_staged_data(imported):
    assert "KmsKeyId" not in imported.training_job()["OutputDataConfig"]
    assert imported.staging_settings()["key_arn"] == ""
    assert imported.substitutions()["BucketKeyArn"] == ""
    # No role writes with a key of its own choosing: only the bucket's default does.
    for start in ("TrainingRole", "Staging"):
        actions = {a for s in imported.role(start) for a in as_list(s["Action"])}
        assert not actions & {"kms:GenerateDataKey", "kms:Encrypt"}, start


def test_a_created_key_rotates_is_kept_and_lets_cloudwatch_logs_use_it(created):
    created.template.resource_count_is("AWS::KMS::Key", 1)
    created.template.has_resource("AWS::KMS::Key", {"DeletionPolicy": "Retain", "Properties": {"EnableKeyRotation": True}})
    (key,) = of_type(created.resources, "AWS::KMS::Key").values()
    assert logs_may_use(key)


def logs_may_use(key: dict) -> bool:
    """Whether the key's policy lets CloudWatch Logs encrypt this account's and region's log groups
    with it, and only those."""
    policy = key["Properties"]["KeyPolicy"]["Statement"]
    logs = ("Service", f"logs.{REGION}.amazonaws.com")

    def may(group_arn: str) -> bool:
        return all(allows(policy, action, "*", principal=logs, context={"kms:EncryptionContext:aws:logs:arn": group_arn})
                   for action in ("kms:GenerateDataKey", "kms:Decrypt", "kms:Encrypt", "kms:DescribeKey"))

    theirs = (f"arn:aws:logs:{REGION}:210987654321:log-group:/aws/vendedlogs/states/x", f"arn:aws:logs:eu-west-1:{ACCOUNT}:log-group:x")
    return may(f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/vendedlogs/states/x") and not any(may(g) for g in theirs)


def test_a_brought_key_is_used_for_the_pipelines_logs_and_gets_the_logs_statement(brought):
    brought.template.resource_count_is("AWS::KMS::Key", 2)  # the platform's two, none of the pipeline's own
    assert logs_may_use(brought.resources[brought.logical_id(brought.brought["key"])])
    groups = of_type(brought.resources, "AWS::Logs::LogGroup").values()
    assert groups and {g["Properties"]["KmsKeyId"] for g in groups} == {brought.ref(brought.brought["key"])}
    assert brought.substitutions()["KeyArn"] == brought.ref(brought.brought["key"])


def test_an_imported_key_is_used_and_its_missing_logs_statement_is_a_warning(imported):
    imported.template.resource_count_is("AWS::KMS::Key", 0)
    groups = of_type(imported.resources, "AWS::Logs::LogGroup").values()
    assert groups and {g["Properties"]["KmsKeyId"] for g in groups} == {KEY_ARN}
    Annotations.from_stack(imported.stack).has_warning(
        "/Platform/OrgKey", Match.string_like_regexp(r"logs\.us-east-1\.amazonaws\.com.*\[ack: ftstack:LogsKeyPolicy\]"))


# ---------------------------------------------------------------------------------------------
# The topic
# ---------------------------------------------------------------------------------------------

def test_a_created_topic_is_encrypted_with_the_key_and_subscribed(created):
    created.template.resource_count_is("AWS::SNS::Topic", 1)
    (key_id,) = of_type(created.resources, "AWS::KMS::Key")
    (topic_id,) = of_type(created.resources, "AWS::SNS::Topic")
    created.template.has_resource_properties("AWS::SNS::Topic", {"KmsMasterKeyId": {"Fn::GetAtt": [key_id, "Arn"]}})
    created.template.has_resource_properties("AWS::SNS::Subscription", {
        "Protocol": "email", "Endpoint": "ml@example.com", "TopicArn": {"Ref": topic_id}})


def test_a_brought_topic_gets_the_subscriptions_and_the_notifications(brought):
    brought.template.resource_count_is("AWS::SNS::Topic", 1)
    topic = brought.logical_id(brought.brought["topic"])
    for email in ("ml@example.com", "ops@example.com"):
        brought.template.has_resource_properties("AWS::SNS::Subscription", {
            "Protocol": "email", "Endpoint": email, "TopicArn": {"Ref": topic}})
    assert brought.substitutions()["TopicArn"] == f"<{topic}>"
    assert allows(brought.role("Workflow"), "sns:Publish", f"<{topic}>")


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------

def test_without_a_network_the_jobs_run_outside_any_vpc(created):
    assert "VpcConfig" not in created.training_job()
    assert not [k for k, v in created.resources.items() if v["Type"].startswith("AWS::EC2::")]
    assert not allows(created.role("TrainingRole"), "ec2:CreateNetworkInterface", "*")


def test_an_existing_network_with_security_groups_is_the_jobs_vpc_config(brought):
    assert brought.training_job()["VpcConfig"] == {"Subnets": list(SUBNETS), "SecurityGroupIds": [SECURITY_GROUP]}
    brought.template.resource_count_is("AWS::EC2::SecurityGroup", 0)
    assert allows(brought.role("TrainingRole"), "ec2:CreateNetworkInterface", "*")


def test_an_existing_network_without_security_groups_gets_one_whose_members_reach_each_other(imported):
    (group_id,) = of_type(imported.resources, "AWS::EC2::SecurityGroup")
    imported.template.has_resource_properties("AWS::EC2::SecurityGroup", {"VpcId": VPC_ID})
    imported.template.has_resource_properties("AWS::EC2::SecurityGroupIngress", {
        "IpProtocol": "-1", "GroupId": {"Fn::GetAtt": [group_id, "GroupId"]},
        "SourceSecurityGroupId": {"Fn::GetAtt": [group_id, "GroupId"]}})
    assert imported.training_job()["VpcConfig"] == {"Subnets": list(SUBNETS), "SecurityGroupIds": [f"<{group_id}.GroupId>"]}


def test_a_created_network_has_isolated_subnets_an_s3_endpoint_and_flow_logs_and_no_route_out(constrained):
    t, resources = constrained.template, constrained.resources
    t.resource_count_is("AWS::EC2::VPC", 1)
    subnets = of_type(resources, "AWS::EC2::Subnet")
    assert len(subnets) == CreatedNetwork().max_azs
    for kind in ("AWS::EC2::NatGateway", "AWS::EC2::InternetGateway", "AWS::EC2::EIP", "AWS::EC2::EgressOnlyInternetGateway"):
        t.resource_count_is(kind, 0)
    assert all(not s["Properties"].get("MapPublicIpOnLaunch") for s in subnets.values())
    # No route but the S3 endpoint's (a gateway endpoint adds its own prefix-list routes).
    t.resource_count_is("AWS::EC2::Route", 0)
    (vpc_id,) = of_type(resources, "AWS::EC2::VPC")
    (endpoint,) = of_type(resources, "AWS::EC2::VPCEndpoint").values()
    assert endpoint["Properties"]["VpcEndpointType"] == "Gateway"
    assert endpoint["Properties"]["ServiceName"] == f"com.amazonaws.{REGION}.s3"
    assert len(endpoint["Properties"]["RouteTableIds"]) == len(subnets)
    t.has_resource_properties("AWS::EC2::FlowLog", {"ResourceId": {"Ref": vpc_id}, "ResourceType": "VPC",
                                                    "TrafficType": "ALL", "LogDestinationType": "cloud-watch-logs"})
    job = constrained.training_job()["VpcConfig"]
    assert sorted(job["Subnets"]) == sorted(f"<{s}>" for s in subnets)
    (group_id,) = of_type(resources, "AWS::EC2::SecurityGroup")
    assert job["SecurityGroupIds"] == [f"<{group_id}.GroupId>"]
    # No route out: staging refuses a hub base model before any instance starts, as with network isolation.
    assert constrained.staging_settings()["offline"] is True


def test_a_pipeline_that_reaches_the_hub_lets_staging_take_a_hub_model(created):
    assert created.staging_settings()["offline"] is False


def test_a_created_network_needs_a_base_model_in_s3():
    with pytest.raises(PropsError, match=r"^FineTuningPipelineProps\.training: base_model must be an s3:// URI"):
        FineTuningPipelineProps(name="alpha", network=CreatedNetwork())


# ---------------------------------------------------------------------------------------------
# The model package group
# ---------------------------------------------------------------------------------------------

def test_a_created_model_package_group_is_named_after_the_pipeline(created):
    created.template.resource_count_is("AWS::SageMaker::ModelPackageGroup", 1)
    created.template.has_resource_properties("AWS::SageMaker::ModelPackageGroup", {"ModelPackageGroupName": "alpha-models"})
    assert created.substitutions()["ModelPackageGroupName"] == "alpha-models"
    assert allows(created.role("Workflow"), "sagemaker:CreateModelPackage",
                  f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package-group/alpha-models")


def test_a_brought_model_package_group_is_registered_into_and_nothing_else(brought):
    brought.template.resource_count_is("AWS::SageMaker::ModelPackageGroup", 0)
    assert brought.substitutions()["ModelPackageGroupName"] == "platform-models"
    assert brought.pipeline.model_package_group_name == "platform-models"
    workflow = brought.role("Workflow")
    group = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package-group/platform-models"
    assert allows(workflow, "sagemaker:CreateModelPackage", group)
    assert allows(workflow, "sagemaker:CreateModelPackage", f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/platform-models/3")
    assert not allows(workflow, "sagemaker:CreateModelPackage", f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package-group/alpha-models")


# ---------------------------------------------------------------------------------------------
# The training image
# ---------------------------------------------------------------------------------------------

def test_a_built_training_image_is_a_docker_asset_on_the_base_image(created):
    ((asset_hash, image),) = created.docker_images().items()
    assert image["source"]["dockerBuildArgs"] == {"BASE_IMAGE": BASE_IMAGE}
    assert image["source"]["platform"] == "linux/amd64"
    (destination,) = image["destinations"].values()
    uri = created.training_job()["AlgorithmSpecification"]["TrainingImage"]
    assert uri == f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{destination['repositoryName']}:{asset_hash}"
    repository = f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/{destination['repositoryName']}"
    assert allows(created.role("TrainingRole"), "ecr:BatchGetImage", repository)


@pytest.mark.parametrize(("fixture", "reference"), [("brought", ":v1"), ("imported", "@" + DIGEST)])
def test_a_brought_ecr_image_is_the_jobs_image_and_the_only_repository_the_training_role_pulls_from(request, fixture, reference):
    built: Built = request.getfixturevalue(fixture)
    assert built.docker_images() == {}
    uri = built.training_job()["AlgorithmSpecification"]["TrainingImage"]
    assert uri == f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{REPOSITORY}{reference}"
    training = built.role("TrainingRole")
    repositories = f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/"
    for action in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"):
        assert allows(training, action, repositories + REPOSITORY), action
        for other in ("team/other", f"cdk-hnb659fds-container-assets-{ACCOUNT}-{REGION}", "team/train-old"):
            assert not allows(training, action, repositories + other), (action, other)


# ---------------------------------------------------------------------------------------------
# The props, validated when they are made
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scope() -> cdk.Stack:
    return cdk.Stack(cdk.App(), "Props", env=TEST_ENV)


INVALID: list[tuple[str, Callable[[cdk.Stack], dict[str, Any]]]] = [
    ("name", lambda s: {"name": "team--a"}),
    ("name", lambda s: {"name": "9lives"}),
    ("name", lambda s: {"name": "team-a-"}),
    ("name", lambda s: {"name": "a" * 41}),
    ("prefix", lambda s: {"prefix": "team-a"}),
    ("prefix", lambda s: {"prefix": "Team-A/"}),
    ("prefix", lambda s: {"prefix": "team-*/"}),
    ("prefix", lambda s: {"prefix": "/team-a/"}),
    ("bucket_key", lambda s: {"bucket_key": kms.Key.from_key_arn(s, "LoneKey", KEY_ARN)}),
    ("tags", lambda s: {"tags": {"aws:cost": "x"}}),
    ("tags", lambda s: {"tags": {"ftstack:execution": "x"}}),
    ("tags", lambda s: {"tags": {"team": "a" * 257}}),
    ("tags", lambda s: {"tags": {"team": "a;b"}}),
    ("tags", lambda s: {"tags": {f"t{i}": "x" for i in range(50)}}),
    ("gate", lambda s: {"gate": (GateCondition(metric="accuracy", at_least=0.8),)}),
    ("extra_metrics", lambda s: {"extra_metrics": (ExtraMetric(name="accuracy", regex="accuracy=[0-9.]+"),)}),
    ("extra_metrics", lambda s: {"extra_metrics": (ExtraMetric(name="accuracy", regex="accuracy=([0-9.]+"),)}),
    ("extra_metrics", lambda s: {"extra_metrics": (ExtraMetric(name="accuracy", regex="x" * 501 + "(1)"),)}),
    ("extra_metrics", lambda s: {"extra_metrics": (ExtraMetric(name="eval:cross_entropy", regex="ce=([0-9.]+)"),)}),
]


@pytest.mark.parametrize(("prop", "values"), INVALID, ids=[f"{p}-{i}" for i, (p, _) in enumerate(INVALID)])
def test_a_bad_prop_is_refused_by_name(scope, prop, values):
    with pytest.raises(PropsError, match=rf"^FineTuningPipelineProps\.{prop}: "):
        FineTuningPipelineProps(**{"name": "alpha"} | values(scope))


def test_the_props_valid_next_to_the_invalid_ones_are_accepted(scope):
    """The refusals above are for the reason shown: the nearest valid values pass."""
    FineTuningPipelineProps(name="team-a", prefix="team-a/", tags={"team": "a-b", "cost:center": "ml/42"},
                            bucket=s3.Bucket.from_bucket_name(scope, "Some", "some-bucket"),
                            bucket_key=kms.Key.from_key_arn(scope, "SomeKey", KEY_ARN),
                            evaluate=sfn.Pass(scope, "Evaluate"), gate=(GateCondition(metric="accuracy", at_least=0.8),),
                            extra_metrics=(ExtraMetric(name="accuracy", regex="accuracy=([0-9.]+)"),))
    FineTuningPipelineProps(name="a" * 40, prefix="org/team-a/", tags={f"t{i}": "x" for i in range(49)})


def _pipeline(stack: cdk.Stack, construct_id: str, **props) -> FineTuningPipeline:
    image = EcrImage(ecr.Repository.from_repository_name(stack, f"{construct_id}Repo", REPOSITORY), "v1")
    return FineTuningPipeline(stack, construct_id, FineTuningPipelineProps(
        training_image=image, inference_image=INFERENCE_IMAGE, **props))


def test_two_pipelines_of_one_name_in_one_account_and_region_are_refused():
    app = cdk.App()
    first = cdk.Stack(app, "First", env=TEST_ENV)
    _pipeline(first, "Pipeline", name="alpha")
    # Elsewhere the name is free: another region.
    _pipeline(cdk.Stack(app, "Elsewhere", env=cdk.Environment(account=ACCOUNT, region="eu-west-1")), "Pipeline", name="alpha")
    with pytest.raises(PropsError, match=r"^FineTuningPipelineProps\.name: 'Alpha' is already the name of pipeline First/Pipeline"):
        _pipeline(cdk.Stack(app, "Second", env=TEST_ENV), "Pipeline", name="Alpha")


@pytest.mark.parametrize(("first", "second"), [("team/", "team/ab/"), ("team/ab/", "team/"), ("", "team-b/"), ("team-a/", "team-a/")])
def test_overlapping_prefixes_on_one_bucket_are_refused(first, second):
    stack = cdk.Stack(cdk.App(), "Platform", env=TEST_ENV)
    bucket = s3.Bucket(stack, "Shared")
    _pipeline(stack, "A", name="team-a", bucket=bucket, prefix=first)
    if first:
        _pipeline(stack, "C", name="team-c", bucket=bucket, prefix="team-c/")  # a folder of its own is fine
    with pytest.raises(PropsError, match=r"^FineTuningPipelineProps\.prefix: .* overlaps .* on the same bucket"):
        _pipeline(stack, "B", name="team-b", bucket=bucket, prefix=second)


def test_one_bucket_imported_by_name_in_two_stacks_is_one_bucket():
    app = cdk.App()
    one, two = (cdk.Stack(app, name, env=TEST_ENV) for name in ("One", "Two"))
    _pipeline(one, "Pipeline", name="team-a", bucket=s3.Bucket.from_bucket_name(one, "Shared", "shared-data"), prefix="team/")
    with pytest.raises(PropsError, match=r"^FineTuningPipelineProps\.prefix: "):
        _pipeline(two, "Pipeline", name="team-b", bucket=s3.Bucket.from_bucket_name(two, "Shared", "shared-data"), prefix="team/")


# ---------------------------------------------------------------------------------------------
# The organisation's constraints
# ---------------------------------------------------------------------------------------------

def _service_roles(built: Built, service: str) -> list[str]:
    return [k for k, v in built.roles().items()
            if service in as_list(v["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]["Principal"].get("Service"))]


def test_every_role_in_the_stack_has_the_permissions_boundary(constrained):
    roles = constrained.roles()
    # CDK's stack-level auto-delete provider (for the access-log bucket) and the VPC's flow-log role are among them.
    assert [k for k in roles if k.startswith("CustomS3AutoDeleteObjectsCustomResourceProvider")]
    assert _service_roles(constrained, "vpc-flow-logs.amazonaws.com")
    for role_id, role in roles.items():
        assert role["Properties"].get("PermissionsBoundary") == BOUNDARY, role_id


def test_every_role_is_named_with_the_prefix_within_iams_length_and_uniquely(constrained):
    names = {role_id: role["Properties"].get("RoleName") for role_id, role in constrained.roles().items()}
    assert len(names) >= 6
    for role_id, name in names.items():
        assert isinstance(name, str) and name.startswith(ROLE_NAME_PREFIX), (role_id, name)
        assert len(name) <= 64, name
    assert len(set(names.values())) == len(names), names
    assert any(len(n) == 64 for n in names.values()), "the long name makes some names shortened to the limit"


TAGGABLE = ("AWS::S3::Bucket", "AWS::KMS::Key", "AWS::SNS::Topic", "AWS::Lambda::Function", "AWS::StepFunctions::StateMachine",
            "AWS::Logs::LogGroup", "AWS::IAM::Role", "AWS::SageMaker::ModelPackageGroup", "AWS::Events::Rule",
            "AWS::EC2::VPC", "AWS::EC2::Subnet", "AWS::EC2::RouteTable", "AWS::EC2::SecurityGroup", "AWS::EC2::FlowLog",
            "AWS::EC2::VPCEndpoint")
"""Resource types the pipeline creates that take tags."""
STACK_LEVEL = "CustomS3AutoDeleteObjectsCustomResourceProvider"
"""CDK's provider, one per stack and shared by every pipeline in it: not the pipeline's to tag."""


def test_the_tags_are_on_every_taggable_resource_of_the_pipeline(constrained):
    tagged = {k: v for k, v in constrained.resources.items() if v["Type"] in TAGGABLE and not k.startswith(STACK_LEVEL)}
    assert {v["Type"] for v in tagged.values()} == set(TAGGABLE)
    for resource_id, resource in tagged.items():
        tags = resource["Properties"].get("Tags", [])
        if isinstance(tags, dict):  # AWS::SageMaker::ModelPackageGroup, AWS::SNS::Topic and others take a list; some a map
            tags = [{"Key": k, "Value": v} for k, v in tags.items()]
        for key, value in TAGS.items():
            assert {"Key": key, "Value": value} in tags, (resource_id, key)


def test_the_tags_are_on_every_training_job_beside_the_execution_name(constrained):
    assert constrained.training_job()["Tags"] == [{"Key": "ftstack:execution", "Value.$": "$$.Execution.Name"}] + [
        {"Key": k, "Value": v} for k, v in TAGS.items()]


def test_without_constraints_roles_are_named_by_cloudformation_and_have_no_boundary(created):
    for role_id, role in created.roles().items():
        assert "RoleName" not in role["Properties"] and "PermissionsBoundary" not in role["Properties"], role_id
    assert created.training_job()["Tags"] == [{"Key": "ftstack:execution", "Value.$": "$$.Execution.Name"}]


def test_two_pipelines_on_one_model_package_group_are_refused():
    """The group names the endpoint and the deploy workflow: a second pipeline on it would collide
    at deploy, whether it brings the group or would create one of the same name."""
    stack = cdk.Stack(cdk.App(), "Platform", env=TEST_ENV)
    _pipeline(stack, "A", name="team-a", prefix="a/")
    with pytest.raises(PropsError, match=r"^FineTuningPipelineProps\.model_package_group_name: 'TEAM-A-models' is already the group"):
        _pipeline(stack, "B", name="team-b", prefix="b/", model_package_group_name="TEAM-A-models")
    _pipeline(stack, "C", name="team-c", prefix="c/", model_package_group_name="shared-models")
    with pytest.raises(PropsError, match=r"is already the group of pipeline Platform/C"):
        _pipeline(stack, "D", name="shared", prefix="d/")  # would create shared-models


def test_role_names_differ_between_regions_since_iam_names_are_account_wide():
    """One pipeline deployed to two regions of an account: with a name prefix, each region's
    roles get names of their own (an IAM role name is unique in the whole account)."""
    app = cdk.App()
    stacks = {region: cdk.Stack(app, f"Team-{region}", env=cdk.Environment(account=ACCOUNT, region=region))
              for region in ("us-east-1", "eu-west-1")}
    for stack in stacks.values():
        _pipeline(stack, "Pipeline", name="team-a", role_name_prefix="acme-")
    names = {region: {r["Properties"]["RoleName"] for r in Template.from_stack(stack).find_resources("AWS::IAM::Role").values()}
             for region, stack in stacks.items()}
    assert names["us-east-1"] and not names["us-east-1"] & names["eu-west-1"]
    assert all(n.startswith("acme-team-a-eu-west-1-") for n in names["eu-west-1"])


def test_a_brought_topic_with_its_own_key_lets_the_publishers_use_that_key():
    """An imported topic's encryption key is invisible to CDK's grant_publish: with topic_key, both
    workflows that publish (the run's and the deploy's) may make data keys with it, nothing more."""
    from iam_model import resolved_resources

    stack = cdk.Stack(cdk.App(), "Platform", env=TEST_ENV)
    key_arn = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/22222222-3333-4444-5555-666666666666"
    topic = sns.Topic.from_topic_arn(stack, "Topic", f"arn:aws:sns:us-east-1:{ACCOUNT}:ml-runs")
    _pipeline(stack, "Team", name="team-a", topic=topic, topic_key=kms.Key.from_key_arn(stack, "TopicKey", key_arn),
              deploy_on_approval=True)
    resources = resolved_resources(stack, Template.from_stack(stack))
    publishers = [r for r in of_type(resources, "AWS::IAM::Role")
                  if allows(role_statements(resources, r), "sns:Publish", f"arn:aws:sns:us-east-1:{ACCOUNT}:ml-runs")]
    assert len(publishers) == 2
    for role in publishers:
        assert allows(role_statements(resources, role), "kms:GenerateDataKey", key_arn), role
        assert not allows(role_statements(resources, role), "kms:Encrypt", key_arn), role
    with pytest.raises(PropsError, match=r"^FineTuningPipelineProps\.topic_key: is the key of a brought topic"):
        FineTuningPipelineProps(name="x", topic_key=kms.Key.from_key_arn(stack, "Other", key_arn))
