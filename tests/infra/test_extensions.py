"""The extension points, driven in moto's interpreter with their real Parameters.

A platform team's steps are real CDK chainables (``LambdaInvoke`` on imported functions, a
``Pass``), turned into state graphs exactly as ``FineTuningPipeline`` does (``_extension_graphs``
on real props), and run inside the deployed definition (``test_workflow_behaviour.run``): the
staging Lambda is the real handler, every request is checked against botocore's model, and the
extension functions answer by their FunctionName. Then: the synth-time check of what a first step
reads, and the permissions the workflow role gets for the steps' tasks.
"""

from __future__ import annotations

import dataclasses
import io
import json

import aws_cdk as cdk
import pytest
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from aws_cdk.assertions import Template
from botocore.response import StreamingBody

from ftstack.infra.extensions import EXTENSION_INPUTS, input_keys
from ftstack.infra.options import PropsError
from ftstack.infra.pipeline import FineTuningPipeline, _extension_graphs
from ftstack.infra.props import EcrImage, FineTuningPipelineProps
from ftstack.infra.settings import ExtraMetric, GateCondition
from ftstack_train.metrics import METRIC_DEFINITIONS

from conftest import TEST_ENV
from iam_model import allows, resolve, resolved_resources, role_assumed_by, role_statements
from test_workflow_behaviour import (  # noqa: F401 (step_functions_as_documented: an autouse fixture)
    ACCOUNT, BUCKET, GOOD_INPUT, MANIFEST_DIGEST, REGION, RUN1, SETTINGS, VALUES, entered, messages, run, staging_lambda,
    step_functions_as_documented,
)

SCAN = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:pii-scan"
EVALUATE = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:evaluate"
TICKET = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:open-ticket"
GATE = (GateCondition(metric="accuracy", at_least=0.8),)
TAGS = {"team": "search", "cost-center": "ml-42"}
EXTRA = (ExtraMetric(name="pii_rate", regex=r"pii_rate=([0-9.]+)"),)
FINAL = {"eval_cross_entropy": 1.2, "eval_perplexity": 3.32, "step": 90, "model_manifest_sha256": MANIFEST_DIGEST}
"""What the training job writes to final-metrics.json (``run``'s default)."""
MODEL_URI = f"s3://{BUCKET}/executions/run1/model/{RUN1}-a0/output/model/"
PACKAGE = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/ftstack-models/1"


def stack() -> cdk.Stack:
    return cdk.Stack(cdk.App(), "Team", env=TEST_ENV)


def steps(scope: cdk.Stack) -> dict[str, sfn.IChainable]:
    """One step per point, as a platform team writes them."""
    def function(name: str, arn: str) -> lambda_.IFunction:
        return lambda_.Function.from_function_arn(scope, name, arn)

    return {
        # The function's answer is the step's output; it receives the state as it is.
        "after_staging": tasks.LambdaInvoke(scope, "ScanForPii", lambda_function=function("Scan", SCAN),
                                            payload_response_only=True),
        # The Lambda integration (lambda:invoke): the payload is the state, the metrics are picked out.
        "evaluate": tasks.LambdaInvoke(scope, "RunEvaluation", lambda_function=function("Evaluate", EVALUATE),
                                       result_selector={"metrics.$": "$.Payload.metrics"}),
        # Two steps: the first shapes the ticket from the documented input, the second opens it.
        "after_registration": sfn.Pass(scope, "DescribeTicket", parameters={
            "title": sfn.JsonPath.format("Review {}", sfn.JsonPath.string_at("$.model_package_arn")),
            "model.$": "$.model_uri", "eval_cross_entropy.$": "$.training_metrics.eval_cross_entropy",
        }).next(tasks.LambdaInvoke(scope, "OpenTicket", lambda_function=function("Ticket", TICKET),
                                   payload_response_only=True)),
    }


@pytest.fixture(scope="module")
def props() -> FineTuningPipelineProps:
    return FineTuningPipelineProps(name="ftstack", gate=GATE, tags=TAGS, extra_metrics=EXTRA, **steps(stack()))


