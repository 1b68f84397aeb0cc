"""The two assets built from ftstack's own code: the Lambda functions' code and the training
image's build context.

Both are assembled from the imported packages, not from a folder of the repository, so that the
same files go in whether ftstack runs from a clone (``infra/`` and ``training_code/`` there) or
from an installed distribution (``ftstack/infra/`` and ``ftstack_train/`` in site-packages). CDK
copies each into the cloud assembly and fingerprints its contents, so where it was assembled does
not change the asset's hash.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path

TRAINING_CONTEXT_PACKAGE = "ftstack.training_code"
"""The training image's Dockerfile and requirements lock, shipped as data of this package
(``training_code/`` in the repository; pyproject.toml maps it)."""
TRAINING_CONTEXT_FILES = ("Dockerfile", "requirements.lock")
"""What the Dockerfile COPYs besides the training package (see training_code/Dockerfile)."""
TRAINING_PACKAGE = "ftstack_train"


def _source(name: str) -> tuple[Path, bool]:
    """The file of module ``name``, or the folder of package ``name`` (True)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ImportError(f"{name} is not importable: install ftstack (pip install ftstack[infra])")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))), True
    return Path(spec.origin), False


def _copy_module(name: str, into: Path, *, whole: bool = True) -> None:
    """Copies module ``name`` into ``into`` at its import path; a package brings its own ``*.py``
    files (``whole``) or only its ``__init__.py``."""
    source, is_package = _source(name)
    target = into.joinpath(*name.split("."))
    if is_package:
        target.mkdir(parents=True, exist_ok=True)
        for item in sorted(source.glob("*.py") if whole else [source / "__init__.py"]):
            shutil.copyfile(item, target / item.name)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target.with_suffix(".py"))


def _new_folder(prefix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    # CDK copies an asset into the cloud assembly when the construct is created; the folder is
    # kept until the process ends all the same, in case asset staging is turned off.
    atexit.register(shutil.rmtree, folder, True)
    return folder


@functools.cache
def lambda_code(modules: tuple[str, ...]) -> Path:
    """A folder with exactly ``modules`` (a package brings its own ``*.py`` files, not its
    subpackages) and the ``__init__.py`` of each package above them, which an import runs first,
    laid out as their import names: ``ftstack/infra/stage_data/handler.py``."""
    folder = _new_folder("ftstack-lambda-")
    parents = {".".join(name.split(".")[:i]) for name in modules for i in range(1, name.count(".") + 1)}
    for name in sorted(parents - set(modules)):
        _copy_module(name, folder, whole=False)
    for name in modules:
        _copy_module(name, folder)
    return folder


@functools.cache
def training_context() -> Path:
    """The training image's build context: the Dockerfile, the lock and ``ftstack_train/``."""
    folder = _new_folder("ftstack-image-")
    data, _ = _source(TRAINING_CONTEXT_PACKAGE)
    for name in TRAINING_CONTEXT_FILES:
        if not (data / name).is_file():
            raise FileNotFoundError(f"{data / name} is missing from the ftstack installation; reinstall ftstack")
        shutil.copyfile(data / name, folder / name)
    _copy_module(TRAINING_PACKAGE, folder)
    return folder
