"""``FineTuningPipeline``: the whole fine-tuning stack as one L3 construct that a platform team
composes into its own CDK app. Data bucket and key, training image, roles, data staging, model
registry, notifications, and the workflow that ties them together, each brought or created
(``FineTuningPipelineProps``), under the organisation's constraints, with extension points."""

from __future__ import annotations

from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from ftstack.aws import DATA_PREFIX, OUTPUTS, SERVING_ROLE
from ftstack.serving import check_endpoint_name
from ftstack_train.contract import DEFAULT_TEST_SPLIT

from .assets import training_context
from .config import InfraConfigError
from .deployment import DeployOnApproval, ServingRole
from .model_check_function import ModelCheckFunction
from .extensions import reads_outside_input
from .images import inference_image, pinned_by_digest, registry_of, training_base_image
from .instances import volume_kms_instance_types
from .job_reaper import JobReaper
from .layout import JOB_MODEL_DIR
from .network import TrainingNetwork
from .notifications import Notifications
from .options import PropsError
from .organisation import constrain
from .props import BuiltImage, FineTuningPipelineProps
from .registry import ModelRegistry
from .roles import TrainingRole
from .settings import EXTENSION_POINTS, WorkflowSettings
from .stage_data.request import Settings
from .staging import StagingFunction
from .storage import Storage, scratch_days_for
from .training_image import TrainingImage
from .workflow import FineTuningWorkflow, WorkflowResources


