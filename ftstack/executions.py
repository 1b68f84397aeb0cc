"""``ftstack status|list|stop|logs``: a run is an execution of the stack's workflow.

The training jobs of an execution are read from its history (the ``createTrainingJob`` tasks it
scheduled, in order), so the CLI needs no copy of the workflow's job naming rule.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timezone
from typing import Any

from .aws import (
    TRAINING_LOG_GROUP, AwsError, StackOutputs, aws_errors, error_code, execution_console_link, find_stack, session,
    training_log_link,
)

_NOT_FOUND = ("ExecutionDoesNotExist", "InvalidArn")


@dataclass
class Execution:
    """What ``ftstack status`` reports about one execution."""

    name: str
    arn: str
    status: str
    started: str
    stopped: str | None = None
    state: str | None = None
    """The state it is in (or last entered)."""
    training_jobs: list[str] = field(default_factory=list)
    """Every training job it started, the latest last (one per attempt)."""
    training_job_status: str | None = None
    """The latest job's status and secondary status, e.g. ``InProgress (Training)``."""
    model_package_arn: str | None = None
    error: str | None = None
    cause: str | None = None
    console: str = ""
    logs: str | None = None


def execution_arn(sfn: Any, outputs: StackOutputs, ref: str | None) -> str:
    """The ARN of execution ``ref`` (a name or an ARN; None: the latest one of the workflow)."""
    if ref is None:
        with aws_errors(f"listing executions of {outputs.state_machine_arn}"):
            found = sfn.list_executions(stateMachineArn=outputs.state_machine_arn, maxResults=1)["executions"]
        if not found:
            raise AwsError(f"the workflow of stack {outputs.stack!r} has no executions yet; start one with ftstack start")
        return found[0]["executionArn"]
    return ref if ref.startswith("arn:") else outputs.execution_arn(ref)


def describe(sfn: Any, arn: str, ref: str | None) -> dict:
    """DescribeExecution; AwsError naming ``ref`` and ``ftstack list`` when there is no such execution."""
    with aws_errors(f"reading execution {ref or arn}"):
        try:
            return sfn.describe_execution(executionArn=arn)
        except Exception as exc:
            if error_code(exc) in _NOT_FOUND:
                raise AwsError(f"execution {ref or arn!r} not found in this stack's workflow ({arn.rsplit(':', 1)[0]}); "
                               "`ftstack list` shows the recent ones (check --stack and --region)") from None
            raise


def history(sfn: Any, arn: str) -> list[dict]:
    """Every event of the execution, oldest first."""
    with aws_errors(f"reading the history of {arn}"):
        pages = sfn.get_paginator("get_execution_history").paginate(executionArn=arn)
        return [event for page in pages for event in page["events"]]


def training_jobs(events: list[dict]) -> list[str]:
    """The training jobs the execution asked SageMaker to create, in order."""
    jobs = []
    for event in events:
        details = event.get("taskScheduledEventDetails") or {}
        if details.get("resource") == "createTrainingJob" and details.get("resourceType", "").endswith("sagemaker"):
            name = json.loads(details.get("parameters") or "{}").get("TrainingJobName")
            if name and name not in jobs:
                jobs.append(name)
    return jobs


def current_state(events: list[dict]) -> str | None:
    """The state the execution entered last."""
    for event in reversed(events):
        entered = event.get("stateEnteredEventDetails")
        if entered:
            return entered["name"]
    return None


