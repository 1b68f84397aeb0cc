"""The staging function trusts no execution name or input from its event (issue 11, item 4): it
stages only a running execution of its own state machine, as Step Functions describes it (moto's
Step Functions here), and an invocation for anything else is refused before anything is written."""

from __future__ import annotations

import pytest
from aws_contract import operation, problems

from ftstack.infra.stage_data import handler as stage_data
from ftstack.infra.stage_data.handler import ExecutionRefused, InvalidInput

from test_stage_data import (  # noqa: F401 (fixtures)
    BUCKET, ROLE, STATE_MACHINE_ARN, TRAIN, WAITING, client, invoke, put, read, records, s3, sfn_client, start, written,
)


@pytest.fixture
def describes(s3):
    """The DescribeExecution requests the function sends."""
    sent = []
    events = stage_data._client("stepfunctions").meta.events
    events.register("before-parameter-build.sfn.DescribeExecution", lambda params, **_: sent.append(dict(params)),
                    unique_id="record-describe")
    yield sent
    events.unregister("before-parameter-build.sfn.DescribeExecution", unique_id="record-describe")


def stage(event: object) -> dict:
    return stage_data.handler(event, None)


def test_an_event_that_names_an_execution_and_its_input_is_refused(s3, describes):
    """What the function took before: a name and an input, which anyone able to invoke it could
    set to another execution's, and so overwrite its staged data."""
    put(s3, TRAIN, records(40))
    with pytest.raises(ExecutionRefused, match=r'takes only \{"execution_arn": \$\$\.Execution\.Id\} from its state '
                                               r"machine, got \{'execution': 'victim'"):
        stage({"execution": "victim", "input": {"train_data": TRAIN}})
    arn = start({"train_data": TRAIN}, "victim")
    with pytest.raises(ExecutionRefused, match="takes only"):  # an input beside the ARN is not taken either
        stage({"execution_arn": arn, "input": {"train_data": TRAIN, "test_split": 0.5}})
    assert written(s3) == [] and describes == []


@pytest.mark.parametrize("other", ["Other-workflow", "Test-workflow2"])  # the second shares our name's start
def test_an_execution_of_another_state_machine_is_refused_without_asking(s3, describes, other):
    put(s3, TRAIN, records(40))
    machine = sfn_client().create_state_machine(name=other, definition=WAITING, roleArn=ROLE)["stateMachineArn"]
    arn = start({"train_data": TRAIN}, "run-1", state_machine=machine)
    with pytest.raises(ExecutionRefused, match=f"{arn} is not an execution of this stack's state machine {STATE_MACHINE_ARN}"):
        stage({"execution_arn": arn})
    assert written(s3) == [] and describes == []


def test_a_finished_execution_is_refused(s3, describes):
    put(s3, TRAIN, records(40))
    arn = start({"train_data": TRAIN}, "run-1")
    sfn_client().stop_execution(executionArn=arn)
    with pytest.raises(ExecutionRefused, match="execution 'run-1' is ABORTED, not RUNNING; only a running execution is staged"):
        stage({"execution_arn": arn})
    assert written(s3) == []
    assert describes == [{"executionArn": arn}]
    assert problems(operation("stepfunctions", "DescribeExecution").input_shape, describes[0]) == []


def test_an_execution_that_does_not_exist_is_refused(s3):
    arn = STATE_MACHINE_ARN.replace(":stateMachine:", ":execution:") + ":never-started"
    with pytest.raises(ExecutionRefused, match=f"{arn}: Step Functions knows no such execution"):
        stage({"execution_arn": arn})
    assert written(s3) == []


def test_name_and_input_come_from_step_functions(s3, describes):
    put(s3, TRAIN, records(40))
    result = invoke({"train_data": TRAIN, "test_split": 0.5}, execution="run-7")
    assert result["train"]["s3_uri"].startswith(f"s3://{BUCKET}/scratch/run-7/data/")
    assert (result["train"]["records"], result["test"]["records"]) == (20, 20)  # the execution's own test_split
    (request,) = describes
    assert problems(operation("stepfunctions", "DescribeExecution").input_shape, request) == []


def test_staging_again_for_a_running_execution_cannot_change_what_it_staged(s3):
    """Even an invocation for a running execution of the workflow (the one thing the function
    accepts) writes a folder of its own and leaves the execution's staged data as it was."""
    put(s3, TRAIN, records(40))
    arn = start({"train_data": TRAIN}, "victim")
    first = stage({"execution_arn": arn})
    before = {key: s3.head_object(Bucket=BUCKET, Key=key)["ETag"] for key in written(s3)}
    put(s3, TRAIN, records(40, start=500))  # and with other data uploaded under the same key
    second = stage({"execution_arn": arn})
    assert second["train"]["s3_uri"] != first["train"]["s3_uri"]
    assert {key: s3.head_object(Bucket=BUCKET, Key=key)["ETag"] for key in before} == before
    assert read(s3, first["train"]["s3_uri"] + "train.jsonl").startswith(records(1))


def test_an_execution_name_that_cannot_name_a_folder_is_refused(s3):
    put(s3, TRAIN, records(40))
    with pytest.raises(InvalidInput, match=r"the execution name '\.\.' cannot name the run's folders"):
        invoke({"train_data": TRAIN}, execution="..")
    assert written(s3) == []


def test_the_function_needs_its_state_machine(s3, monkeypatch):
    monkeypatch.delenv("STATE_MACHINE_ARN")
    with pytest.raises(RuntimeError, match="STATE_MACHINE_ARN is not set; redeploy the stack"):
        stage({"execution_arn": "arn:aws:states:us-east-1:123456789012:execution:Test-workflow:run-1"})