class FineTuningPipeline(Construct):
    """Validate and stage data, fine-tune on SageMaker, gate, register, notify.

    Attributes: ``bucket``, ``key``, ``bucket_key``, ``topic``, ``state_machine``,
    ``training_role``, ``staging_function``, ``model_package_group_name``, ``training_image_uri``,
    ``model_check``, ``serving_role``, ``deployment`` (the ``DeployOnApproval``, or None), ``layout`` (where its
    objects live in the bucket) and ``props``.
    """

    def __init__(self, scope: Construct, construct_id: str, props: FineTuningPipelineProps) -> None:
        super().__init__(scope, construct_id)
        if not isinstance(props, FineTuningPipelineProps):
            raise PropsError(f"FineTuningPipeline {construct_id!r}: give a FineTuningPipelineProps(...), not {type(props).__name__}")
        self.props, self.layout = props, props.layout
        t = props.training
        stack = cdk.Stack.of(self)
        # Any execution may ask for spot, so the longest job is max_wait_hours (never below max_runtime_hours).
        storage = Storage(self, "Storage", removal_policy=props.removal_policy, scratch_days=scratch_days_for(t.max_wait_hours),
                          name=props.name, layout=self.layout, key=props.key, bucket=props.bucket, bucket_key=props.bucket_key)
        self.key, self.bucket, self.bucket_key = storage.key, storage.bucket, storage.bucket_key
        _claim(self)
        self.training_image_uri, repository, self.base_image = self._training_image(stack)
        network = TrainingNetwork(self, "Network", network=props.network, key=self.key)
        self.training_role = TrainingRole(
            self, "TrainingRole", bucket=self.bucket, key=self.key, bucket_key=self.bucket_key, repository=repository,
            in_vpc=bool(network.job.subnet_ids), job_prefix=props.job_prefix, layout=self.layout).role
        self.staging_function = StagingFunction(
            self, "Staging", bucket=self.bucket, key=self.key, bucket_key=self.bucket_key, name=props.name,
            reserved_concurrency=t.staging_concurrency, settings=self._staging_settings()).function
        registry = None
        if props.model_package_group_name is None:
            registry = ModelRegistry(self, "Registry", group_name=f"{props.name}-models",
                                     description=f"Models fine-tuned by the {props.name} workflow")
        self.model_package_group_name = registry.group_name if registry else props.model_package_group_name
        self.topic = Notifications(self, "Notifications", key=self.key, emails=props.notification_emails, name=props.name,
                                   topic=props.topic).topic
        # Pins each model's files before registration; the deploy workflow checks them against it.
        self.model_check = ModelCheckFunction(self, "ModelCheck", bucket=self.bucket, key=self.key, bucket_key=self.bucket_key,
                                              model_folders=self._model_folders).function
        extensions, statements = _extension_graphs(props)
        workflow = FineTuningWorkflow(
            self, "Workflow", name=props.name, layout=self.layout, job_prefix=props.job_prefix,
            instance_types=t.instance_types, extension_statements=statements,
            settings=self._workflow_settings(stack, network.job.subnet_ids, network.job.security_group_ids, extensions),
            resources=WorkflowResources(
                bucket=self.bucket, key=self.key, bucket_key=self.bucket_key, training_role=self.training_role,
                training_image=self.training_image_uri, inference_image=props.inference_image or self._inference_image(stack),
                staging_function=self.staging_function, model_check=self.model_check, topic=self.topic,
                model_package_group=self.model_package_group_name,
            ),
        )
        if registry is not None:
            workflow.node.add_dependency(registry)
        self.state_machine = workflow.state_machine
        self._serving(props)
        JobReaper(self, "JobReaper", state_machine=workflow.state_machine, key=self.key, job_prefix=props.job_prefix)
        if props.topic_key is not None:  # CDK cannot see an imported topic's key: grant_publish leaves it out
            for machine in (workflow.state_machine, self.deployment.state_machine if self.deployment else None):
                if machine is not None:
                    props.topic_key.grant(machine.role, "kms:GenerateDataKey", "kms:Decrypt")
        constrain(self, name=props.name, permissions_boundary=props.permissions_boundary,
                  role_name_prefix=props.role_name_prefix, tags=props.tags)

    def _staging_settings(self) -> Settings:
        """What the staging function checks an execution's input against (its environment)."""
        p, t = self.props, self.props.training
        return Settings(
            bucket=self.bucket.bucket_name, job_prefix=p.job_prefix, instance_type=t.instance_type,
            fallback_instance_types=t.fallback_instance_types, allowed_instance_types=t.instance_types,
            instance_count=t.instance_count, max_instance_count=t.max_instance_count, spot=t.spot,
            base_model=t.base_model, test_split=DEFAULT_TEST_SPLIT,
            key_arn=self.bucket_key.key_arn if self.bucket_key else "", offline=not p.reaches_hub,
            prefix=self.layout.prefix,
        )

    def _workflow_settings(self, stack: cdk.Stack, subnets: tuple[str, ...], security_groups: tuple[str, ...],
                           extensions: dict[str, dict[str, Any]]) -> WorkflowSettings:
        """What the workflow's definition is built from."""
        p, t = self.props, self.props.training
        return WorkflowSettings(
            region=stack.region, volume_size_gb=t.volume_size_gb,
            max_runtime_s=int(t.max_runtime_hours * 3600), max_wait_s=int(t.max_wait_hours * 3600),
            max_instance_count=t.max_instance_count, network_isolation=t.network_isolation,
            subnets=subnets, security_groups=security_groups,
            approval_status=t.model_approval_status, quality_threshold=t.quality_threshold,
            volume_kms_instance_types=volume_kms_instance_types(t.instance_types), prefix=self.layout.prefix,
            encrypt_output=self.bucket_key is not None, tags=tuple(p.tags.items()),
            extra_metrics=p.extra_metrics, gate=p.gate, extensions=extensions,
        )

    def _serving(self, props: FineTuningPipelineProps) -> None:
        """The role SageMaker serves the models with, and (``deploy_on_approval``) the workflow
        that serves each approved one behind the group's endpoint, named after the group."""
        models = f"{self._model_folders}*"
        endpoint = check_endpoint_name(self.model_package_group_name)
        self.serving_role = ServingRole(self, "Serving", bucket=self.bucket, bucket_key=self.bucket_key,
                                        model_objects=models, name=endpoint).role
        self.deployment = None
        if props.deploy_on_approval:
            self.deployment = DeployOnApproval(
                self, "DeployOnApproval", group_name=self.model_package_group_name, topic=self.topic, key=self.key,
                bucket=self.bucket, bucket_key=self.bucket_key, model_objects=models,
                instance_type=props.endpoint_instance_type, name=endpoint, model_check=self.model_check,
                serving_role=self.serving_role)

    @property
    def _model_folders(self) -> str:
        """The key pattern of every job's model folder: ``<prefix>executions/*/model/*/output/model/``."""
        return f"{self.layout.model_prefix('*')}*/{JOB_MODEL_DIR}"

    def _training_image(self, stack: cdk.Stack) -> tuple[str, ecr.IRepository, str | None]:
        """(URI, repository, base image or None): built from training_code/, or brought."""
        image = self.props.training_image
        if not isinstance(image, BuiltImage):
            return image.image_uri, image.repository, None
        base = image.base_image
        if base is None:
            region = _concrete_region(stack, "training_image", "BuiltImage(base_image=...)")
            try:
                base = training_base_image(region, image.pytorch_version, image.python_version)
            except InfraConfigError as exc:
                raise PropsError(f"FineTuningPipelineProps.training_image: {exc}") from None
        if image.base_image_digest:
            base = pinned_by_digest(base, image.base_image_digest)
        built = TrainingImage(self, "TrainingImage", directory=str(training_context()), base_image=base)
        return built.image_uri, built.repository, base

    def _inference_image(self, stack: cdk.Stack) -> str:
        region = _concrete_region(stack, "inference_image", "an image URI")
        try:
            return inference_image(region)
        except InfraConfigError as exc:
            raise PropsError(f"FineTuningPipelineProps.inference_image: {exc}") from None

    def add_cli_outputs(self) -> None:
        """Adds the stack outputs the ``ftstack`` CLI reads (``ftstack.aws.OUTPUTS``) for this
        pipeline: one pipeline per stack for the CLI, which finds a pipeline by its stack's name."""
        stack = cdk.Stack.of(self)
        for name, value, description in (
            (OUTPUTS["bucket"], self.bucket.bucket_name, f"Upload data to s3://<bucket>/{self.layout.incoming}"),
            (OUTPUTS["state_machine_arn"], self.state_machine.state_machine_arn, "Start a fine-tuning run here"),
            (OUTPUTS["model_package_group"], self.model_package_group_name, "Registered models"),
            ("TrainingImageUri", self.training_image_uri, "The training image"),
            (OUTPUTS["topic_arn"], self.topic.topic_arn, "Run notifications"),
            (SERVING_ROLE, self.serving_role.role_arn, "The role endpoints serve the models with (ftstack deploy)"),
        ):
            cdk.CfnOutput(stack, name, value=value, description=description)
        if self.layout.prefix:  # CloudFormation takes no empty output; the CLI reads a missing one as ''
            cdk.CfnOutput(stack, DATA_PREFIX, value=self.layout.prefix, description="The pipeline's folder in the bucket")
        registry = registry_of(self.base_image) if self.base_image else None
        if registry:  # the image asset builds FROM the base image: Docker must be logged in to its registry
            cdk.CfnOutput(stack, "BaseImageLogin", value=registry.login_command,
                          description=f"Run before deploying: logs Docker in to {registry.host}, the base image's registry")