@pytest.fixture(scope="module")
def settings(props):
    """The workflow settings of ``props``, as the pipeline makes them from its props."""
    graphs, _ = _extension_graphs(props)
    return dataclasses.replace(SETTINGS, extensions=graphs, gate=props.gate, tags=tuple(props.tags.items()),
                               extra_metrics=props.extra_metrics)


# --- the extension functions, answered by FunctionName --------------------------------------------

def answered(body, error: str | None = None):
    payload = json.dumps(body).encode()
    response = {"StatusCode": 200, "Payload": StreamingBody(io.BytesIO(payload), len(payload)), "ExecutedVersion": "$LATEST"}
    return response | ({"FunctionError": error} if error else {})


def functions(**by_arn):
    """The Invoke answer: the real staging handler for the staging function, ``by_arn[...]``'s
    answer (a callable on the payload) for an extension function."""
    staging = staging_lambda()
    replies = {SCAN: by_arn.get("scan", lambda event: {"pii_found": 0}),
               EVALUATE: by_arn.get("evaluate", lambda event: {"metrics": {"accuracy": 0.91, "bleu": 31.5}}),
               TICKET: by_arn.get("ticket", lambda event: {"ticket": "OPS-7"})}

    def invoke(request: dict) -> dict:
        if request["FunctionName"] == VALUES["StagingFunctionArn"]:
            return staging(request)
        reply = replies[request["FunctionName"]](json.loads(request["Payload"]))
        return answered(*reply) if isinstance(reply, tuple) else answered(reply)
    return invoke


def failing(error: str, message: str):
    return lambda event: ({"errorType": error, "errorMessage": message}, "Unhandled")


def payloads(calls, arn: str) -> list[dict]:
    return [json.loads(c.params["Payload"]) for c in calls.of("lambda", "Invoke") if c.params["FunctionName"] == arn]


def exited(events: list[dict], state: str) -> dict:
    (output,) = [json.loads(e["stateExitedEventDetails"]["output"]) for e in events
                 if e.get("stateExitedEventDetails", {}).get("name") == state]
    return output


# --- in the interpreter ---------------------------------------------------------------------------

def test_each_point_runs_in_order_with_its_documented_input_and_evaluate_reaches_the_gate(settings):
    result, events, calls = run({"invoke": [functions()]}, GOOD_INPUT, settings=settings)
    assert result["status"] == "SUCCEEDED", result
    states = entered(events)
    order = ["StageData", "AfterStaging", "ScanForPii", "Train", "PollJob", "ReadMetrics", "Evaluate", "RunEvaluation",
             "QualityGate", "Register", "AfterRegistration", "DescribeTicket", "OpenTicket", "NotifySuccess"]
    assert list(dict.fromkeys(s for s in states if s in order)) == order, states
    assert all(states.count(s) == 1 for s in order if s != "PollJob"), states
    staged = exited(events, "Staged")["staged"]
    assert payloads(calls, SCAN) == [{
        "execution": "run1", "bucket": BUCKET, "train": staged["train"], "test": staged["test"],
        "dataset_sha256": staged["dataset_sha256"], "base_model": staged["base_model"]["name"],
        "hyperparameters": staged["hyperparameters"],
    }]
    assert payloads(calls, EVALUATE) == [{
        "execution": "run1", "bucket": BUCKET, "training_job": f"{RUN1}-a0", "model_uri": MODEL_URI,
        "training_metrics": FINAL, "test": staged["test"], "base_model": staged["base_model"]["name"],
    }]
    assert payloads(calls, TICKET) == [{"title": f"Review {PACKAGE}", "model": MODEL_URI, "eval_cross_entropy": 1.2}]
    (register,) = calls.of("sagemaker", "CreateModelPackage")
    metadata = register.params["CustomerMetadataProperties"]
    assert metadata["evaluate.accuracy"] == "0.91" and "evaluate.bleu" not in metadata  # only what the gate reads
    final = json.loads(result["output"])
    assert final["after_staging"] == {"output": {"pii_found": 0}}
    assert final["after_registration"] == {"output": {"ticket": "OPS-7"}}


