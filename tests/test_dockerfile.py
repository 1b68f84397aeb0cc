"""What can be checked of the training image without a Docker engine: the base image is pinned,
everything it copies exists, dependencies are pinned and installed at build time, and the
entrypoint resolves to the launcher."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

CONTEXT = Path(__file__).resolve().parents[1] / "training_code"
_TEXT = re.sub(r"\\\n\s*", " ", (CONTEXT / "Dockerfile").read_text())  # join continued lines
LINES = [line.strip() for line in _TEXT.splitlines() if line.strip() and not line.startswith("#")]


def instructions(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in LINES if line.split(None, 1)[0].upper() == name]


def test_base_image_is_a_pinned_build_argument():
    (arg,) = [a for a in instructions("ARG") if a.startswith("BASE_IMAGE=")]
    image = arg.split("=", 1)[1]
    repository, _, tag = image.rpartition(":")
    assert repository.endswith("/pytorch-training") and re.match(r"^\d+\.\d+", tag), image
    assert instructions("FROM") == ["${BASE_IMAGE}"]


def test_copied_files_exist_in_the_build_context():
    for args in instructions("COPY"):
        *sources, _ = shlex.split(args)
        for source in sources:
            assert (CONTEXT / source).exists(), f"COPY {source}: missing from {CONTEXT.name}/"


def test_dependencies_are_pinned_and_installed_at_build_time():
    requirements = [line for line in (CONTEXT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert requirements and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.+-]*", r) for r in requirements), requirements
    assert not any(r.lower().startswith("torch==") for r in requirements), "torch comes from the base image"
    runs = " ".join(instructions("RUN"))
    assert "-r /opt/ftstack/requirements.txt" in runs
    assert "git clone" not in runs and "git+" not in runs


def test_entrypoint_resolves_to_the_launcher():
    (entrypoint,) = instructions("ENTRYPOINT")
    assert entrypoint == '["python", "-m", "ftstack_train.launch"]'
    workdir = instructions("WORKDIR")[-1]
    env = " ".join(instructions("ENV"))
    assert f"PYTHONPATH={workdir}" in env
    # The package as the image lays it out (CONTEXT/ftstack_train -> /opt/ftstack/ftstack_train).
    probe = (
        "import importlib.util, sys; spec = importlib.util.find_spec('ftstack_train.launch'); "
        f"assert spec.origin.startswith({str(CONTEXT)!r}), spec.origin; "
        "import ftstack_train.launch as l; assert callable(l.main)"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=CONTEXT, env={"PYTHONPATH": str(CONTEXT), "PATH": "/usr/bin:/bin"})
    assert importlib.util.find_spec("ftstack_train.launch") is not None
