"""The operator's AWS commands (start, status, list, logs, stop, approve, reject) against moto.

moto stands in for a deployed stack: a CloudFormation stack with the outputs infra/stack.py
declares, the SSE-KMS, versioned data bucket, a state machine named like the workflow
(``<stack>-workflow``) that moto really runs, a model package group and the training jobs' log group.
The workflow's stand-in starts a training job the way the real one does (``aws-sdk:sagemaker:
createTrainingJob``), so the CLI finds it in the execution's history; with ``spot`` in the input
it then waits (a run in progress), with ``instance_count`` it fails as a job out of memory would, else it
ends with a registered model package as the real one does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from ftstack import aws as aws_module
from ftstack import executions, runs
from ftstack.cli import main

from aws_fixtures import BUCKET, PACKAGE_ARN, REGION, run_cli, stack  # noqa: F401 (stack: a fixture)

ROOT = Path(__file__).resolve().parents[1]
RECORDS = "".join(json.dumps({"prompt": f"What is {i} + 1?", "response": str(i + 1)}) + "\n" for i in range(30))


def _files(tmp_path: Path, bad_line: int | None = None) -> tuple[Path, Path]:
    lines = RECORDS.splitlines(keepends=True)
    if bad_line:
        lines[bad_line - 1] = '{"prompt": "no response here"}\n'
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(lines))
    test.write_text("".join(RECORDS.splitlines(keepends=True)[:10]))
    return train, test


def _objects(boto) -> list[dict]:
    return boto.client("s3").list_object_versions(Bucket=BUCKET).get("Versions", [])


def _wait_for(predicate, what: str) -> None:
    import time

    for _ in range(100):  # moto runs the execution in a thread of its own
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _executions(boto, machine: str) -> list[dict]:
    return boto.client("stepfunctions").list_executions(stateMachineArn=machine)["executions"]


# --- the contract with infra ------------------------------------------------------------------------

def test_execution_names_follow_the_workflows_rule():
    from ftstack.infra.stage_data.request import is_execution_name

    for name in ("run1", "a" * 80, "mpt_7b-lr-5e6"):
        runs.check_execution_name(name)
        assert is_execution_name(name)
    for name in ("a" * 81, "", "has space", "a/b", "x:y", "é"):
        with pytest.raises(aws_module.AwsError):
            runs.check_execution_name(name)


# --- start ------------------------------------------------------------------------------------------

def test_start_uploads_each_file_once_and_starts_the_workflow(stack, tmp_path, capsys):
    boto, machine, key = stack
    train, test = _files(tmp_path)
    code, out, err = run_cli(capsys, "start", "--train", str(train), "--test", str(test), "--name", "run1",
                             "--instance-type", "ml.g5.48xlarge", "--instance-count", "2", "--no-spot",
                             "--base-model", "mosaicml/mpt-7b", "max_duration=2ep", "optimizer.lr=5e-6")
    assert code == 0, err
    arn = f"{machine.replace(':stateMachine:', ':execution:')}:run1"
    assert f"arn:     {arn}" in out
    assert f"https://{REGION}.console.aws.amazon.com/states/home?region={REGION}#/v2/executions/details/{arn}" in out
    assert err.count("uploaded: ") == 2
    found = boto.client("stepfunctions").describe_execution(executionArn=arn)
    execution_input = json.loads(found["input"])
    train_uri = execution_input["train_data"]
    assert re.fullmatch(f"s3://{BUCKET}/incoming/[0-9a-f]{{16}}/train.jsonl", train_uri)
    assert execution_input == {
        "train_data": train_uri, "test_data": execution_input["test_data"], "base_model": "mosaicml/mpt-7b",
        "instance_type": "ml.g5.48xlarge", "instance_count": 2, "spot": False,
        "hyperparameters": {"max_duration": "2ep", "optimizer.lr": "5e-6"},
    }
    schema = json.loads((ROOT / "infra" / "execution_input.schema.json").read_text())
    jsonschema.validate(execution_input, schema)
    head = boto.client("s3").head_object(Bucket=BUCKET, Key=train_uri.split("/", 3)[3])
    import hashlib

    assert head["Metadata"]["sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()
    assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == key  # the bucket's key, not aws/s3

    # The same files again: nothing is uploaded (the versioned bucket keeps one version of each).
    code, out, err = run_cli(capsys, "start", "--train", str(train), "--test", str(test), "--name", "run2")
    assert code == 0, err
    assert err.count("already in S3 (same SHA-256)") == 2 and "uploaded: " not in err
    assert len(_objects(boto)) == 2
    second = json.loads(boto.client("stepfunctions").describe_execution(executionArn=arn[:-1] + "2")["input"])
    assert second == {"train_data": train_uri, "test_data": execution_input["test_data"]}


def test_start_with_uris_checks_them_and_uploads_nothing(stack, tmp_path, capsys):
    boto, machine, _ = stack
    boto.client("s3").put_object(Bucket=BUCKET, Key="incoming/mine/train.jsonl", Body=RECORDS.encode())
    # A base model that stage-model began to copy but did not finish: no manifest yet.
    boto.client("s3").put_object(Bucket=BUCKET, Key="base-models/mpt-7b/config.json", Body=b"{}")
    code, _, err = run_cli(capsys, "start", "--train", f"s3://{BUCKET}/incoming/mine/train.jsonl", "--name", "u0",
                           "--base-model", f"s3://{BUCKET}/base-models/mpt-7b/")
    assert code == 2 and "not completely staged" in err and "ftstack stage-model DIR --name mpt-7b" in err, err
    boto.client("s3").put_object(Bucket=BUCKET, Key="base-models/mpt-7b/.ftstack-staged.json", Body=b"{}")
    code, _, err = run_cli(capsys, "start", "--train", f"s3://{BUCKET}/incoming/mine/train.jsonl", "--name", "u1",
                           "--base-model", f"s3://{BUCKET}/base-models/mpt-7b/", "--force")
    assert code == 0, err
    (execution,) = _executions(boto, machine)
    assert json.loads(boto.client("stepfunctions").describe_execution(executionArn=execution["executionArn"])["input"]) \
        == {"train_data": f"s3://{BUCKET}/incoming/mine/train.jsonl", "base_model": f"s3://{BUCKET}/base-models/mpt-7b/",
            "force": True}

    for argv, message in (
        (("--train", f"s3://{BUCKET}/incoming/missing.jsonl"), "no such object"),
        (("--train", "s3://elsewhere/incoming/train.jsonl"), f"only from s3://{BUCKET}/incoming/"),
        (("--train", f"s3://{BUCKET}/incoming/mine/train.jsonl", "--base-model", "s3://elsewhere/m/"), "base-models/"),
    ):
        code, _, err = run_cli(capsys, "start", *argv)
        assert code == 2 and message in err, err
    assert len(_executions(boto, machine)) == 1


@pytest.mark.parametrize("argv, message", [
    (("--name", "bad name!"), "--name 'bad name!': use 1-80 letters"),
    (("--name", "x" * 81), "use 1-80"),
    (("optimzer.lr=1e-4",), "did you mean 'optimizer.lr'"),
    (("--instance-type", "p4d.24xlarge"), "is not a SageMaker training instance type"),
])
def test_start_refuses_bad_arguments_before_uploading(stack, tmp_path, capsys, argv, message):
    boto, machine, _ = stack
    train, _ = _files(tmp_path)
    code, _, err = run_cli(capsys, "start", "--train", str(train), *argv)
    assert code == 2 and message in err, err
    assert _objects(boto) == [] and _executions(boto, machine) == []


def test_a_bad_file_names_its_line_and_nothing_is_uploaded(stack, tmp_path, capsys):
    boto, machine, _ = stack
    train, test = _files(tmp_path, bad_line=7)
    code, _, err = run_cli(capsys, "start", "--train", str(train), "--test", str(test))
    assert code == 2
    assert re.search(r"train\.jsonl:7: .*response", err), err
    assert _objects(boto) == [] and _executions(boto, machine) == []
    code, _, err = run_cli(capsys, "start", "--train", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "nope.jsonl" in err and _objects(boto) == []


# --- stack discovery errors -------------------------------------------------------------------------

def test_stack_errors_say_what_to_do(stack, tmp_path, capsys):
    train, _ = _files(tmp_path)
    code, _, err = run_cli(capsys, "start", "--train", str(train), "--stack", "nosuch")
    assert code == 2 and "stack 'nosuch' not found in region us-east-1" in err and "--region" in err
    code, _, err = run_cli(capsys, "list", "--region", "eu-west-1")  # deployed in us-east-1 only
    assert code == 2 and "not found in region eu-west-1" in err
    code, _, err = run_cli(capsys, "status", "--stack", "old")
    assert code == 2 and "has no output StateMachineArn, ModelPackageGroupName, TopicArn" in err and "redeploy" in err


def test_no_credentials(monkeypatch, tmp_path, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata lookup (no network here)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    code, _, err = run_cli(capsys, "list", "--region", REGION)
    assert code == 2 and "no AWS credentials found; run `aws configure`" in err
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    code, _, err = run_cli(capsys, "list")
    assert code == 2 and "no AWS region: give --region" in err


# --- status, list, stop, logs -----------------------------------------------------------------------

def _start(capsys, train: Path, name: str, *more: str) -> None:
    code, _, err = run_cli(capsys, "start", "--train", str(train), "--name", name, *more)
    assert code == 0, err


def test_status_and_list(stack, tmp_path, capsys):
    boto, machine, _ = stack
    train, _ = _files(tmp_path)
    code, _, err = run_cli(capsys, "status")
    assert code == 2 and "has no executions yet" in err
    _start(capsys, train, "done1")
    arn = f"{machine.replace(':stateMachine:', ':execution:')}:done1"
    sfn = boto.client("stepfunctions")
    _wait_for(lambda: sfn.describe_execution(executionArn=arn)["status"] == "SUCCEEDED", "the run to end")
    code, out, _ = run_cli(capsys, "status", "--json")  # the latest
    status = json.loads(out)
    assert (status["name"], status["status"], status["state"]) == ("done1", "SUCCEEDED", "Register")
    assert status["training_jobs"] == ["ftstack--done1-a0"] and status["training_job_status"] == "Completed"
    assert status["model_package_arn"] == PACKAGE_ARN
    code, out, _ = run_cli(capsys, "status", arn)
    assert code == 0 and f"model package:  {PACKAGE_ARN}\n" in out and "training job:   ftstack--done1-a0\n" in out
    assert f"model package:  {PACKAGE_ARN}" in out and "logStreamNameFilter$3Dftstack--done1-a0" in out

    _start(capsys, train, "going2", "--spot")
    code, out, _ = run_cli(capsys, "list", "--json")
    assert [(r["name"], r["status"]) for r in json.loads(out)] == [("going2", "RUNNING"), ("done1", "SUCCEEDED")]
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and re.search(r"going2\s+RUNNING", out.splitlines()[1])
    code, _, err = run_cli(capsys, "status", "nosuch")
    assert code == 2 and "execution 'nosuch' not found" in err and "ftstack list" in err


def test_stop_stops_the_execution_and_its_job(stack, tmp_path, capsys, monkeypatch):
    boto, machine, _ = stack
    train, _ = _files(tmp_path)
    _start(capsys, train, "run3", "--spot")
    arn = f"{machine.replace(':stateMachine:', ':execution:')}:run3"
    sfn = boto.client("stepfunctions")
    _wait_for(lambda: boto.client("sagemaker").list_training_jobs()["TrainingJobSummaries"], "the job to start")
    from moto.sagemaker.models import sagemaker_backends

    # moto finishes jobs at once and has no StopTrainingJob: the job is made InProgress, and the
    # stop request is answered here after checking it against the API's model.
    (job,) = [j for j in sagemaker_backends["123456789012"][REGION].training_jobs.values()
              if j.training_job_name == "ftstack--run3-a0"]
    job.training_job_status = "InProgress"
    stopped = []

    def answer(model, params, **_):
        from botocore.awsrequest import AWSResponse

        body = json.loads(params["body"])  # botocore has already validated it against the API's model
        assert model.name == "StopTrainingJob" and set(body) == {"TrainingJobName"}
        stopped.append(body["TrainingJobName"])
        return AWSResponse("", 200, {}, None), {}

    def recording_session(region):
        made = aws_module.session(region)
        made.events.register("before-call.sagemaker.StopTrainingJob", answer)
        return made

    monkeypatch.setattr(executions, "session", recording_session)
    code, out, err = run_cli(capsys, "stop", "run3")
    assert code == 0, err
    assert "stopped execution run3" in out and "stopping training job ftstack--run3-a0" in out
    assert stopped == ["ftstack--run3-a0"]
    assert sfn.describe_execution(executionArn=arn)["status"] in ("ABORTED", "RUNNING")  # moto aborts asynchronously
    code, _, err = run_cli(capsys, "stop", "nosuch")
    assert code == 2 and "not found" in err


def test_logs_prints_the_jobs_streams(stack, tmp_path, capsys):
    boto, machine, _ = stack
    train, _ = _files(tmp_path)
    _start(capsys, train, "run4", "--spot")
    sfn = boto.client("stepfunctions")
    arn = f"{machine.replace(':stateMachine:', ':execution:')}:run4"
    _wait_for(lambda: executions.training_jobs(executions.history(sfn, arn)), "the job to start")
    logs = boto.client("logs")
    logs.create_log_group(logGroupName="/aws/sagemaker/TrainingJobs")
    import time

    now = int(time.time() * 1000)
    for stream, lines in (("ftstack--run4-a0/algo-1-1700000000", ["step 1 loss 2.5", "step 2 loss 2.1"]),
                          ("ftstack--run4-a0/algo-2-1700000000", ["rank 8 ready"]),
                          ("ftstack--run4-a01/algo-1-1700000000", ["another job's line"])):
        logs.create_log_stream(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream)
        logs.put_log_events(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream,
                            logEvents=[{"timestamp": now + i, "message": m} for i, m in enumerate(lines)])
    code, out, err = run_cli(capsys, "logs", "run4")
    assert code == 0, err
    assert out.splitlines() == ["[algo-1-1700000000] step 1 loss 2.5", "[algo-2-1700000000] rank 8 ready",
                                "[algo-1-1700000000] step 2 loss 2.1"]
    assert "== training job ftstack--run4-a0" in err
    code, _, err = run_cli(capsys, "logs", "nosuch")
    assert code == 2 and "execution 'nosuch' not found" in err


# --- approve, reject --------------------------------------------------------------------------------

def test_approve_and_reject(stack, capsys):
    boto, _, _ = stack
    sagemaker = boto.client("sagemaker")
    sagemaker.create_model_package_group(ModelPackageGroupName="ftstack-models")
    arn = sagemaker.create_model_package(ModelPackageGroupName="ftstack-models",
                                         ModelApprovalStatus="PendingManualApproval")["ModelPackageArn"]
    code, out, err = run_cli(capsys, "approve", arn, "--reason", "eval CE 1.9 < 2.0")
    assert code == 0, err
    assert sagemaker.describe_model_package(ModelPackageName=arn)["ModelApprovalStatus"] == "Approved"
    code, out, err = run_cli(capsys, "reject", arn, "--reason", "regressed on the holdout")
    found = sagemaker.describe_model_package(ModelPackageName=arn)
    assert code == 0 and (found["ModelApprovalStatus"], found["ApprovalDescription"]) == ("Rejected", "regressed on the holdout")
    assert out.strip() == f"{arn}: Rejected (regressed on the holdout)"

    with pytest.raises(SystemExit) as exited:
        main(["reject", arn])  # the reason is required
    assert exited.value.code == 2 and "--reason" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "approve", "ftstack-models/1")
    assert code == 2 and "is not a model package ARN" in err
    code, _, err = run_cli(capsys, "approve", arn.replace("/1", "/99"))
    assert code == 2 and "not found" in err, err


def test_a_big_file_goes_in_parts_with_a_progress_line(stack, tmp_path):
    import hashlib
    import io

    from ftstack.upload import upload_file

    boto, _, _ = stack

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * (17 * 1024 * 1024))  # two parts of at most 16 MB (upload_file checks no content)
    out = Terminal()
    done = upload_file(boto.client("s3"), BUCKET, big, out=out)
    assert done.uploaded
    head = boto.client("s3").head_object(Bucket=BUCKET, Key=done.uri.split("/", 3)[3])
    assert head["ETag"].endswith('-2"')  # a multipart upload of two parts
    assert head["Metadata"]["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    assert head["ContentLength"] == big.stat().st_size
    lines = out.getvalue()
    assert lines.startswith("\rbig.jsonl [") and "100% " in lines.split("\r")[-1] and lines.endswith("\n")
    assert upload_file(boto.client("s3"), BUCKET, big, out=Terminal()).uploaded is False


def test_start_wait_follows_the_run_to_its_model_package(stack, tmp_path, capsys):
    boto, _, _ = stack
    train, _ = _files(tmp_path)
    logs = boto.client("logs")  # the job's metrics, as the trainer prints them (the job name is the workflow's)
    logs.create_log_group(logGroupName="/aws/sagemaker/TrainingJobs")
    logs.create_log_stream(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName="ftstack--w1-a0/algo-1-1")
    import time

    from ftstack_train.metrics import format_line

    lines = ["loading model", format_line("train", step=10, loss=2.5, tokens_per_s=1234.5, lr=5e-6),
             format_line("eval", step=10, cross_entropy=2.25, perplexity=9.49, tokens=4096)]
    logs.put_log_events(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName="ftstack--w1-a0/algo-1-1",
                        logEvents=[{"timestamp": int(time.time() * 1000) + i, "message": m} for i, m in enumerate(lines)])
    code, out, err = run_cli(capsys, "start", "--train", str(train), "--name", "w1", "--wait", "--poll", "0.05")
    assert code == 0, err
    assert re.search(r"UTC  Train\n.*UTC  Hold\n.*UTC  Register\n", out, re.S), out
    assert "training job ftstack--w1-a0" in out
    assert "  step 10  loss 2.5000  tokens/s 1,234  lr 5.00e-06\n  step 10  eval cross-entropy 2.2500\n" in out
    assert "loading model" not in out
    assert out.endswith(f"succeeded: model package {PACKAGE_ARN}\n  approve it with: ftstack approve {PACKAGE_ARN}\n")

    code, out, err = run_cli(capsys, "start", "--train", str(train), "--name", "w2", "--instance-count", "3", "--wait",
                             "--poll", "0.05")
    assert code == 1
    assert "ftstack: run w2 FAILED in state TrainingFailed: TrainingFailed: CUDA out of memory" in err
    assert "logs: https://" in err and "logStreamNameFilter$3Dftstack--w2-a0" in err


def test_an_upload_s3_refuses_is_an_error_message_not_a_traceback(stack, tmp_path, capsys, monkeypatch):
    """boto3's transfer wraps the ClientError that failed an upload in S3UploadFailedError, which
    is neither a ClientError nor a BotoCoreError."""
    train, _ = _files(tmp_path)

    def deny(model, params, **_):
        from botocore.awsrequest import AWSResponse

        error = {"Error": {"Code": "AccessDenied", "Message": "not allowed to use the key"}}
        return AWSResponse("", 403, {}, None), error

    def denying_session(region):
        made = aws_module.session(region)
        made.events.register("before-call.s3.PutObject", deny)
        return made

    monkeypatch.setattr(runs, "session", denying_session)
    code, _, err = run_cli(capsys, "start", "--train", str(train), "--name", "denied")
    assert code == 2 and "Traceback" not in err
    assert "AccessDenied" in err and "lacks this permission" in err and str(train) in err, err


def test_an_attempt_sagemaker_refused_shows_as_not_created(stack):
    """A quota refusal leaves a scheduled CreateTrainingJob whose job does not exist: status,
    --wait and stop read it as NotCreated and carry on."""
    boto, _, _ = stack
    assert executions._job_status(boto, "ftstack--never-made-a0") == ("NotCreated", None)


def test_following_logs_shows_an_event_that_arrives_after_a_later_one(stack, capsys):
    """Hosts' streams are delivered out of step: a poll must still show algo-2's earlier event
    that arrived after algo-1's later one, and show nothing twice."""
    import time

    boto, _, _ = stack
    logs, group, now = boto.client("logs"), "/aws/sagemaker/TrainingJobs", int(time.time() * 1000)
    logs.create_log_group(logGroupName=group)
    for host in ("algo-1-1", "algo-2-1"):
        logs.create_log_stream(logGroupName=group, logStreamName=f"job-a0/{host}")
    logs.put_log_events(logGroupName=group, logStreamName="job-a0/algo-1-1", logEvents=[{"timestamp": now + 10, "message": "later"}])
    seen: set = set()
    start = executions.print_log_events(logs, "job-a0", 0, seen)
    logs.put_log_events(logGroupName=group, logStreamName="job-a0/algo-2-1", logEvents=[{"timestamp": now + 5, "message": "earlier"}])
    executions.print_log_events(logs, "job-a0", start, seen)
    assert capsys.readouterr().out.splitlines() == ["[algo-1-1] later", "[algo-2-1] earlier"]


