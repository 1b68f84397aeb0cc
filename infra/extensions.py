"""The workflow's extension points: steps of a pipeline's own, run at documented places.

Each point's steps run as the one branch of a Parallel state, which gives them exactly the input
below (``EXTENSION_INPUTS``), keeps what they return under the point's own path of the run's state
(``RESULT_PATHS``), and turns any failure of theirs into the run's failure notification. So the
steps cannot see or overwrite the rest of the run's state, and a step that ends with ``End`` or
``Succeed`` simply hands its output back.

- ``after_staging``: after the data is staged and before training (e.g. a PII scan). Its output is
  kept; failing stops the run before any instance starts.
- ``evaluate``: after training and before the quality gate (e.g. a SageMaker Processing job). It
  must return ``{"metrics": {"<name>": <number>, ...}}``; the gate's conditions read those
  metrics, and they are registered with the model.
- ``after_registration``: after the model is registered (e.g. open a ticket). Failing fails the
  run, whose notification says that the model is registered all the same.

Plain data, no CDK: the definition and the tests use it as it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ftstack_train.contract import FINAL_EVAL_CE

EXTENSION_INPUTS: dict[str, dict[str, Any]] = {
    "after_staging": {
        "execution.$": "$$.Execution.Name",
        "bucket": "${Bucket}",
        "train.$": "$.staged.train",
        "test.$": "$.staged.test",
        "dataset_sha256.$": "$.staged.dataset_sha256",
        "base_model.$": "$.staged.base_model.name",
        "hyperparameters.$": "$.staged.hyperparameters",
    },
    "evaluate": {
        "execution.$": "$$.Execution.Name",
        "bucket": "${Bucket}",
        "training_job.$": "$.job.name",
        "model_uri.$": "$.model.uri",
        "training_metrics.$": "$.metrics.final",
        "test.$": "$.staged.test",
        "base_model.$": "$.staged.base_model.name",
    },
    "after_registration": {
        "execution.$": "$$.Execution.Name",
        "model_package_arn.$": "$.registered.arn",
        "model_uri.$": "$.model.uri",
        "training_metrics.$": "$.metrics.final",
    },
}
"""What each point's steps receive: the Parameters of its Parallel state."""

RESULT_PATHS = {"after_staging": "$.after_staging", "evaluate": "$.evaluation", "after_registration": "$.after_registration"}
"""Where the run keeps what each point returned, as ``{"output": <what the steps returned>}``."""

EVALUATED = "$.evaluation.output.metrics"
"""The metrics that ``evaluate`` returned."""

STATE_NAMES = {"after_staging": "AfterStaging", "evaluate": "Evaluate", "after_registration": "AfterRegistration"}

_READ = re.compile(r"(?<![$\w])\$\.([A-Za-z_]\w*)")


def input_keys(point: str) -> list[str]:
    """The names the steps of ``point`` receive, e.g. ``model_uri``."""
    return [key.removesuffix(".$") for key in EXTENSION_INPUTS[point]]


def reads_outside_input(point: str, graph: Mapping[str, Any]) -> list[str]:
    """The members of its input that the first step of ``point`` reads and is not given, as
    ``"<state>: $.<name>"``. Only the first step's input is known before the run; later steps read
    what the steps before them returned."""
    start = graph["States"][graph["StartAt"]]
    given = set(input_keys(point))
    if start.get("InputPath") not in (None, "$"):
        texts = [start["InputPath"]]
    else:
        # A ResultSelector reads the task's result (a LambdaInvoke's $.Payload), not its input.
        reads = {k: v for k, v in start.items() if k != "ResultSelector"}
        texts = [value for key, value in _strings(reads) if key.endswith(".$") or key in ("Variable", "ItemsPath")]
    return [f"{graph['StartAt']}: $.{name}" for text in texts for name in _READ.findall(text) if name not in given]


def _strings(value: Any, key: str = "") -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(key, value)]
    if isinstance(value, Mapping):
        if "Branches" in value or "Iterator" in value or "ItemProcessor" in value:  # their own states read their own input
            value = {k: v for k, v in value.items() if k not in ("Branches", "Iterator", "ItemProcessor")}
        return [pair for k, v in value.items() for pair in _strings(v, k)]
    if isinstance(value, list):
        return [pair for item in value for pair in _strings(item, key)]
    return []


