"""The ftstack stack: only wires the constructs together. Grants and the cdk-nag acknowledgements
they need live with the construct that makes them."""

from __future__ import annotations

import aws_cdk as cdk
from constructs import Construct

from ftstack.aws import OUTPUTS
from ftstack_train.contract import DEFAULT_TEST_SPLIT

from .assets import training_context
from .config import InfraConfig
from .definition import WorkflowSettings
from .images import registry_of
from .instances import volume_kms_instance_types
from .job_reaper import JobReaper
from .notifications import Notifications
from .registry import ModelRegistry
from .roles import TrainingRole
from .stage_data.request import Settings
from .staging import StagingFunction
from .storage import Storage, scratch_days_for
from .training_image import TrainingImage
from .workflow import FineTuningWorkflow


class FineTuningStack(cdk.Stack):
    """Bucket and key, training image, roles, data staging, model registry, notifications and
    the workflow that ties them together."""

    def __init__(self, scope: Construct, construct_id: str, *, config: InfraConfig, base_image: str, inference_image: str, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        removal = cdk.RemovalPolicy.DESTROY if config.removal_policy == "destroy" else cdk.RemovalPolicy.RETAIN
        # Any execution may ask for spot, so the longest job is max_wait_hours (never below max_runtime_hours).
        storage = Storage(self, "Storage", removal_policy=removal, scratch_days=scratch_days_for(config.max_wait_hours))
        image = TrainingImage(self, "TrainingImage", directory=str(training_context()), base_image=base_image)
        training = TrainingRole(self, "TrainingRole", bucket=storage.bucket, key=storage.key, repository=image.repository,
                                in_vpc=bool(config.vpc_subnet_ids), job_prefix=config.job_prefix)
        staging = StagingFunction(self, "Staging", bucket=storage.bucket, key=storage.key,
                                  reserved_concurrency=config.staging_concurrency, settings=Settings(
            bucket=storage.bucket.bucket_name, job_prefix=config.job_prefix, instance_type=config.instance_type,
            fallback_instance_types=config.fallback_instance_types, allowed_instance_types=config.instance_types,
            instance_count=config.instance_count,
            max_instance_count=config.max_instance_count, spot=config.spot, base_model=config.base_model,
            test_split=DEFAULT_TEST_SPLIT, key_arn=storage.key.key_arn, network_isolation=config.network_isolation,
        ))
        registry = ModelRegistry(self, "Registry", group_name=f"{config.stack_name}-models",
                                 description=f"Models fine-tuned by the {config.stack_name} workflow")
        notifications = Notifications(self, "Notifications", key=storage.key, emails=config.notification_emails)
        workflow = FineTuningWorkflow(
            self, "Workflow",
            settings=WorkflowSettings(
                region=config.region, volume_size_gb=config.volume_size_gb,
                max_runtime_s=int(config.max_runtime_hours * 3600), max_wait_s=int(config.max_wait_hours * 3600),
                max_instance_count=config.max_instance_count, network_isolation=config.network_isolation,
                subnets=config.vpc_subnet_ids, security_groups=config.vpc_security_group_ids,
                approval_status=config.model_approval_status, quality_threshold=config.quality_threshold,
                volume_kms_instance_types=volume_kms_instance_types(config.instance_types),
            ),
            bucket=storage.bucket, key=storage.key, training_role=training.role, training_image=image.image_uri,
            inference_image=inference_image, staging_function=staging.function, topic=notifications.topic,
            model_package_group=registry.group_name, job_prefix=config.job_prefix, instance_types=config.instance_types,
        )
        workflow.node.add_dependency(registry)
        JobReaper(self, "JobReaper", state_machine=workflow.state_machine, key=storage.key, job_prefix=config.job_prefix)

        # The names the operator CLI looks the stack's resources up by (ftstack.aws.OUTPUTS).
        for name, value, description in (
            (OUTPUTS["bucket"], storage.bucket.bucket_name, "Upload data to s3://<bucket>/incoming/"),
            (OUTPUTS["state_machine_arn"], workflow.state_machine.state_machine_arn, "Start a fine-tuning run here"),
            (OUTPUTS["model_package_group"], registry.group_name, "Registered models"),
            ("TrainingImageUri", image.image_uri, "The training image"),
            (OUTPUTS["topic_arn"], notifications.topic.topic_arn, "Run notifications"),
        ):
            cdk.CfnOutput(self, name, value=value, description=description)
        registry = registry_of(base_image)
        if registry:  # the image asset builds FROM the base image: Docker must be logged in to its registry
            cdk.CfnOutput(self, "BaseImageLogin", value=registry.login_command,
                          description=f"Run before deploying: logs Docker in to {registry.host}, the base image's registry")