def test_the_tags_and_extra_metrics_of_the_props_are_on_the_training_job_request(settings):
    result, _, calls = run({"invoke": [functions()]}, GOOD_INPUT, settings=settings)
    assert result["status"] == "SUCCEEDED", result  # and run() checked every request against botocore's model
    (create,) = calls.of("sagemaker", "CreateTrainingJob")
    assert create.params["Tags"] == [{"Key": "ftstack:execution", "Value": "run1"},
                                     {"Key": "team", "Value": "search"}, {"Key": "cost-center", "Value": "ml-42"}]
    definitions = create.params["AlgorithmSpecification"]["MetricDefinitions"]
    assert {"Name": "pii_rate", "Regex": r"pii_rate=([0-9.]+)"} in definitions
    assert {d.name for d in METRIC_DEFINITIONS} <= {d["Name"] for d in definitions}  # ftstack's own stay


@pytest.mark.parametrize(("accuracy", "cause"), [
    (0.5, "accuracy 0.5 (at least 0.8)"),
    (0.79, "accuracy 0.79 (at least 0.8)"),
])
def test_a_metric_outside_the_gate_fails_the_run_naming_it_and_registers_nothing(settings, accuracy, cause):
    evaluate = lambda event: {"metrics": {"accuracy": accuracy}}  # noqa: E731
    result, events, calls = run({"invoke": [functions(evaluate=evaluate)]}, GOOD_INPUT, settings=settings)
    assert result["status"] == "FAILED" and result["error"] == "QualityGateFailed", result
    assert cause in result["cause"] and f"{RUN1}-a0" in result["cause"], result["cause"]
    assert calls.of("sagemaker", "CreateModelPackage") == [] and payloads(calls, TICKET) == []
    assert "QualityGateFailed" in entered(events) and "AfterRegistration" not in entered(events)
    (message,) = messages(calls)
    assert "QualityGateFailed" in message and cause in message


def test_the_gate_bound_itself_registers(settings):
    result, _, calls = run({"invoke": [functions(evaluate=lambda event: {"metrics": {"accuracy": 0.8}})]}, GOOD_INPUT,
                           settings=settings)
    assert result["status"] == "SUCCEEDED", result
    (register,) = calls.of("sagemaker", "CreateModelPackage")
    assert register.params["CustomerMetadataProperties"]["evaluate.accuracy"] == "0.8"


@pytest.mark.parametrize("returned", [
    {"metrics": {"bleu": 31.5}},           # not the gated metric
    {"metrics": {"accuracy": "0.91"}},     # a string, not a number
    {"metrics": {"accuracy": None}},
    {"metrics": {}},
    {"score": 0.91},                       # not under "metrics" (the selector then finds nothing)
])
def test_evaluate_without_a_number_for_a_gated_metric_fails_as_incomplete(returned):
    # The steps' own selector would fail on a missing $.Payload.metrics (States.Runtime); this
    # evaluate step returns the function's answer as it is, which is the contract's shape or not.
    scope = stack()
    evaluate = tasks.LambdaInvoke(scope, "RunEvaluation", payload_response_only=True,
                                  lambda_function=lambda_.Function.from_function_arn(scope, "Evaluate", EVALUATE))
    props = FineTuningPipelineProps(name="ftstack", gate=GATE, evaluate=evaluate)
    graphs, _ = _extension_graphs(props)
    settings = dataclasses.replace(SETTINGS, extensions=graphs, gate=props.gate)
    result, events, calls = run({"invoke": [functions(evaluate=lambda event: returned)]}, GOOD_INPUT, settings=settings)
    assert result["status"] == "FAILED" and result["error"] == "EvaluationIncomplete", result
    assert "accuracy" in result["cause"] and json.dumps(returned, separators=(",", ":")) in result["cause"], result["cause"]
    assert "QualityGate" not in entered(events)
    assert calls.of("sagemaker", "CreateModelPackage") == []
    (message,) = messages(calls)
    assert "EvaluationIncomplete" in message


def test_a_failing_after_staging_step_stops_the_run_before_any_job_with_its_error_in_the_notification(settings):
    scan = failing("PiiFound", "train.jsonl:3 holds an e-mail address")
    result, events, calls = run({"invoke": [functions(scan=scan)]}, GOOD_INPUT, settings=settings)
    assert result["status"] == "FAILED" and result["error"] == "PiiFound", result
    assert "train.jsonl:3 holds an e-mail address" in result["cause"]
    assert calls.of("sagemaker", "CreateTrainingJob") == [] and payloads(calls, EVALUATE) == []
    assert "Train" not in entered(events)
    (message,) = messages(calls)
    assert message.startswith("Execution run1 failed: PiiFound.") and "train.jsonl:3 holds an e-mail address" in message


