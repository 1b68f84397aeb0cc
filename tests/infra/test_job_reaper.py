"""Stopping the jobs of an execution that ended early: the rule, the function's narrow role, and
the handler's real requests checked against botocore's model of SageMaker."""

from __future__ import annotations

import json

import aws_cdk as cdk
import boto3
import pytest
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk.assertions import Match, Template
from moto import mock_aws

from aws_contract import AwsCalls
from ftstack.infra.job_reaper import JobReaper
from ftstack.infra.stage_data.request import job_name_prefix
from ftstack.infra.stage_data.stop_jobs import stop_jobs
from ftstack.infra.storage import Storage


def build(stack: cdk.Stack) -> JobReaper:
    storage = Storage(stack, "Storage", removal_policy=cdk.RemovalPolicy.RETAIN)
    machine = sfn.StateMachine(stack, "Machine", definition_body=sfn.DefinitionBody.from_chainable(sfn.Pass(stack, "P")))
    return JobReaper(stack, "Reaper", state_machine=machine, key=storage.key, job_prefix="ftstack")


@pytest.fixture(scope="module")
def template(new_stack) -> Template:
    _, stack = new_stack()
    build(stack)
    return Template.from_stack(stack)


def test_the_rule_matches_the_state_machines_early_ends(template):
    template.has_resource_properties("AWS::Events::Rule", {"EventPattern": {
        "source": ["aws.states"], "detail-type": ["Step Functions Execution Status Change"],
        "detail": {"stateMachineArn": [{"Ref": Match.string_like_regexp("Machine")}], "status": ["ABORTED", "TIMED_OUT", "FAILED"]},
    }})


def test_the_function_may_stop_only_the_stacks_jobs(template):
    policies = template.find_resources("AWS::IAM::Policy", {"Properties": {"Roles": [{"Ref": Match.string_like_regexp("ReaperRole")}]}})
    statements = [s for p in policies.values() for s in p["Properties"]["PolicyDocument"]["Statement"]]
    (stop,) = [s for s in statements if s["Action"] == "sagemaker:StopTrainingJob"]
    assert json.dumps(stop["Resource"]).endswith(':training-job/ftstack--*"]]}')
    (listing,) = [s for s in statements if s["Action"] == "sagemaker:ListTrainingJobs"]
    assert listing["Resource"] == "*"


def test_no_unacknowledged_nag_finding(new_stack, nag_findings):
    app, stack = new_stack("Nag")
    build(stack)
    assert [f for f in nag_findings(app) if "/Reaper/" in f] == []


def summaries(*names: str) -> dict:
    return {"TrainingJobSummaries": [
        {"TrainingJobName": n, "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{n}",
         "CreationTime": "2026-11-29T10:00:00Z", "TrainingJobStatus": "InProgress"} for n in names]}


@pytest.mark.parametrize("execution", ["run1", "a" * 80, "nightly_run.2026"])
def test_stops_every_running_job_of_the_execution_and_no_other(execution):
    own = job_name_prefix("ftstack", execution)
    listed = summaries(f"{own}-a0", f"{own}-a1", f"{own}0-a0", f"{own}-a1-copy")
    answers = {("sagemaker", "ListTrainingJobs"): [lambda r: listed], ("sagemaker", "StopTrainingJob"): [lambda r: {}]}
    with mock_aws(), AwsCalls(answers) as calls:
        event = {"detail": {"name": execution, "status": "ABORTED"}}
        result = stop_jobs(event, "ftstack", boto3.client("sagemaker", region_name="us-east-1"))
    assert calls.problems() == []
    (listing,) = calls.of("sagemaker", "ListTrainingJobs")
    assert listing.params["NameContains"] == f"{own}-a" and listing.params["StatusEquals"] == "InProgress"
    assert [c.params["TrainingJobName"] for c in calls.of("sagemaker", "StopTrainingJob")] == [f"{own}-a0", f"{own}-a1"]
    assert result["stopped"] == [f"{own}-a0", f"{own}-a1"]


def test_a_succeeded_execution_stops_nothing():
    with mock_aws(), AwsCalls({}) as calls:
        result = stop_jobs({"detail": {"name": "run1", "status": "SUCCEEDED"}}, "ftstack", boto3.client("sagemaker", region_name="us-east-1"))
    assert result["stopped"] == [] and calls.of("sagemaker", "ListTrainingJobs") == []
