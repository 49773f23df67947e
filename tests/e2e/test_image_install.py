"""The container image's install steps, without Docker.

No Docker engine runs here, so this test does what the Dockerfile does, on this
machine: copy the files the Dockerfile copies into a clean directory, build
lastguard's wheel there (`pip wheel --no-deps`), install it into a fresh
virtualenv (without pip of its own) with prebuilt dependencies only, and run
the installed `lastguard` as the image's ENTRYPOINT would. The commands
are the Dockerfile's, with its paths swapped for temporary ones; a test pins
that the Dockerfile still holds each of them.

Dependencies come from the package index (pip's cache makes that quick after
`make venv`). Every step runs under one 90-second budget.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lastguard.sidecar.devissuer import DevIssuer

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
SAMPLE = ROOT / "manifests" / "samples" / "health-and-scopes.yaml"
BUDGET_SECONDS = 90.0

# What the build stage copies into /src, and the steps both stages run, with the
# Dockerfile's paths as placeholders: {src} /src, {dist} /dist, {venv} /opt/lastguard.
COPIED = ("pyproject.toml", "setup.py", "README.md", "sidecar", "operator", "proto")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")  # as .dockerignore
BUILD = "python -m pip wheel --no-deps --wheel-dir {dist} ."
INSTALL = (
    "python -m venv --without-pip {venv}",
    "python -m pip --python {venv}/bin/python install --only-binary=:all: {dist}/lastguard-*.whl",
)
DOCKER_PATHS = {"src": "/src", "dist": "/dist", "venv": "/opt/lastguard"}


@dataclass
class Image:
    """The installed virtualenv, standing in for the image."""

    venv: Path
    deadline: float

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """`docker run IMAGE args...`: the entrypoint `lastguard` from the venv's PATH."""
        return _run([str(self.venv / "bin" / "lastguard"), *args], self, stdin=stdin)

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        return _run([str(self.venv / "bin" / "python"), "-c", code], self)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        assert left > 0, f"over the {BUDGET_SECONDS:.0f} s budget"
        return left


def _run(
    argv: list[str], image: Image, *, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    # Never from the repository: its folders (operator/ above all, which shadows the
    # standard library's `operator`) would be importable from the working directory.
    return subprocess.run(
        argv,
        cwd=cwd or image.venv.parent,
        env=image.env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=image.remaining(),
        check=False,
    )


def _step(command: str, image: Image, paths: dict[str, str], cwd: Path) -> None:
    """Runs one Dockerfile step, `python` being the interpreter this test runs on."""
    argv = [
        part
        for word in shlex.split(command.format(**paths))
        for part in (sorted(glob.glob(word)) or [word] if "*" in word else [word])
    ]
    if argv[0] == "python":
        argv[0] = sys.executable
    result = _run(argv, image, cwd=cwd)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    tmp = tmp_path_factory.mktemp("image")
    paths = {"src": str(tmp / "src"), "dist": str(tmp / "dist"), "venv": str(tmp / "venv")}
    installed = Image(Path(paths["venv"]), time.monotonic() + BUDGET_SECONDS)
    src = Path(paths["src"])
    src.mkdir()
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=IGNORED)
        else:
            shutil.copy2(source, src / name)
    _step(BUILD, installed, paths, cwd=src)
    for command in INSTALL:
        _step(command, installed, paths, cwd=tmp)
    yield installed


def test_the_dockerfile_runs_these_steps() -> None:
    dockerfile = DOCKERFILE.read_text()
    instructions = " ".join(dockerfile.replace("\\\n", " ").split())
    for command in (BUILD, *INSTALL):
        assert command.format(**DOCKER_PATHS) in instructions, command
    assert "COPY pyproject.toml setup.py README.md ./" in instructions
    for folder in ("sidecar", "operator", "proto"):
        assert f"COPY {folder}/ {folder}/" in instructions
    assert "USER 65532:65532" in instructions
    assert 'ENTRYPOINT ["lastguard"]' in instructions
    assert "ENV PATH=/opt/lastguard/bin:$PATH" in instructions
    bases = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert bases == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in instructions


def test_only_lastguard_is_installed_at_the_top_level(image: Image) -> None:
    result = image.python(
        "import importlib.metadata as m, json; "
        "print(json.dumps(sorted({f.parts[0] for f in m.files('lastguard')})))"
    )
    assert result.returncode == 0, result.stderr
    top = {p for p in json.loads(result.stdout) if p != ".." and not p.endswith(".dist-info")}
    assert top == {"lastguard"}
    site = image.python("import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    assert not {"sidecar", "operator", "proto"} & {p.name for p in Path(site).iterdir()}
    # Nothing to build or install with is left in the image's environment.
    assert not (image.venv / "bin" / "pip").exists()
    assert image.python("import setuptools").returncode != 0


def test_the_command_runs(image: Image) -> None:
    top = image.run("--help")
    assert top.returncode == 0, top.stderr
    assert "sidecar" in top.stdout and "verify" in top.stdout
    sidecar = image.run("sidecar", "--help")
    assert sidecar.returncode == 0, sidecar.stderr
    assert "--policy-server" in sidecar.stdout and "--pod-info-dir" in sidecar.stdout


@pytest.mark.parametrize(
    ("path", "allowed", "status"),
    [
        pytest.param("/healthz", True, 200, id="public-probe"),
        pytest.param("/api/orders", False, 401, id="no-token"),
    ],
)
def test_verify_a_sample_policy(image: Image, path: str, allowed: bool, status: int) -> None:
    result = image.run("verify", "--policy-file", str(SAMPLE), "--path", path)
    assert result.returncode == (0 if allowed else 1), result.stderr
    decision = json.loads(result.stdout)
    assert (decision["allowed"], decision["status"]) == (allowed, status)


def test_verify_checks_a_signature(image: Image, tmp_path: Path) -> None:
    """The crypto dependencies work in the installed environment."""
    issuer = DevIssuer("https://idp.example")
    policy: dict[str, Any] = {
        "apiVersion": "lastguard.dev/v1alpha1",
        "kind": "JWTPolicy",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {"issuers": [{"issuer": issuer.url, "jwks": json.dumps(issuer.jwks())}]},
    }
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(json.dumps(policy))
    token = issuer.mint({"sub": "alice"})
    good = image.run("verify", "--policy-file", str(policy_file), "--token", "-", stdin=token)
    assert good.returncode == 0, good.stdout + good.stderr
    assert json.loads(good.stdout)["reason"] == "authenticated"
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    bad = image.run("verify", "--policy-file", str(policy_file), "--token", "-", stdin=forged)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["status"] == 401


def test_the_operator_package_is_installed(image: Image) -> None:
    result = image.python("import lastguard.operator, lastguard.proto; print('ok')")
    assert result.returncode == 0, result.stderr


def test_the_image_can_run_the_operator(image: Image) -> None:
    """The chart runs `lastguard operator ...`: its modules and dependencies must be there."""
    imported = image.python("import lastguard.operator.main")
    assert imported.returncode == 0, imported.stderr.strip().splitlines()[-1]
    help_ = image.run("operator", "--help")
    assert help_.returncode == 0, help_.stderr
    assert "--tls-cert" in help_.stdout and "--leader-election" in help_.stdout