def utc_time(value: Any) -> str | None:
    """A time from an AWS response in UTC, so that it reads the same wherever the CLI runs."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if value else None


def _job_status(boto: Any, job: str) -> tuple[str, str | None]:
    """(status, failure reason) of ``job``; ``NotCreated`` for an attempt SageMaker refused (a
    quota, say): the workflow goes on to the next instance type, and no such job exists."""
    with aws_errors(f"reading training job {job}"):
        try:
            found = boto.client("sagemaker").describe_training_job(TrainingJobName=job)
        except Exception as exc:
            # SageMaker answers ValidationException "Requested resource not found." (moto: "Could
            # not find training job ...").
            missing = any(words in str(exc).lower() for words in ("not found", "not find", "does not exist"))
            if error_code(exc) in ("ValidationException", "ResourceNotFound") and missing:
                return "NotCreated", None
            raise
    status, secondary = found["TrainingJobStatus"], found.get("SecondaryStatus")
    status += f" ({secondary})" if secondary and secondary != status else ""
    return status, found.get("FailureReason")


def inspect(boto: Any, outputs: StackOutputs, ref: str | None) -> Execution:
    """Everything ``status`` prints about execution ``ref`` (default: the latest)."""
    sfn = boto.client("stepfunctions")
    arn = execution_arn(sfn, outputs, ref)
    found = describe(sfn, arn, ref)
    events = history(sfn, arn)
    run = Execution(name=found["name"], arn=arn, status=found["status"], started=utc_time(found["startDate"]),
                    stopped=utc_time(found.get("stopDate")), state=current_state(events), training_jobs=training_jobs(events),
                    error=found.get("error"), cause=found.get("cause"), console=execution_console_link(outputs.region, arn))
    if run.training_jobs:
        run.training_job_status, reason = _job_status(boto, run.training_jobs[-1])
        run.cause = run.cause or reason
        run.logs = training_log_link(outputs.region, run.training_jobs[-1])
    try:
        run.model_package_arn = json.loads(found.get("output") or "{}").get("registered", {}).get("arn")
    except (ValueError, AttributeError):
        pass  # an output without a registered model (the run failed or is still going)
    return run


def show_status(args: argparse.Namespace) -> int:
    """``ftstack status [EXECUTION]``."""
    boto = session(args.region)
    run = inspect(boto, find_stack(boto, args.stack), args.execution)
    if args.json:
        print(json.dumps(asdict(run), indent=2))
        return 0
    rows = [("execution", run.name), ("status", run.status), ("state", run.state), ("started", run.started),
            ("stopped", run.stopped), ("training job", ", ".join(run.training_jobs) or None),
            ("job status", run.training_job_status), ("model package", run.model_package_arn),
            ("error", run.error), ("cause", run.cause), ("console", run.console), ("logs", run.logs)]
    print("\n".join(f"{label + ':':<16}{value}" for label, value in rows if value))
    return 0


def list_runs(args: argparse.Namespace) -> int:
    """``ftstack list``: the most recent executions, newest first."""
    boto = session(args.region)
    outputs = find_stack(boto, args.stack)
    sfn = boto.client("stepfunctions")
    request = {"stateMachineArn": outputs.state_machine_arn, "maxResults": args.max}
    if args.status:
        request["statusFilter"] = args.status
    with aws_errors(f"listing executions of {outputs.state_machine_arn}"):
        found = sfn.list_executions(**request)["executions"]
    runs = [{"name": e["name"], "status": e["status"], "started": utc_time(e["startDate"]),
             "stopped": utc_time(e.get("stopDate")), "arn": e["executionArn"]} for e in found]
    if args.json:
        print(json.dumps(runs, indent=2))
    elif not runs:
        print(f"no executions of {outputs.state_machine_arn} yet; start one with ftstack start", file=sys.stderr)
    else:
        width = max(len(r["name"]) for r in runs)
        print(f"{'NAME':<{width}}  {'STATUS':<9}  {'STARTED':<23}  STOPPED")
        for r in runs:
            print(f"{r['name']:<{width}}  {r['status']:<9}  {r['started']:<23}  {r['stopped'] or '-'}")
    return 0


def stop_run(args: argparse.Namespace) -> int:
    """``ftstack stop EXECUTION``: stops the execution, then its training jobs still in progress.

    The stack's job reaper stops them too once the execution is aborted; stopping them here as
    well makes the command's effect visible at once and does not depend on that rule's delivery.
    """
    boto = session(args.region)
    outputs = find_stack(boto, args.stack)
    sfn = boto.client("stepfunctions")
    arn = execution_arn(sfn, outputs, args.execution)
    found = describe(sfn, arn, args.execution)
    if found["status"] == "RUNNING":
        with aws_errors(f"stopping execution {found['name']}"):
            sfn.stop_execution(executionArn=arn, error="StoppedByOperator", cause="ftstack stop")
        print(f"stopped execution {found['name']}")
    else:
        print(f"execution {found['name']} already ended ({found['status']})")
    sagemaker = boto.client("sagemaker")
    for job in training_jobs(history(sfn, arn)):
        status, _ = _job_status(boto, job)
        if status.startswith("InProgress"):
            with aws_errors(f"stopping training job {job}"):
                sagemaker.stop_training_job(TrainingJobName=job)
            print(f"stopping training job {job} (it saves a checkpoint first; resume with --resume-from {found['name']})")
        else:
            print(f"training job {job}: {status}")
    return 0


def print_logs(args: argparse.Namespace) -> int:
    """``ftstack logs EXECUTION [--follow]``: the latest training job's CloudWatch log streams."""
    boto = session(args.region)
    outputs = find_stack(boto, args.stack)
    sfn = boto.client("stepfunctions")
    arn = execution_arn(sfn, outputs, args.execution)
    describe(sfn, arn, args.execution)
    logs = boto.client("logs")
    job, start, seen = None, 0, set()
    while True:
        jobs = training_jobs(history(sfn, arn))
        if jobs and jobs[-1] != job:
            job, start, seen = jobs[-1], 0, set()  # a new attempt: its streams start afresh
            print(f"== training job {job} ({training_log_link(outputs.region, job)})", file=sys.stderr)
        if job:
            start = print_log_events(logs, job, start, seen)
        running = describe(sfn, arn, args.execution)["status"] == "RUNNING"
        if not args.follow or not running:
            break
        time.sleep(args.poll)
    if job is None:
        state = current_state(history(sfn, arn))
        print(f"execution {args.execution or arn} has started no training job (state: {state}); "
              "`ftstack status` shows why", file=sys.stderr)
    return 0


