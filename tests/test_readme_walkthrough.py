"""The README's operator walk-through, run as it is written against the deployed stack in moto
(tests/aws_fixtures.py): the `ftstack estimate`, `start`, `status`, `approve`, `deploy` and `invoke`
lines of its "Deploy on AWS" section, so that a new user who copies them gets a started (and here
finished) execution and an answer from the served model, and a stale flag or command in the
README fails this test. The steps before it (`make demo`: validate, local, generate) are what the
demo runs. The endpoint calls moto cannot serve are answered as in tests/test_deploy_cli.py."""

from __future__ import annotations

import io
import json
import re
import shlex
from pathlib import Path

from botocore.response import StreamingBody

from aws_fixtures import PACKAGE_ARN, model_packages_as_documented, run_cli, stack  # noqa: F401 (fixtures)
from test_deploy_cli import calls, endpoint, missing, register  # noqa: F401 (calls: a fixture)

README = Path(__file__).resolve().parents[1] / "README.md"
ON_A_STACK = ("estimate", "start", "status", "approve", "deploy", "invoke")


def readme_commands() -> list[list[str]]:
    """The README's `.venv/bin/ftstack ...` lines for a deployed stack, in order: continuation
    lines joined, comments dropped, split as a shell splits them."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == [".venv/bin/ftstack"] and words[1] in ON_A_STACK:
                commands.append(words[1:])
    return commands


def test_the_readme_walk_through_starts_a_run_approves_serves_and_asks_its_model(stack, calls, model_packages_as_documented,
                                                                                 tmp_path, capsys):
    boto, _, _ = stack  # the fixture runs the test in tmp_path, where the README's files are
    records = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(40)]
    for name, rows in (("train.jsonl", records), ("test.jsonl", records[:5])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    sagemaker = boto.client("sagemaker")  # what the workflow registers (the stand-in names it)
    assert register(boto, status="PendingManualApproval") == PACKAGE_ARN
    calls.answers[("sagemaker", "DescribeEndpoint")] = [missing, endpoint("Creating"), endpoint("InService")]
    answer = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Athens"}}]}).encode()
    calls.answers[("sagemaker-runtime", "InvokeEndpoint")] = [
        lambda request: {"Body": StreamingBody(io.BytesIO(answer), len(answer)), "ContentType": "application/json"}]

    commands = readme_commands()
    assert [c[0] for c in commands] == list(ON_A_STACK)
    for command in commands:
        if command[0] in ("start", "deploy"):
            command += ["--poll", "0.05"]  # the waits' polling interval, hidden from --help
        command = [PACKAGE_ARN if word == "MODEL_PACKAGE_ARN" else word for word in command]
        code, out, err = run_cli(capsys, *command)
        assert code == 0, (command, out, err)
        if command[0] == "estimate":
            assert "FITS" in out and "steps" in out
        if command[0] == "start":
            assert out.endswith(f"succeeded: model package {PACKAGE_ARN}\n  approve it with: ftstack approve {PACKAGE_ARN}\n")
        if command[0] == "status":
            assert "my-run-001" in out and "SUCCEEDED" in out
        if command[0] == "deploy":  # with the stack's serving role (its ServingRoleArn output)
            assert "is InService" in out
            assert calls.of("sagemaker", "CreateModel")[0].params["ExecutionRoleArn"].endswith(":role/ftstack-Serving")
        if command[0] == "invoke":
            assert out == "Athens\n"
    assert sagemaker.describe_model_package(ModelPackageName=PACKAGE_ARN)["ModelApprovalStatus"] == "Approved"
