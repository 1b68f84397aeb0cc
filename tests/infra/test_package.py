"""A platform team installs ftstack and imports its constructs: the wheel holds ``ftstack.infra``
(from ``infra/``) and the training image's build files, and a pipeline synthesized from the
installed package, in a directory that is not this repository, builds the very assets a clone
builds (same content, so the same asset hashes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "ftstack", "infra", "training_code")

SYNTH = """
import json, sys
from pathlib import Path
import aws_cdk as cdk
import ftstack.infra, ftstack_train
from ftstack.infra import FineTuningPipeline, FineTuningPipelineProps, BuiltImage

for module in (ftstack.infra, ftstack_train):
    assert Path(module.__file__).is_relative_to(Path(sys.argv[1])), module.__file__
app = cdk.App(outdir=sys.argv[2])
stack = cdk.Stack(app, "Platform", env=cdk.Environment(account="123456789012", region="us-east-1"))
FineTuningPipeline(stack, "Team", FineTuningPipelineProps(
    name="team-a", prefix="team-a/", inference_image="763104351884.dkr.ecr.us-east-1.amazonaws.com/serve:1",
    training_image=BuiltImage(base_image="763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.8-gpu-py312")))
app.synth()
"""


def _assets(outdir: Path) -> dict[str, object]:
    """The staged assets of the synthesized stack: the image's and each function's hash, and the files in them."""
    manifest = json.loads((outdir / "Platform.assets.json").read_text())
    found: dict[str, object] = {"images": sorted(manifest["dockerImages"]), "files": {}}
    for asset_hash, entry in manifest["files"].items():
        path = outdir / entry["source"]["path"]
        if path.is_dir():
            found["files"][asset_hash] = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    for asset_hash, entry in manifest["dockerImages"].items():
        path = outdir / entry["source"]["directory"]
        found[f"image {asset_hash}"] = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    return found


def _synth(tmp_path: Path, name: str, site: Path, env: dict[str, str]) -> dict[str, object]:
    work = tmp_path / name
    work.mkdir()
    outdir = work / "cdk.out"
    done = subprocess.run([sys.executable, "-c", SYNTH, str(site), str(outdir)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return _assets(outdir)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of its sources (the build writes into the tree)."""
    tmp = tmp_path_factory.mktemp("package")
    tree = tmp / "src"
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy(source, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                    str(tree)], check=True, capture_output=True, timeout=300)
    (built,) = (tmp / "dist").glob("ftstack-*.whl")
    return built


def test_the_wheel_holds_the_constructs_and_the_image_build_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("ftstack/infra/__init__.py", "ftstack/infra/pipeline.py", "ftstack/infra/stage_data/handler.py",
                 "ftstack/infra/execution_input.schema.json", "ftstack/training_code/Dockerfile",
                 "ftstack/training_code/requirements.lock", "ftstack_train/train.py", "ftstack/cli.py"):
        assert name in names, name
    assert not [n for n in names if n.startswith(("infra/", "tests/", "training_code/"))]


def test_an_installed_ftstack_synthesizes_a_pipeline_with_the_assets_of_a_clone(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # PYTHONPATH puts the installed copy ahead of this checkout's editable install.
    installed = _synth(tmp_path, "installed", site, dict(os.environ, PYTHONPATH=str(site)))
    repo_site = Path(__import__("ftstack").__file__).parents[1]
    cloned = _synth(tmp_path, "clone", repo_site, dict(os.environ))  # this checkout, installed editable
    assert installed == cloned
    (image,) = [v for k, v in installed.items() if k.startswith("image ")]
    assert "Dockerfile" in image and "requirements.lock" in image and "ftstack_train/train.py" in image
    assert any("ftstack/infra/stage_data/handler.py" in files for files in installed["files"].values())
