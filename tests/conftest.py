"""Fixtures shared by every test: the echo app, policy files, HTTP to Envoy, started servers.

Every server here binds 127.0.0.1 and is stopped at teardown, pass or fail.
Import harness code as `tests.support.<module>`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# `tests.support` is imported by its full name, whatever pytest put on sys.path.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import envoy as envoy_support  # noqa: E402
from tests.support import sidecar as sidecar_support  # noqa: E402
from tests.support import upstream as upstream_support  # noqa: E402


@pytest.fixture(scope="session")
def upstream_app() -> Iterator[upstream_support.UpstreamApp]:
    """The echo app for the whole session (see tests/support/upstream.py)."""
    with upstream_support.UpstreamApp() as app:
        yield app


@pytest.fixture
def upstream(upstream_app: upstream_support.UpstreamApp) -> upstream_support.UpstreamApp:
    """The session's echo app with its request record emptied for this test."""
    upstream_app.clear()
    return upstream_app


@pytest.fixture
def write_policy(tmp_path: Path) -> sidecar_support.PolicyWriter:
    """`write_policy(yaml_text | doc | [docs]) -> Path`, atomically; the path is `.path`."""
    return sidecar_support.PolicyWriter(tmp_path / "policy.yaml")


@pytest.fixture
def http() -> envoy_support.Http:
    """`http(method, url, headers=None, body=None, timeout=5.0) -> HttpResponse`.

    `HttpResponse` unpacks as (status, headers, body); headers have lower-case names.
    Never follows redirects and never raises on an HTTP status.
    """
    return envoy_support.http_request


@pytest.fixture
def start_envoy() -> Iterator[envoy_support.StartEnvoy]:
    """`start_envoy(listeners | bootstrap_config=..., **kw) -> EnvoyProcess`, started and ready.

    Every Envoy started is stopped at teardown.
    """
    started: list[envoy_support.EnvoyProcess] = []

    def start(*args: Any, **kwargs: Any) -> envoy_support.EnvoyProcess:
        process = envoy_support.EnvoyProcess(*args, **kwargs)
        started.append(process)
        return process.start()

    yield start
    for process in reversed(started):
        process.stop()


@pytest.fixture
def start_sidecar() -> Iterator[sidecar_support.StartSidecar]:
    """`start_sidecar(policy_file, **SidecarConfig fields) -> SidecarThread`, started and ready.

    Every sidecar started is stopped at teardown.
    """
    started: list[sidecar_support.SidecarThread] = []

    def start(policy_file: Path, **kwargs: Any) -> sidecar_support.SidecarThread:
        thread = sidecar_support.SidecarThread(policy_file, **kwargs)
        started.append(thread)
        return thread.start()

    yield start
    for thread in reversed(started):
        thread.stop()


@pytest.fixture
def start_sidecar_process() -> Iterator[sidecar_support.StartSidecarProcess]:
    """`start_sidecar_process(policy_file, **kw) -> SidecarProcess` (the CLI); stopped after."""
    started: list[sidecar_support.SidecarProcess] = []

    def start(policy_file: Path, **kwargs: Any) -> sidecar_support.SidecarProcess:
        process = sidecar_support.SidecarProcess(policy_file, **kwargs)
        started.append(process)
        return process.start()

    yield start
    for process in reversed(started):
        process.stop()
        process.cleanup()
