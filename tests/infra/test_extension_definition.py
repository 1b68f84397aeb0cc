"""The workflow's definition with extension steps is one Step Functions accepts: no state that
nothing transitions to (MISSING_TRANSITION_TARGET), and no state name twice in the whole state
machine, Parallel branches included. statelint applies the same two rules as CreateStateMachine."""

from __future__ import annotations

import dataclasses
import json

import aws_cdk as cdk
import pytest
from aws_cdk import aws_stepfunctions as sfn
from statelint.linter import Linter

from ftstack.infra.definition import PLACEHOLDERS, WorkflowSettings, build_definition, render
from ftstack.infra.options import PropsError
from ftstack.infra.pipeline import _extension_graphs
from ftstack.infra.props import FineTuningPipelineProps
from ftstack.infra.settings import GateCondition

SETTINGS = WorkflowSettings(
    region="us-east-1", volume_size_gb=500, max_runtime_s=86400, max_wait_s=172800, max_instance_count=4,
    network_isolation=False, subnets=(), security_groups=(), approval_status="PendingManualApproval",
    quality_threshold=None, volume_kms_instance_types=("ml.p3.2xlarge",),
)
EVALUATED = {"metrics": {"accuracy": 0.9}}


def definition(quality_threshold: float | None = None, **steps) -> dict:
    props = FineTuningPipelineProps(name="team", **steps)
    graphs, _ = _extension_graphs(props)
    settings = dataclasses.replace(SETTINGS, quality_threshold=quality_threshold, gate=props.gate, extensions=graphs)
    text = render(build_definition(settings))
    for name in PLACEHOLDERS:
        text = text.replace("${" + name + "}", f"placeholder-{name.lower()}")
    return json.loads(text)


def scope() -> cdk.Stack:
    return cdk.Stack(cdk.App(), "Team")


@pytest.mark.parametrize("quality_threshold", [None, 1.5])
def test_evaluate_without_gate_conditions_leaves_no_unreachable_state(quality_threshold):
    asl = definition(quality_threshold, evaluate=sfn.Pass(scope(), "RunEvaluation", parameters=EVALUATED))
    assert [str(p) for p in Linter.validate(asl)] == []
    assert "EvaluationIncomplete" not in asl["States"]


def test_evaluate_with_gate_conditions_checks_the_metrics_first():
    asl = definition(evaluate=sfn.Pass(scope(), "RunEvaluation", parameters=EVALUATED),
                     gate=(GateCondition("accuracy", at_least=0.8),))
    assert [str(p) for p in Linter.validate(asl)] == []
    assert asl["States"]["EvaluationComplete?"]["Default"] == "EvaluationIncomplete"


@pytest.mark.parametrize(("point", "name"), [
    ("evaluate", "Evaluate"), ("after_registration", "NotifySuccess"), ("after_staging", "Register"),
    ("after_staging", "AfterRegistration"),
])
def test_a_step_named_like_a_state_of_the_workflow_is_refused_naming_point_and_name(point, name):
    steps = {point: sfn.Pass(scope(), name)}
    if point != "after_registration":
        steps.setdefault("after_registration", sfn.Pass(scope(), "Ticket"))
    with pytest.raises(PropsError, match=rf"FineTuningPipelineProps\.{point}: a step is named '{name}'.*construct id"):
        definition(**steps)


def test_two_points_may_not_share_a_step_name():
    with pytest.raises(PropsError, match=r"FineTuningPipelineProps\.after_staging: a step is named 'Notify'"):
        definition(after_staging=sfn.Pass(scope(), "Notify"), after_registration=sfn.Pass(scope(), "Notify"))


def test_steps_of_their_own_names_pass():
    asl = definition(after_staging=sfn.Pass(scope(), "ScanForPii"),
                     evaluate=sfn.Pass(scope(), "RunEvaluation", parameters=EVALUATED),
                     after_registration=sfn.Pass(scope(), "OpenTicket"))
    assert [str(p) for p in Linter.validate(asl)] == []