def test_a_pipeline_in_a_shared_bucket_gets_its_uploads_in_its_folder(stack, tmp_path, capsys):
    """A stack whose pipeline has a prefix (its DataPrefix output): uploads go under
    <prefix>incoming/, and a URI outside that folder is refused before anything starts."""
    boto, machine, _ = stack
    train, _ = _files(tmp_path)
    code, out, err = run_cli(capsys, "start", "--stack", "team-a", "--train", str(train), "--name", "shared1")
    assert code == 0, err
    found = boto.client("stepfunctions").describe_execution(executionArn=f"{machine.replace(':stateMachine:', ':execution:')}:shared1")
    execution_input = json.loads(found["input"])
    assert re.fullmatch(f"s3://{BUCKET}/team-a/incoming/[0-9a-f]{{16}}/train.jsonl", execution_input["train_data"])
    jsonschema.validate(execution_input, json.loads((ROOT / "infra" / "execution_input.schema.json").read_text()))
    code, _, err = run_cli(capsys, "start", "--stack", "team-a", "--train", f"s3://{BUCKET}/incoming/other.jsonl")
    assert code != 0 and f"s3://{BUCKET}/team-a/incoming/" in err
    code, _, err = run_cli(capsys, "start", "--stack", "team-a", "--train", str(train),
                           "--base-model", f"s3://{BUCKET}/base-models/tiny/")
    assert code != 0 and f"s3://{BUCKET}/team-a/base-models/<name>/" in err
