"""Stops the training jobs of an execution that ended without seeing them end.

The workflow starts its jobs through the ``aws-sdk`` integration and polls them
(``infra.training_states``), so unlike ``.sync`` nothing stops a running job when its execution
is aborted (StopExecution, the console), times out, or fails outside the poll loop. An
EventBridge rule on the state machine's "Execution Status Change" events calls this function,
which stops every job of that execution still in progress. It ships in the staging function's
asset (it needs ``job_name_prefix`` and nothing else from it).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from .request import ATTEMPT_SUFFIX, job_name_prefix

ENDED = ("ABORTED", "TIMED_OUT", "FAILED")
"""Execution statuses after which no state of the execution will look at its job again."""

JOB_PREFIX_ENV = "JOB_PREFIX"
HANDLER = "ftstack.infra.stage_data.stop_jobs.handler"
"""This function's handler, by its path in the staging asset."""


def handler(event: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """EventBridge entry point: ``detail`` is the Step Functions execution status change."""
    import boto3

    return stop_jobs(event, os.environ[JOB_PREFIX_ENV], boto3.client("sagemaker"))


def stop_jobs(event: Mapping[str, Any], job_prefix: str, sagemaker: Any) -> dict[str, Any]:
    """Stops the execution's jobs that are in progress; returns their names."""
    detail = event["detail"]
    execution, status = detail["name"], detail["status"]
    if status not in ENDED:
        return {"execution": execution, "status": status, "stopped": []}
    start = job_name_prefix(job_prefix, execution) + ATTEMPT_SUFFIX
    own = re.compile(re.escape(start) + r"\d+")  # NameContains matches anywhere in a name, not only at its start
    stopped = []
    for page in sagemaker.get_paginator("list_training_jobs").paginate(NameContains=start, StatusEquals="InProgress"):
        for summary in page["TrainingJobSummaries"]:
            name = summary["TrainingJobName"]
            if own.fullmatch(name):
                sagemaker.stop_training_job(TrainingJobName=name)
                stopped.append(name)
    result = {"execution": execution, "status": status, "stopped": stopped}
    print(json.dumps(result))  # the function's log says which jobs it stopped and why
    return result
