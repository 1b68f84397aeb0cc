"""The README documents what the code does: its reference sections are generated from the code."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reference_sections_are_current():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (ROOT / "README.md").read_text()
    assert module.render(text) == text, "run: make docs"


def test_readme_shows_the_two_set_up_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text


def deploy_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Deploy on AWS"):].split("\n## ", 1)[0]


def test_the_deploy_steps_work_from_any_region():
    """The registry of the AWS base image depends on the region: the steps must take the region
    from one variable and get the login from `make ecr-login`, not from a hard-coded registry."""
    steps = deploy_section().split("```sh", 1)[1].split("```", 1)[0]
    assert re.search(r"^REGION=\S+", steps, re.M)
    assert "npx cdk bootstrap aws://ACCOUNT/$REGION" in steps
    assert "make ecr-login REGION=$REGION" in steps
    assert re.search(r"npx cdk deploy -c region=\$REGION\b", steps)
    assert not re.search(r"\d{12}\.dkr\.ecr|--region [a-z]{2}-", steps), "a registry or region is hard-coded"


def test_make_ecr_login_logs_in_to_the_registry_of_the_region(tmp_path):
    """`make ecr-login REGION=...` as the README runs it: a real synth for that region, with `aws`
    and `docker` replaced by scripts that record what they were asked (no AWS account here)."""
    calls = tmp_path / "calls"
    for tool, body in (("aws", 'echo "aws $*" >> "$CALLS"; echo token'), ("docker", 'echo "docker $* <$(cat)" >> "$CALLS"')):
        (tmp_path / tool).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / tool).chmod(0o755)
    env = os.environ | {"PATH": f"{tmp_path}:{os.environ['PATH']}", "CALLS": str(calls)}
    # -o venv: use the environment as installed, never reinstall it from a test.
    result = subprocess.run(["make", "-o", "venv", "ecr-login", "REGION=ap-east-1", f"CDK_OUT={tmp_path / 'cdk.out'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls.read_text().splitlines() == [
        "aws ecr get-login-password --region ap-east-1",
        "docker login --username AWS --password-stdin 871362719292.dkr.ecr.ap-east-1.amazonaws.com <token",
    ]