def test_a_failing_after_registration_step_fails_the_run_saying_the_model_is_registered(settings):
    ticket = failing("TicketSystemDown", "503 from the ticket system")
    result, events, calls = run({"invoke": [functions(ticket=ticket)]}, GOOD_INPUT, settings=settings)
    assert result["status"] == "FAILED" and result["error"] == "TicketSystemDown", result
    assert "503 from the ticket system" in result["cause"]
    assert f"model package {PACKAGE} is registered all the same" in result["cause"], result["cause"]
    assert len(calls.of("sagemaker", "CreateModelPackage")) == 1
    assert "NotifySuccess" not in entered(events)
    (message,) = messages(calls)
    assert "TicketSystemDown" in message and f"{PACKAGE} is registered all the same" in message


# --- at synth -------------------------------------------------------------------------------------

def pipeline_props(scope: cdk.Stack, **extensions) -> FineTuningPipelineProps:
    """Props that synthesize offline: a brought image, a given inference image."""
    image = EcrImage(repository=ecr.Repository.from_repository_name(scope, "Image", "team-training"), tag_or_digest="v1")
    return FineTuningPipelineProps(name="team-a", training_image=image, inference_image=VALUES["InferenceImage"],
                                   **extensions)


def invoke_with(scope: cdk.Stack, payload: dict) -> tasks.LambdaInvoke:
    function = lambda_.Function.from_function_arn(scope, "Evaluate", EVALUATE)
    return tasks.LambdaInvoke(scope, "ReadModel", lambda_function=function, payload=sfn.TaskInput.from_object(payload),
                              result_selector={"metrics.$": "$.Payload.metrics"})


def test_a_first_step_reading_outside_its_input_is_refused_naming_the_point_state_and_path():
    scope = stack()
    evaluate = invoke_with(scope, {"model": sfn.JsonPath.string_at("$.modle_uri"), "job": sfn.JsonPath.string_at("$.training_job")})
    with pytest.raises(PropsError) as raised:
        FineTuningPipeline(scope, "Pipeline", pipeline_props(scope, evaluate=evaluate, gate=GATE))
    message = str(raised.value)
    assert message.startswith("FineTuningPipelineProps.evaluate: ") and "ReadModel: $.modle_uri" in message, message
    assert "training_job" not in message.split("not given")[0]  # a documented member is not named
    assert ", ".join(input_keys("evaluate")) in message  # what it does receive


def outside(point: str, build) -> list[str]:
    """What ``_extension_graphs`` refuses of a first step built by ``build(scope)`` at ``point``."""
    scope = stack()
    try:
        _extension_graphs(FineTuningPipelineProps(name="team-a", **{point: build(scope)}))
    except PropsError as exc:
        return [str(exc)]
    return []


@pytest.mark.parametrize(("point", "build", "read"), [
    ("after_staging", lambda s: sfn.Pass(s, "Scan", parameters={"uri.$": "States.Format('{}', $.staged.train)"}),
     "Scan: $.staged"),  # the run's state, not the step's input
    ("evaluate", lambda s: sfn.Pass(s, "Pick", input_path="$.metrics"), "Pick: $.metrics"),
    ("after_registration", lambda s: sfn.Choice(s, "Approved?").when(
        sfn.Condition.string_equals("$.registered.arn", "x"), sfn.Succeed(s, "Yes")).otherwise(sfn.Succeed(s, "No")),
     "Approved?: $.registered"),
])
def test_each_way_a_first_step_reads_its_input_is_checked(point, build, read):
    (message,) = outside(point, build)
    assert message.startswith(f"FineTuningPipelineProps.{point}: ") and read in message, message


