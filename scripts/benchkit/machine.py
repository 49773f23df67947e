"""What a bench runs on: wrk, installed when missing, and the versions recorded with results.

`environment` names the commit, the CPU and every measured component's version,
so a results.json (bench's or soak's) says what it measured.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from benchkit import ROOT, config
from tests.support import envoy as envoy_support


def ensure_wrk() -> str:
    """wrk's path, installing Debian's package when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise config.BenchError("wrk is not installed and there is no apt-get to install it")
    print("wrk not found: apt-get install -y wrk", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def install() -> bool:
        result = subprocess.run(  # noqa: S603
            [apt, "install", "-y", "-q", "wrk"], env=env, capture_output=True, check=False
        )
        return result.returncode == 0

    if not install():
        # A fresh machine has no package lists yet.
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True, check=False)  # noqa: S603
        if not install():
            raise config.BenchError(
                "could not install wrk (apt-get install -y wrk failed, also after apt-get "
                "update); install it by hand and run again"
            )
    found = shutil.which("wrk")
    if found is None:
        raise config.BenchError("apt-get installed wrk but it is not on PATH")
    return found


def _first_line(argv: Sequence[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603
    except OSError:
        return "?"
    text = (result.stdout + result.stderr).strip()
    return text.splitlines()[0].strip() if text else "?"


def environment(wrk: str) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    envoy_version = _first_line([str(envoy_support.envoy_binary()), "--version"])
    git = shutil.which("git") or "git"
    commit = _first_line([git, "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _first_line([git, "-C", str(ROOT), "status", "--porcelain", "--", "sidecar", "proto"])
    return {
        "lastguard": commit + (" + uncommitted changes" if dirty not in ("", "?") else ""),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "PyJWT": version("PyJWT"),
        "cryptography": version("cryptography"),
        "envoy": envoy_version.partition("version:")[2].strip() or envoy_version,
        "wrk": _first_line([wrk, "-v"]),
    }