def extension_state(point: str, graph: Mapping[str, Any], next_state: str, on_error: str) -> dict[str, Any]:
    """The Parallel state that runs ``graph`` at ``point``, then goes to ``next_state``."""
    return {
        "Type": "Parallel",
        "Comment": f"ftstack extension point {point}",
        "Branches": [dict(graph)],
        "Parameters": EXTENSION_INPUTS[point],
        # $[0] always exists (a branch that succeeded returned something), so this cannot fail
        # with States.Runtime, which no Catch would handle.
        "ResultSelector": {"output.$": "$[0]"},
        "ResultPath": RESULT_PATHS[point],
        "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": on_error}],
        "Next": next_state,
    }


def evaluation_checks(metrics: list[str], next_state: str) -> dict[str, Any]:
    """Whether ``evaluate`` returned each metric the gate reads, as a number."""
    missing = "EvaluationIncomplete"
    # No literal braces in the Cause's template: they are States.Format's placeholders (AWS needs
    # them escaped, and moto's interpreter cannot take them at all).
    if not metrics:
        # No EvaluationIncomplete state then: Step Functions refuses a definition with a state that
        # nothing transitions to (MISSING_TRANSITION_TARGET: State "..." is not reachable).
        return {"EvaluationComplete?": {"Type": "Pass", "Next": next_state}}
    states: dict[str, Any] = {
        "EvaluationComplete?": {
            "Type": "Choice",
            "Choices": [{"And": [rule for m in metrics for rule in (
                {"Variable": f"{EVALUATED}.{m}", "IsPresent": True}, {"Variable": f"{EVALUATED}.{m}", "IsNumeric": True})],
                "Next": next_state}],
            "Default": missing,
        },
        missing: {
            "Type": "Pass",
            "Parameters": {
                "Error": "EvaluationIncomplete",
                "Cause.$": "States.Format('the evaluate step returned {}, which lacks a number for one of: "
                           + ", ".join(metrics) + "; it must return a metrics object of names to numbers; nothing was "
                           "registered', States.JsonToString($.evaluation.output))",
            },
            "ResultPath": "$.error",
            "Next": "NotifyError",
        },
    }
    return states


def state_names(states: Mapping[str, Any]) -> list[str]:
    """Every state name in ``states``, with those inside Parallel branches and Map iterators."""
    names = []
    for name, state in states.items():
        names.append(name)
        inner = [*state.get("Branches", []), *(state[k] for k in ("Iterator", "ItemProcessor") if k in state)]
        for graph in inner:
            names += state_names(graph.get("States", {}))
    return names


def clashing_state_names(states: Mapping[str, Any], extensions: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A message for each state of an extension point whose name the whole definition (``states``)
    holds more than once. Step Functions wants every state name unique in the whole state machine,
    Parallel branches included, and refuses the definition otherwise; a platform team's natural
    names (``Evaluate``, ``Register``, ``NotifySuccess``) are ftstack's own."""
    counts: dict[str, int] = {}
    for name in state_names(states):
        counts[name] = counts.get(name, 0) + 1
    return [f"FineTuningPipelineProps.{point}: a step is named {name!r}, as another state of the workflow is; state "
            "names must be unique in the whole state machine, so give the step another construct id (or state_name)"
            for point, graph in extensions.items() for name in dict.fromkeys(state_names(graph.get("States", {})))
            if counts.get(name, 0) > 1]


def gate_rules(quality_threshold: float | None, gate: tuple) -> list[dict[str, Any]]:
    """The quality gate's rules: the training's final eval cross-entropy at most the threshold,
    and each ``GateCondition`` on what ``evaluate`` returned."""
    rules = []
    if quality_threshold is not None:
        rules.append({"Variable": f"$.metrics.final.{FINAL_EVAL_CE}", "NumericLessThanEquals": quality_threshold})
    for condition in gate:
        path = f"{EVALUATED}.{condition.metric}"
        if condition.at_most is not None:
            rules.append({"Variable": path, "NumericLessThanEquals": condition.at_most})
        if condition.at_least is not None:
            rules.append({"Variable": path, "NumericGreaterThanEquals": condition.at_least})
    return rules


def contract_table() -> str:
    """The extension points' inputs and outputs as Markdown (the README embeds it)."""
    lines = ["| point | runs | receives | returns, kept at |", "|---|---|---|---|"]
    runs = {"after_staging": "after staging, before training", "evaluate": "after training, before the quality gate",
            "after_registration": "after registration, before the success notification"}
    returns = {"evaluate": '`{"metrics": {"<name>": <number>}}` (read by `gate`)'}
    for point, inputs in EXTENSION_INPUTS.items():
        received = ", ".join(f"`{k.removesuffix('.$')}`" for k in inputs)
        lines.append(f"| `{point}` | {runs[point]} | {received} | {returns.get(point, 'anything')}, "
                     f"`{RESULT_PATHS[point]}.output` |")
    return "\n".join(lines)
