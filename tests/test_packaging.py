"""Packaging facts a user or an image build relies on: the licence, the torch range and the CPU
build, the protobuf range the generated code needs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def requirement(name: str) -> str:
    found = [d for d in PROJECT["dependencies"] if re.match(rf"{name}\s*[<>=!~]", d)]
    assert len(found) == 1, found
    return found[0]


def constraint(name: str) -> str:
    found = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if re.match(rf"{name}\s*[<>=!~]", line)]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.timeout(10)
def test_license_file_matches_the_declared_license():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert any(c.startswith("Programming Language :: Python :: 3.1") for c in PROJECT["classifiers"])
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])  # the SPDX expression says it


@pytest.mark.timeout(10)
def test_protobuf_range_fits_the_generated_code():
    """Generated *_pb2.py refuse a protobuf runtime older than the protoc that made them."""
    made_by = {version_tuple(m) for f in (ROOT / "runtime" / "proto").rglob("*_pb2.py")
               for m in re.findall(r"# Protobuf Python Version: (\S+)", f.read_text())}
    assert len(made_by) == 1, made_by
    (protoc,) = made_by
    for spec in (requirement("protobuf"), constraint("protobuf")):
        low = re.search(r">=\s*([\d.]+)", spec)
        assert low and version_tuple(low.group(1)) == protoc, (spec, protoc)
        high = re.search(r"<\s*([\d.]+)", spec)
        assert high and version_tuple(high.group(1))[0] == protoc[0] + 1, spec  # same major as protoc


@pytest.mark.timeout(10)
def test_torch_is_bounded_to_the_tested_range():
    spec = requirement("torch")
    pinned = version_tuple(constraint("torch").split("==")[1])
    low, high = re.search(r">=\s*([\d.]+)", spec), re.search(r"<\s*([\d.]+)", spec)
    assert low and high, f"torch must be bounded both ways: {spec}"
    assert version_tuple(low.group(1)) <= pinned < version_tuple(high.group(1))


@pytest.mark.timeout(30)
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_install_takes_the_cpu_torch_without_a_gpu(tmp_path):
    """Without nvidia-smi on PATH, torch comes from the CPU index; TORCH_INDEX= turns that off."""
    path = tmp_path / "bin"
    path.mkdir()
    for tool in ("sh", "make"):
        (path / tool).symlink_to(shutil.which(tool))
    env = {k: v for k, v in os.environ.items() if k != "TORCH_INDEX"} | {"PATH": str(path)}

    def dry_run(extra_env: dict[str, str]) -> str:
        out = subprocess.run(["make", "-n", "-B", ".venv/.installed"], cwd=ROOT, env=env | extra_env,
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        return next(line for line in out.stdout.splitlines() if "torch==" in line)

    up = {"CPU_INDEX_UP": "up"}  # the reachability probe's answer, given (this machine has no route to it)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in dry_run(up)
    assert "--extra-index-url" not in dry_run(up | {"TORCH_INDEX": ""})
    assert "--extra-index-url" not in dry_run({"CPU_INDEX_UP": ""})  # unreachable: pip's own configuration
    (path / "nvidia-smi").write_text("#!/bin/sh\n")
    (path / "nvidia-smi").chmod(0o755)
    assert "--extra-index-url" not in dry_run(up)
