"""What can be checked of the training image without a Docker engine: the base image is pinned,
everything it copies exists, it installs a complete, hashed lock of its dependencies at build time
(and nothing else), and the entrypoint resolves to the launcher."""

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
LOCK = CONTEXT / "requirements.lock"


def lock_script():
    """scripts/lock_image.py, which writes the lock (loaded as a module: scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("lock_image", CONTEXT.parent / "scripts" / "lock_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def requirement_lines(path: Path) -> list[str]:
    """Requirement entries of a pip requirements file, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [" ".join(line.split(" #", 1)[0].split()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def pins(path: Path) -> dict[str, str]:
    """``{normalized name: version}`` of a file of ``name==version`` entries."""
    found = {}
    for line in requirement_lines(path):
        name, version = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line).groups()
        found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


def test_direct_dependencies_are_pinned():
    requirements = requirement_lines(CONTEXT / "requirements.txt")
    assert requirements and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.+-]*", r) for r in requirements), requirements
    assert not any(r.lower().startswith("torch==") for r in requirements), "torch comes from the base image"


def test_every_locked_package_is_pinned_with_hashes():
    entries = requirement_lines(LOCK)
    assert len(entries) > len(pins(CONTEXT / "requirements.txt")), "the lock holds the whole closure, not only the direct pins"
    for entry in entries:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.+!-]*( --hash=sha256:[0-9a-f]{64})+", entry), entry


def test_every_direct_pin_is_locked_at_its_version():
    locked = pins(LOCK)
    for name, version in pins(CONTEXT / "requirements.txt").items():
        assert locked.get(name) == version, f"{name}=={version} is locked as {locked.get(name)}: run make lock"


def test_the_lock_was_generated_from_the_current_inputs():
    """The generator records a digest of requirements.txt and base-image-packages.txt; an edit of
    either without `make lock` leaves the image installing something else than what they say."""
    recorded = re.search(r"^# inputs-sha256: ([0-9a-f]{64})$", LOCK.read_text(), re.M)
    assert recorded, "requirements.lock has no inputs-sha256 line: run make lock"
    assert recorded[1] == lock_script().inputs_digest(), "requirements.txt or base-image-packages.txt changed: run make lock"


def test_the_base_images_torch_stack_and_numpy_are_not_reinstalled():
    locked = set(pins(LOCK))
    assert not {name for name in locked if lock_script().NEVER_LOCKED.match(name)}
    assert not locked & set(lock_script().FROM_BASE_IMAGE)
    assert "numpy" in lock_script().FROM_BASE_IMAGE


def test_the_lock_holds_every_requirement_of_its_packages():
    """The closure is complete (as pip check will find in the image), read offline from the
    metadata of the packages installed here at the lock's versions, for the image's platform."""
    from importlib import metadata

    from packaging.requirements import Requirement

    image = {"python_version": "3.12", "python_full_version": "3.12.10", "sys_platform": "linux", "platform_system": "Linux",
             "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython", "extra": ""}
    locked = pins(LOCK)
    checked = []
    for name, version in locked.items():
        try:
            if metadata.version(name) != version:
                continue  # another version here: its metadata says nothing about the locked one
        except metadata.PackageNotFoundError:
            continue
        for requirement in map(Requirement, metadata.requires(name) or []):
            if requirement.marker is None or requirement.marker.evaluate(image):
                required = re.sub(r"[-_.]+", "-", requirement.name).lower()
                assert required in locked or required in lock_script().FROM_BASE_IMAGE, f"{name} requires {requirement}"
                assert required not in locked or requirement.specifier.contains(locked[required], prereleases=True), (
                    f"{name} requires {requirement}, locked {locked[required]}")
        checked.append(name)
    assert set(pins(CONTEXT / "requirements.txt")) <= set(checked), "the direct pins' metadata must be checked"


def test_the_image_installs_the_lock_only_with_hashes_and_checks_it():
    assert "requirements.lock /opt/ftstack/requirements.lock" in instructions("COPY")
    runs = instructions("RUN")
    installs = [r for r in runs if "pip install" in r]
    assert len(installs) == 1, installs
    args = shlex.split(installs[0].split("&&")[0])
    assert {"--require-hashes", "--no-deps", "--only-binary=:all:"} <= set(args)
    assert args[args.index("-r") + 1] == "/opt/ftstack/requirements.lock"
    assert re.search(r"&&\s*python -m pip check$", installs[0]), "an inconsistent closure must fail the build"
    assert not any("git clone" in r or "git+" in r for r in runs)


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
