"""``ftstack start --wait``: follows an execution state by state, prints the training metrics as
the job logs them (the ``ftstack-metrics`` lines of ftstack_train.metrics), and ends with the model
package ARN, or with the failure and a non-zero exit."""

from __future__ import annotations

import sys
import time
from typing import Any

from .aws import StackOutputs, training_log_link
from .executions import describe, history, inspect, print_log_events, training_jobs, utc_time

EXIT_RUN_FAILED = 1
"""The run ended without a model (failed, stopped, timed out)."""


def metric_line(event: dict) -> str | None:
    """A metrics log line as ``step 12  loss 2.341  tokens/s 1234`` (or eval's cross-entropy); None for other lines."""
    from ftstack_train.metrics import PREFIX, parse_line

    message = event["message"]
    at = message.find(PREFIX + " ")
    try:
        parsed = parse_line(message[at:].strip()) if at >= 0 else None
    except ValueError:
        return None  # a line that only looks like one
    if parsed is None:
        return None
    kind, values = parsed
    step = f"step {int(values['step'])}" if "step" in values else kind
    if kind == "eval":
        return f"  {step}  eval cross-entropy {values.get('cross_entropy', float('nan')):.4f}"
    shown = [("loss", "loss", ".4f"), ("tokens/s", "tokens_per_s", ",.0f"), ("lr", "lr", ".2e")]
    return "  " + "  ".join([step] + [f"{label} {values[key]:{spec}}" for label, key, spec in shown if key in values])


def follow_execution(boto: Any, outputs: StackOutputs, arn: str, poll: float = 15.0) -> int:
    """Prints each state as the execution enters it and the job's metrics until it ends; returns
    0 when it registered a model, else EXIT_RUN_FAILED after printing why and the log link."""
    sfn, logs = boto.client("stepfunctions"), boto.client("logs")
    shown, job, start, seen = 0, None, 0, set()
    while True:
        running = describe(sfn, arn, None)["status"] == "RUNNING"  # read first: no event is missed at the end
        events = history(sfn, arn)
        for event in events[shown:]:
            entered = event.get("stateEnteredEventDetails")
            if entered:
                print(f"{utc_time(event['timestamp'])}  {entered['name']}", flush=True)
        shown = len(events)
        jobs = training_jobs(events)
        if jobs and jobs[-1] != job:
            job, start, seen = jobs[-1], 0, set()
            print(f"training job {job}", flush=True)
        if job:
            start = print_log_events(logs, job, start, seen, show=metric_line)
        if not running:
            break
        time.sleep(poll)
    return _verdict(boto, outputs, arn)


def _verdict(boto: Any, outputs: StackOutputs, arn: str) -> int:
    run = inspect(boto, outputs, arn)
    if run.status == "SUCCEEDED" and run.model_package_arn:
        print(f"succeeded: model package {run.model_package_arn}\n  approve it with: ftstack approve {run.model_package_arn}")
        return 0
    print(f"ftstack: run {run.name} {run.status} in state {run.state}: {run.error or ''}: {run.cause or 'no cause given'}",
          file=sys.stderr)
    if run.training_jobs:
        print(f"  logs: {training_log_link(outputs.region, run.training_jobs[-1])}", file=sys.stderr)
    print(f"  console: {run.console}", file=sys.stderr)
    return EXIT_RUN_FAILED