@pytest.mark.parametrize(("point", "build"), [
    ("after_staging", lambda s: sfn.Pass(s, "Scan", parameters={"uri.$": "States.Format('{}', $.train)",
                                                                 "run.$": "$$.Execution.Name"})),
    ("after_staging", lambda s: sfn.Pass(s, "Scan", input_path="$.hyperparameters")),
    ("evaluate", lambda s: invoke_with(s, {"model": sfn.JsonPath.string_at("$.model_uri"),
                                           "ce": sfn.JsonPath.number_at("$.training_metrics.eval_cross_entropy")})),
    ("evaluate", lambda s: tasks.LambdaInvoke(s, "Whole", lambda_function=lambda_.Function.from_function_arn(
        s, "Evaluate", EVALUATE), result_selector={"metrics.$": "$.Payload.metrics"})),  # Payload.$: "$"
    ("after_registration", lambda s: sfn.Choice(s, "Good?").when(
        sfn.Condition.number_less_than("$.training_metrics.eval_cross_entropy", 1), sfn.Succeed(s, "Yes"))
     .otherwise(sfn.Pass(s, "Later", parameters={"arn.$": "$.anything"}))),  # a later step reads what it is given
])
def test_a_first_step_reading_documented_members_passes(point, build):
    assert outside(point, build) == []


def test_the_check_knows_every_documented_member():
    for point, inputs in EXTENSION_INPUTS.items():
        reads = {f"{key}.$": f"$.{key}" for key in input_keys(point)}
        assert outside(point, lambda s: sfn.Pass(s, "ReadAll", parameters=reads)) == [], point
        assert len(reads) == len(inputs)


@pytest.fixture(scope="module")
def synthesized_pipeline():
    """A pipeline with an imported function at evaluate and one of the stack's own at
    after_registration: ``(stack, template, ticket function, pipeline)``."""
    scope = stack()
    ticket = lambda_.Function(scope, "Ticket", runtime=lambda_.Runtime.PYTHON_3_12, handler="index.handler",
                              code=lambda_.Code.from_inline("def handler(event, context):\n    return {}\n"))
    evaluate = tasks.LambdaInvoke(scope, "RunEvaluation", result_selector={"metrics.$": "$.Payload.metrics"},
                                  lambda_function=lambda_.Function.from_function_arn(scope, "Evaluate", EVALUATE))
    opened = tasks.LambdaInvoke(scope, "OpenTicket", lambda_function=ticket, payload_response_only=True)
    pipeline = FineTuningPipeline(scope, "Pipeline", pipeline_props(scope, evaluate=evaluate, after_registration=opened,
                                                                     gate=GATE))
    return scope, Template.from_stack(scope), ticket, pipeline


def test_the_workflow_role_may_invoke_the_extension_functions_and_no_others(synthesized_pipeline):
    scope, template, ticket, _ = synthesized_pipeline
    resources = resolved_resources(scope, template)
    statements = role_statements(resources, role_assumed_by(resources, "states.amazonaws.com"))
    own = resolve(scope.resolve(ticket.function_arn), scope)
    for arn in (EVALUATE, f"{EVALUATE}:live", own, f"{own}:1"):
        assert allows(statements, "lambda:InvokeFunction", arn), arn
    for arn in (SCAN, TICKET, f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:evaluate-other"):
        assert not allows(statements, "lambda:InvokeFunction", arn), arn


def test_the_synthesized_definition_runs_the_steps_in_their_parallel_states(synthesized_pipeline):
    scope, template, ticket, pipeline = synthesized_pipeline
    (machine,) = template.find_resources("AWS::StepFunctions::StateMachine").values()
    states = json.loads(resolve(machine["Properties"]["DefinitionString"], scope))["States"]
    (evaluate,) = states["Evaluate"]["Branches"]
    bucket = resolve(scope.resolve(pipeline.bucket.bucket_name), scope)
    assert states["Evaluate"]["Type"] == "Parallel"
    assert states["Evaluate"]["Parameters"] == EXTENSION_INPUTS["evaluate"]  # ${Bucket}: CloudFormation substitutes it
    assert resolve(machine["Properties"]["DefinitionSubstitutions"]["Bucket"], scope) == bucket
    assert evaluate["States"]["RunEvaluation"]["Parameters"]["FunctionName"] == EVALUATE
    (registration,) = states["AfterRegistration"]["Branches"]
    assert registration["States"]["OpenTicket"]["Resource"] == resolve(scope.resolve(ticket.function_arn), scope)