def _concrete_region(stack: cdk.Stack, prop: str, instead: str) -> str:
    if cdk.Token.is_unresolved(stack.region):
        raise PropsError(f"FineTuningPipelineProps.{prop}: the image is resolved for the stack's region, which is not "
                         f"known at synth; give the stack env=cdk.Environment(region=...), or give {prop} as {instead}")
    return stack.region


def _extension_graphs(props: FineTuningPipelineProps) -> tuple[dict[str, dict[str, Any]], tuple[iam.PolicyStatement, ...]]:
    """Each extension point's steps as a state graph, and the permissions their tasks need."""
    graphs: dict[str, dict[str, Any]] = {}
    statements: list[iam.PolicyStatement] = []
    for point in EXTENSION_POINTS:
        chainable = getattr(props, point)
        if chainable is None:
            continue
        graph = sfn.StateGraph(chainable.start_state, f"ftstack {point}")
        graphs[point] = graph.to_graph_json()
        statements += graph.policy_statements
        outside = reads_outside_input(point, graphs[point])
        if outside:
            from .extensions import input_keys

            raise PropsError(f"FineTuningPipelineProps.{point}: the first step reads {', '.join(outside)}, which it is "
                             f"not given; it receives {', '.join(input_keys(point))} (README: Compose, constrain, extend)")
    return graphs, tuple(statements)


def _overlaps(a: str, b: str) -> bool:
    return a.startswith(b) or b.startswith(a)


def _same_bucket(a: Any, b: Any) -> bool:
    if a is b:
        return True
    names = (a.bucket_name, b.bucket_name)
    return not any(cdk.Token.is_unresolved(n) for n in names) and names[0] == names[1]


def _claim(pipeline: FineTuningPipeline) -> None:
    """Refuses a second pipeline of the app with the same name or model package group in the same
    account and region (their state machines, jobs, groups and endpoints would collide), or on the
    same bucket with an overlapping prefix (IAM could not keep them apart)."""
    mine = pipeline.props
    for other in pipeline.node.root.node.find_all():
        if other is pipeline or not isinstance(other, FineTuningPipeline) or not hasattr(other, "bucket"):
            continue
        here, there = cdk.Stack.of(pipeline), cdk.Stack.of(other)
        same_place = (here.account, here.region) == (there.account, there.region)
        if other.props.name.lower() == mine.name.lower() and same_place:
            raise PropsError(f"FineTuningPipelineProps.name: {mine.name!r} is already the name of pipeline "
                             f"{other.node.path}; give each pipeline its own name")
        group = mine.model_package_group_name or f"{mine.name}-models"
        if same_place and getattr(other, "model_package_group_name", None) and other.model_package_group_name.lower() == group.lower():
            raise PropsError(f"FineTuningPipelineProps.model_package_group_name: {group!r} is already the group of pipeline "
                             f"{other.node.path} (its endpoint and deploy workflow are named after it); give each "
                             "pipeline its own group")
        if _same_bucket(other.bucket, pipeline.bucket) and _overlaps(other.layout.prefix, mine.prefix):
            raise PropsError(f"FineTuningPipelineProps.prefix: {mine.prefix!r} overlaps {other.layout.prefix!r} of pipeline "
                             f"{other.node.path} on the same bucket; give each pipeline its own folder, e.g. 'team-a/' "
                             "and 'team-b/'")
