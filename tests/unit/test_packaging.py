"""Packaging (issue 21 part 5): the license, PEP 561 markers, what the sdist carries and
the dependency pins."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vmferry", "controller", "handler", "sync_controller")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _lock_versions() -> dict[str, str]:
    text = (ROOT / "requirements.lock").read_text()
    return {m[1].lower(): m[2] for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M)}


def test_license_is_the_apache_2_text_and_an_spdx_string() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"  # SPDX expression, not the deprecated table
    assert project["license-files"] == ["LICENSE"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_is_marked_typed(package: str) -> None:
    assert (ROOT / package / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"][package]


def test_dependencies_are_compatible_ranges_not_pins() -> None:
    project = _pyproject()["project"]
    for req in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        assert "==" not in req, f"{req}: pin in requirements.lock, give a range in pyproject"
        assert "<" in req and ">=" in req, f"{req}: give a compatible range (>=X,<Y)"


def test_lock_grpcio_and_grpcio_tools_agree() -> None:
    """The generated stubs check at import that the runtime is at least the generator's
    version; both must be the same minor release (grpcio-tools has no 1.85.3 release, so
    grpcio may be a patch ahead, never behind)."""
    versions = _lock_versions()
    runtime = tuple(int(x) for x in versions["grpcio"].split("."))
    tools = tuple(int(x) for x in versions["grpcio-tools"].split("."))
    assert runtime[:2] == tools[:2]
    assert runtime >= tools


def test_sdist_carries_proto_deploy_license_and_markers(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; "
            "print(build_meta.build_sdist(sys.argv[1]))",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    name = out.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        members = {m.name.partition("/")[2] for m in tar.getmembers()}
    for path in (
        "LICENSE",
        "proto/vmferry/rpc/api.proto",
        "deploy/examples/controller.toml",
        "requirements.lock",
        *(f"{p}/py.typed" for p in PACKAGES),
    ):
        assert path in members, f"the sdist lacks {path}"
    assert any(m.startswith("deploy/systemd/") for m in members)
