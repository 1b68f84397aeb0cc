"""Stops the training jobs of an execution that was aborted, timed out or failed while its job
ran (``infra.stage_data.stop_jobs``): an EventBridge rule on the state machine's execution status
changes, and a small function with the one permission it needs."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from .nag import acknowledge, arn_in_finding, wildcard
from .stage_data.request import training_jobs
from .stage_data.stop_jobs import ENDED, HANDLER, JOB_PREFIX_ENV
from .staging import python_function


class JobReaper(Construct):
    """``self.function`` and ``self.rule``: stop the jobs of executions that ended early."""

    def __init__(self, scope: Construct, construct_id: str, *, state_machine: sfn.IStateMachine, key: kms.IKey, job_prefix: str) -> None:
        super().__init__(scope, construct_id)
        self.function = python_function(
            self, key=key, handler=HANDLER, environment={JOB_PREFIX_ENV: job_prefix},
            memory_size=256, timeout=cdk.Duration.minutes(1),
            description="ftstack: stop the training jobs of an aborted, timed-out or failed execution",
            role_description="ftstack: stop the training jobs of executions that ended early",
        )
        role = self.function.role
        stack = cdk.Stack.of(self)
        role.add_to_principal_policy(iam.PolicyStatement(actions=["sagemaker:ListTrainingJobs"], resources=["*"]))
        role.add_to_principal_policy(iam.PolicyStatement(
            actions=["sagemaker:StopTrainingJob"],
            resources=[stack.format_arn(service="sagemaker", resource="training-job", resource_name=training_jobs(job_prefix))],
        ))
        self.rule = events.Rule(
            self, "ExecutionEnded",
            description="ftstack: an execution ended early; stop its training jobs",
            event_pattern=events.EventPattern(
                source=["aws.states"], detail_type=["Step Functions Execution Status Change"],
                detail={"stateMachineArn": [state_machine.state_machine_arn], "status": list(ENDED)},
            ),
            targets=[targets.LambdaFunction(self.function, retry_attempts=8, max_event_age=cdk.Duration.hours(2))],
        )
        acknowledge(role, {
            wildcard("Resource::*"): "sagemaker:ListTrainingJobs supports no resource scoping; StopTrainingJob is limited to the stack's jobs",
            wildcard("Resource::" + arn_in_finding(self, "sagemaker", "training-job/" + training_jobs(job_prefix))):
                "job names carry the execution name and attempt, known only at run time",
        })
