"""Which execution the staging function stages: asked of Step Functions, never taken from the event.

The state machine passes only its execution's ARN (``$$.Execution.Id``). The function stages an
execution only when it is running and belongs to its own state machine (``STATE_MACHINE_ARN`` in
its environment), and takes the execution's name and input from Step Functions' answer. Whoever
else can invoke the function cannot make it write for a name or an input that no running execution
of the workflow has; and since every invocation writes a new folder and never replaces an object,
not even an invocation for a running execution can change what that execution staged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STATE_MACHINE_VARIABLE = "STATE_MACHINE_ARN"
"""The function's environment variable holding its state machine's ARN."""


class ExecutionRefused(Exception):
    """The invocation is not for a running execution of the function's own state machine."""


@dataclass(frozen=True)
class Execution:
    """A running execution of the workflow, as Step Functions describes it."""

    name: str
    """The execution's name: its folders and job names are made from it."""
    input: Any
    """The input it was started with, parsed from JSON."""


def running_execution(event: Any, sfn: Any, state_machine_arn: str) -> Execution:
    """The execution named by ``event["execution_arn"]``, checked with DescribeExecution."""
    arn = event.get("execution_arn") if isinstance(event, Mapping) else None
    if not isinstance(arn, str) or set(event) != {"execution_arn"}:
        # The old event carried the name and input themselves, which anyone could forge.
        raise ExecutionRefused(
            f"the staging function takes only {{\"execution_arn\": $$.Execution.Id}} from its state machine, got "
            f"{_shown(event)}; start an execution of the workflow instead of invoking the function")
    # Executions of a state machine have its ARN with "execution" for "stateMachine", then ":<name>".
    own = state_machine_arn.replace(":stateMachine:", ":execution:", 1) + ":"
    if not arn.startswith(own):
        raise ExecutionRefused(f"{arn} is not an execution of this stack's state machine {state_machine_arn}; "
                               "the function stages only its own workflow's executions")
    try:
        described = sfn.describe_execution(executionArn=arn)
    except sfn.exceptions.ExecutionDoesNotExist:
        raise ExecutionRefused(f"{arn}: Step Functions knows no such execution") from None
    if described["stateMachineArn"] != state_machine_arn:
        raise ExecutionRefused(f"{arn} belongs to {described['stateMachineArn']}, not to {state_machine_arn}")
    if described["status"] != "RUNNING":
        raise ExecutionRefused(f"execution {described.get('name', arn)!r} is {described['status']}, not RUNNING; "
                               "only a running execution is staged")
    try:
        input_ = json.loads(described["input"])
    except (KeyError, TypeError, ValueError):
        raise ExecutionRefused(f"Step Functions gave no JSON input for {arn}") from None
    return Execution(name=described["name"], input=input_)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."
