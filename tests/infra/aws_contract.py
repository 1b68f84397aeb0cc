"""AWS's own request and response contracts, from botocore's service models, for the workflow tests.

``problems(shape, value)`` checks a request or a response against its shape: required and unknown
members, types, and also the lengths, patterns, ranges and enums that botocore's client-side
validation skips (it checks required members, types and minimums only).

``AwsCalls`` drives a state machine in moto's interpreter with its real Parameters: every service
call the interpreter makes goes through botocore, where it is recorded and checked against the
operation's input shape, and answered with the scripted response (checked against the output
shape) or error. Calls not scripted are left to moto (S3, SNS), so that they happen for real.
"""

from __future__ import annotations

import datetime
import functools
import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3
import botocore.session
import regex
from botocore.awsrequest import AWSResponse
from botocore.model import Shape

_SESSION = botocore.session.get_session()


def operation(service: str, name: str):
    """botocore's model of ``service``'s operation ``name`` (e.g. ``sagemaker``, ``CreateTrainingJob``)."""
    return _SESSION.get_service_model(service).operation_model(name)


def problems(shape: Shape | None, value: Any, path: str = "") -> list[str]:
    """Everything about ``value`` that ``shape`` does not allow, as ``path: problem`` lines."""
    if shape is None:
        return [] if value in (None, {}) else [f"{path or '<root>'}: the operation takes no members"]
    where = path or "<root>"
    meta = shape.metadata
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        found = [f"{where}.{name}: required member missing" for name in shape.required_members if name not in value]
        for name, item in value.items():
            if name not in shape.members:
                found.append(f"{where}.{name}: unknown member")
            else:
                found += problems(shape.members[name], item, f"{path}.{name}" if path else name)
        return found
    if kind == "list":
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        found = _range(where, len(value), meta, "items")
        for i, item in enumerate(value):
            found += problems(shape.member, item, f"{path}[{i}]")
        return found
    if kind == "map":
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        found = _range(where, len(value), meta, "entries")
        for key, item in value.items():
            found += problems(shape.key, key, f"{path}<key {key!r}>")
            found += problems(shape.value, item, f"{path}[{key!r}]")
        return found
    if kind == "string":
        if not isinstance(value, str):
            return [f"{where}: expected a string, got {type(value).__name__} {value!r}"]
        found = _range(where, len(value.encode("utf-16-le")) // 2, meta, "characters")  # Java counts UTF-16 units
        if "pattern" in meta and not java_pattern(meta["pattern"]).fullmatch(value):
            found.append(f"{where}: {value!r} does not match the pattern {meta['pattern']}")
        if shape.enum and value not in shape.enum:
            found.append(f"{where}: {value!r} is not one of {shape.enum}")
        return found
    if kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{where}: expected an integer, got {value!r}"]
        return _range(where, value, meta, "")
    if kind in ("float", "double"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [f"{where}: expected a number, got {value!r}"]
        return []
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{where}: expected true or false, got {value!r}"]
    if kind == "timestamp":
        return [] if isinstance(value, (datetime.datetime, str, int, float)) else [f"{where}: not a timestamp: {value!r}"]
    if kind == "blob":
        return [] if isinstance(value, (bytes, bytearray, str)) or hasattr(value, "read") else [f"{where}: not a blob"]
    raise AssertionError(f"{where}: no check for shape type {kind}")


_JAVA_DOT = "[^\\n\\r\\u0085\\u2028\\u2029]"


@functools.cache
def java_pattern(pattern: str) -> regex.Pattern:
    """AWS's ``pattern`` (a Java regular expression) for ``regex``, which reads its \\p{...} classes
    but whose ``.`` excludes only \\n where Java's excludes every line terminator."""
    out, escaped, depth = [], False, 0
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[":
            depth += 1
        elif char == "]" and depth:
            depth -= 1
        elif char == "." and not depth:
            char = _JAVA_DOT
        out.append(char)
    return regex.compile("".join(out))


def _range(where: str, size: int, meta: dict, unit: str) -> list[str]:
    found = []
    if "min" in meta and size < meta["min"]:
        found.append(f"{where}: {size} {unit} is below the minimum {meta['min']}".replace("  ", " "))
    if "max" in meta and size > meta["max"]:
        found.append(f"{where}: {size} {unit} is above the maximum {meta['max']}".replace("  ", " "))
    return found


@dataclass
class Call:
    """One service call the interpreter made: what it sent and what the contract says of it."""

    service: str
    operation: str
    params: dict[str, Any]
    problems: list[str]


Answer = Callable[[dict[str, Any]], dict[str, Any]]
"""Gives the response to a request (or raises ``AwsError``)."""


class AwsError(Exception):
    """A scripted error response: the API's own error code and message."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


@dataclass
class AwsCalls:
    """Records and answers the service calls of the interpreter (see the module docstring).

    ``answers[(service, operation)]`` is a list of answers used in turn (the last one repeats).
    """

    answers: dict[tuple[str, str], list[Answer]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    _served: defaultdict = field(default_factory=lambda: defaultdict(int))
    _ids: itertools.count = field(default_factory=itertools.count)

    def of(self, service: str, name: str) -> list[Call]:
        return [c for c in self.calls if (c.service, c.operation) == (service, name)]

    def problems(self) -> list[str]:
        return [f"{c.service}.{c.operation}: {p}" for c in self.calls for p in c.problems]

    def _record(self, params, model, **_):
        service = model.service_model.service_name
        if service == "stepfunctions":  # the test driving the interpreter, not the workflow
            return
        found = problems(model.input_shape, params)
        self.calls.append(Call(service, model.name, dict(params), found))

    def _answer(self, model, **_):
        key = (model.service_model.service_name, model.name)
        if key not in self.answers:
            return None  # moto serves it
        scripted = self.answers[key]
        answer = scripted[min(self._served[key], len(scripted) - 1)]
        self._served[key] += 1
        request_id = f"req-{next(self._ids)}"
        try:
            body = answer(self.calls[-1].params)
        except AwsError as err:
            meta = {"HTTPStatusCode": err.status, "RequestId": request_id}
            return AWSResponse("https://aws.invalid", err.status, {}, None), {
                "Error": {"Code": err.code, "Message": err.message}, "ResponseMetadata": meta}
        found = problems(model.output_shape, body)
        if found:  # a test's own response must have the API's real shape
            raise AssertionError(f"scripted {key} response does not fit the API: {found}")
        return AWSResponse("https://aws.invalid", 200, {}, None), {**body, "ResponseMetadata": {"HTTPStatusCode": 200, "RequestId": request_id}}

    def __enter__(self) -> AwsCalls:
        events = boto3._get_default_session()._session.get_component("event_emitter")
        events.register("before-parameter-build", self._record, unique_id="ftstack-record")
        events.register("before-call", self._answer, unique_id="ftstack-answer")
        return self

    def __exit__(self, *exc) -> None:
        events = boto3._get_default_session()._session.get_component("event_emitter")
        events.unregister("before-parameter-build", unique_id="ftstack-record")
        events.unregister("before-call", unique_id="ftstack-answer")


def run_execution(sfn: Any, machine_arn: str, name: str, execution_input: Any, timeout_s: float = 60) -> tuple[dict, list[dict], str]:
    """Starts an execution in moto's interpreter and waits for its end: (DescribeExecution, its
    history, its ARN)."""
    import json
    import time

    execution = sfn.start_execution(stateMachineArn=machine_arn, name=name, input=json.dumps(execution_input))["executionArn"]
    deadline = time.monotonic() + timeout_s
    while (result := sfn.describe_execution(executionArn=execution))["status"] == "RUNNING":
        assert time.monotonic() < deadline, "the execution did not end"
        time.sleep(0.02)
    return result, sfn.get_execution_history(executionArn=execution, maxResults=1000)["events"], execution


def endpoint_answer(status: str, config: str | Callable[[], str], reason: str | None = None, *, arn: str) -> Answer:
    """A DescribeEndpoint answer of the real shape: the endpoint on ``config`` (or on what
    ``config()`` names when asked), in ``status``, with SageMaker's ``reason`` if any."""
    def describe(request: dict[str, Any]) -> dict[str, Any]:
        body = {"EndpointName": request["EndpointName"], "EndpointArn": arn,
                "EndpointConfigName": config() if callable(config) else config, "EndpointStatus": status,
                "CreationTime": "2026-11-29T10:00:00Z", "LastModifiedTime": "2026-11-29T10:05:00Z"}
        return body | ({"FailureReason": reason} if reason else {})
    return describe


def created_config(calls: Callable[[], AwsCalls]) -> Callable[[], str]:
    """The name of the endpoint config that ``calls()`` asked to create last: an ``endpoint_answer``
    on the config the code under test made, named at run time."""
    return lambda: calls().of("sagemaker", "CreateEndpointConfig")[-1].params["EndpointConfigName"]


def endpoint_missing(request: dict[str, Any]) -> dict[str, Any]:
    """DescribeEndpoint's answer for an endpoint that does not exist."""
    raise AwsError("ValidationException", f'Could not find endpoint "{request["EndpointName"]}".')


def arn_answer(kind: str, key: str, arn_prefix: str) -> Answer:
    """A Create* answer: ``{"<kind>Arn": "<arn_prefix>/<the request's key>"}``."""
    return lambda request: {f"{kind}Arn": f"{arn_prefix}/{request[key]}"}


def lambda_invoke(handler: Callable[[dict[str, Any]], Any], errors: tuple[type[Exception], ...],
                  environment: dict[str, str] | None = None) -> Answer:
    """A Lambda Invoke answer that runs ``handler`` in-process on the request's payload, as the
    function would run: its result as the Payload, or one of ``errors`` the way Lambda reports an
    unhandled exception (``FunctionError: Unhandled``, the error's type and message as the Payload).
    ``environment``: what the runtime sets around the call (e.g. ``AWS_DEFAULT_REGION``)."""
    import io
    import json
    import os
    from unittest import mock

    from botocore.response import StreamingBody

    def invoke(request: dict[str, Any]) -> dict[str, Any]:
        with mock.patch.dict(os.environ, environment or {}):
            try:
                result, error = handler(json.loads(request["Payload"])), None
            except errors as exc:
                result, error = {"errorType": type(exc).__name__, "errorMessage": str(exc)}, "Unhandled"
        payload = json.dumps(result).encode()
        response = {"StatusCode": 200, "Payload": StreamingBody(io.BytesIO(payload), len(payload))}
        return response | ({"FunctionError": error} if error else {})
    return invoke
