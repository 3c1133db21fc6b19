"""The project's packaging: an SPDX license, every third-party import declared, and a lock file that pins every
declared dependency at a version the declaration accepts (what `make install` installs)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# import name -> distribution, where they differ
DISTRIBUTION_OF = {"PIL": "pillow", "yaml": "pyyaml", "cleanfid": "clean-fid", "sklearn": "scikit-learn"}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def test_license_is_an_spdx_expression():
    assert project()["license"] == "MIT"


def test_every_declared_dependency_is_locked_at_an_accepted_version():
    pins = lock()
    declared = [Requirement(r) for r in project()["dependencies"] + project()["optional-dependencies"]["dev"]]
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements.lock has no pin for {req.name} (run `make lock`)"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject.toml's {req.specifier}"


def test_every_third_party_import_of_the_package_is_declared():
    declared = {canonicalize_name(Requirement(r).name) for r in project()["dependencies"]}
    imported = set()
    for path in (REPO / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "pipeline"}
    missing = sorted(m for m in third_party if canonicalize_name(DISTRIBUTION_OF.get(m, m)) not in declared)
    assert not missing, f"imported by pipeline/ but not in pyproject.toml's dependencies: {missing}"