def _log_line(event: dict) -> str | None:
    host = event["logStreamName"].split("/", 1)[-1]
    return f"[{host}] {event['message'].rstrip()}"


LATE_EVENTS_MS = 5 * 60 * 1000
"""How far before the newest event seen each poll reads again, for events delivered late."""


def print_log_events(logs: Any, job: str, start: int, seen: set, show: Any = _log_line) -> int:
    """Prints ``show(event)`` (unless None) for the job's log events from ``start`` (ms) not seen
    yet; returns where to go on from."""
    with aws_errors(f"reading the logs of training job {job}"):
        try:
            # Its streams first (``<job>/algo-N-...``): the trailing slash keeps attempt a1 from matching a10.
            pages = logs.get_paginator("describe_log_streams").paginate(
                logGroupName=TRAINING_LOG_GROUP, logStreamNamePrefix=f"{job}/")
            streams = [s["logStreamName"] for page in pages for s in page["logStreams"]]
            events = []
            for i in range(0, len(streams), 100):  # FilterLogEvents takes at most 100 stream names
                # From a while before the newest event seen: CloudWatch delivers the streams of a
                # job's hosts out of step, so an earlier event of one host can arrive after a
                # later one of another; ``seen`` drops the repeats.
                pages = logs.get_paginator("filter_log_events").paginate(
                    logGroupName=TRAINING_LOG_GROUP, logStreamNames=streams[i:i + 100],
                    startTime=max(0, start - LATE_EVENTS_MS))
                events += [e for page in pages for e in page["events"]]
        except Exception as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return start  # no job of this account and region has logged yet
            raise
    for event in sorted(events, key=lambda e: e["timestamp"]):
        if event["eventId"] in seen:
            continue  # read again: the poll looks back LATE_EVENTS_MS
        seen.add(event["eventId"])
        start = max(start, event["timestamp"])
        line = show(event)
        if line is not None:
            print(line, flush=True)
    return start
