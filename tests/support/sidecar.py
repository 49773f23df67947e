"""Runs the real lastguard sidecar for tests: in a background thread, or as a CLI process.

`SidecarThread` runs `lastguard.sidecar.server.Sidecar` on its own event loop
in a daemon thread: fast, and the test can reach into `.sidecar`. `SidecarProcess`
runs `python -m lastguard.sidecar.cli sidecar ...` for what needs a real process
(hot reload of a file, SIGKILL, exit codes, logs on stderr).

Both listen on 127.0.0.1 port 0 unless told otherwise and learn the bound port
from the sidecar itself (the thread from `Sidecar.port`, the process from its
"listening" log line), so there is no pick-a-free-port race. Readiness is the
gRPC health service answering SERVING for the ext_authz service, or, for a
sidecar expected to run without a loadable policy, the port accepting connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

HOST = "127.0.0.1"
SERVICE_NAME = "envoy.service.auth.v3.Authorization"

Readiness = Literal["serving", "port", "none"]


class SidecarError(RuntimeError):
    """The sidecar did not start or become ready; the message says what it logged."""


def health_status(port: int, service: str = SERVICE_NAME, timeout: float = 1.0) -> str:
    """The gRPC health status name (SERVING, NOT_SERVING, ...) or "UNREACHABLE"."""
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_ready(
    port: int, how: Readiness = "serving", timeout: float = 10.0, alive: Any = None
) -> None:
    """Waits until the sidecar on `port` is ready in the sense of `how`; bounded.

    `alive`, if given, is a callable returning False once the sidecar died, which
    ends the wait early.
    """
    if how == "none":
        return
    deadline = time.monotonic() + timeout
    last = "UNREACHABLE"
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise SidecarError("sidecar exited while starting")
        if how == "port":
            if port_open(port):
                return
        else:
            last = health_status(port, timeout=min(1.0, max(0.05, deadline - time.monotonic())))
            if last == "SERVING":
                return
        time.sleep(0.05)
    raise SidecarError(f"sidecar on port {port} not ready ({how}) within {timeout}s, last {last}")


def free_port() -> int:
    """A port that was free a moment ago. Only where the server cannot report its own."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class PolicyWriter:
    """Writes a policy file atomically, so a reload never sees half a file; `.path` is stable.

    Each write replaces the file (a new inode), which the sidecar's poller always notices.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __call__(self, content: str | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Path:
        """YAML text, one policy document, or several."""
        if isinstance(content, str):
            text = content
        else:
            docs = [content] if isinstance(content, Mapping) else list(content)
            text = yaml.safe_dump_all([dict(d) for d in docs], sort_keys=False)
        staging = self.path.with_name(f".{self.path.name}.tmp")
        staging.write_text(text)
        staging.replace(self.path)
        return self.path


# --- in-process ---------------------------------------------------------------


class SidecarThread:
    """`Sidecar(SidecarConfig(policy_file, listen="127.0.0.1:PORT", **config))` on a thread.

    `key_clock=` in `config` is passed to `Sidecar` (a fake monotonic clock for key refresh).

    `start()` returns once the gRPC port is bound and readiness (`ready`) holds;
    `stop()` runs the sidecar's graceful stop and ends the thread. Test-friendly
    defaults (fast reload, short grace) apply unless `config` sets them.
    """

    TEST_DEFAULTS: Mapping[str, Any] = {"reload_interval": 0.2, "grace_seconds": 0.5}

    def __init__(
        self,
        policy_file: Path,
        *,
        port: int = 0,
        ready: Readiness = "serving",
        ready_timeout: float = 10.0,
        **config: Any,
    ) -> None:
        self.policy_file = Path(policy_file)
        self._listen = f"{HOST}:{port}"
        self.ready = ready
        self.ready_timeout = ready_timeout
        self.config = config
        self.sidecar: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _build(self) -> Any:
        from lastguard.sidecar import server

        known = {f.name for f in dataclasses.fields(server.SidecarConfig)}
        settings = {k: v for k, v in self.TEST_DEFAULTS.items() if k in known}
        settings.update(self.config)
        key_clock = settings.pop("key_clock", None)
        config = server.SidecarConfig(policy_file=self.policy_file, listen=self._listen, **settings)
        if key_clock is None:
            return server.Sidecar(config)
        return server.Sidecar(config, key_clock=key_clock)

    def start(self) -> SidecarThread:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sidecar", daemon=True)
        self._thread.start()

        async def boot() -> Any:
            sidecar = self._build()
            await sidecar.start()
            return sidecar

        try:
            self.sidecar = asyncio.run_coroutine_threadsafe(boot(), self._loop).result(
                self.ready_timeout
            )
            wait_ready(self.port, self.ready, self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        sidecar, self.sidecar = self.sidecar, None
        if sidecar is not None:
            asyncio.run_coroutine_threadsafe(sidecar.stop(), loop).result(timeout)

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await loop.shutdown_asyncgens()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        loop.close()

    def __enter__(self) -> SidecarThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self.sidecar is None or self.sidecar.port is None:
            raise RuntimeError("sidecar is not running")
        return int(self.sidecar.port)

    @property
    def http_port(self) -> int:
        """The HTTP ext_authz port (the config must set `http_listen`)."""
        if self.sidecar is None or self.sidecar.http is None:
            raise RuntimeError("sidecar is not serving HTTP ext_authz")
        return int(self.sidecar.http.port)

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        """Runs a coroutine on the sidecar's loop (to poke at its state) and returns its result."""
        if self._loop is None:
            raise RuntimeError("sidecar is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)


# --- subprocess ---------------------------------------------------------------


def _listening_ports(line: str) -> dict[str, int]:
    """{"grpc": port, "http": port (when served)} from the sidecar's JSON "listening" log
    line; empty for any other line."""
    try:
        record = json.loads(line)
    except ValueError:
        return {}
    if not isinstance(record, dict) or not isinstance(record.get("grpc"), str):
        return {}
    ports = {}
    for protocol in ("grpc", "http"):
        address = record.get(protocol)
        port = address.rpartition(":")[2] if isinstance(address, str) else ""
        if port.isdigit():
            ports[protocol] = int(port)
    return ports


class SidecarProcess:
    """`python -m lastguard.sidecar.cli sidecar --policy-file F --listen 127.0.0.1:PORT ...`.

    `port=0` (default) lets the sidecar bind any port and reads it from the log; pass a
    fixed port to restart a sidecar where Envoy already points. `metrics=True` also
    serves Prometheus metrics on `metrics_port`. stderr (JSON logs) goes to `log_path`.
    """

    def __init__(
        self,
        policy_file: Path,
        *,
        port: int = 0,
        metrics: bool = False,
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
        reload_interval: float = 0.2,
        extra_args: Sequence[str] = (),
        ready: Readiness = "serving",
        ready_timeout: float = 15.0,
        log_level: str = "info",
        workdir: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.policy_file = Path(policy_file)
        self.requested_port = port
        self.port = port
        #: The HTTP ext_authz port, when `extra_args` has --http-listen (read from the log).
        self.http_port: int | None = None
        self.metrics_port = free_port() if metrics else None
        self.namespace = namespace
        self.labels = dict(labels or {})
        self.reload_interval = reload_interval
        self.extra_args = tuple(extra_args)
        self.ready = ready
        self.ready_timeout = ready_timeout
        self.log_level = log_level
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="lastguard-sidecar-"))
        self.log_path = self.workdir / "sidecar.log"
        self.env = dict(env) if env is not None else None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        argv = [
            sys.executable, "-m", "lastguard.sidecar.cli", "--log-level", self.log_level,
            "sidecar",
            "--policy-file", str(self.policy_file),
            "--listen", f"{HOST}:{self.requested_port}",
            "--reload-interval", str(self.reload_interval),
        ]  # fmt: skip
        if self.metrics_port is not None:
            argv += ["--metrics-listen", f"{HOST}:{self.metrics_port}"]
        if self.namespace is not None:
            argv += ["--namespace", self.namespace]
        for key, value in sorted(self.labels.items()):
            argv += ["--label", f"{key}={value}"]
        return argv + list(self.extra_args)

    def start(self) -> SidecarProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + self.ready_timeout
            if self.requested_port == 0:
                self.port = self._wait_for_port(deadline)
            wait_ready(
                self.port, self.ready, max(0.1, deadline - time.monotonic()), alive=self.alive
            )
        except SidecarError as exc:
            self.stop()
            tail = self.log_tail()
            self.cleanup()
            raise SidecarError(f"{exc}\n--- sidecar log ---\n{tail}") from None
        except BaseException:
            self.stop()
            self.cleanup()
            raise
        return self

    def _wait_for_port(self, deadline: float) -> int:
        offset = 0
        while time.monotonic() < deadline:
            if not self.alive():
                raise SidecarError(f"sidecar exited with {self.returncode} while starting")
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                chunk = log.read()
            # Only whole lines: a partially written line is read again next time.
            complete = chunk[: chunk.rfind(b"\n") + 1]
            offset += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                ports = _listening_ports(line)
                if "grpc" in ports:
                    self.http_port = ports.get("http")
                    return ports["grpc"]
            time.sleep(0.05)
        raise SidecarError("sidecar never logged the address it listens on")

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("sidecar was not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def send_signal(self, sig: int) -> None:
        if self.alive():
            assert self._proc is not None
            self._proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        assert self._proc is not None
        return self._proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, no grace: what a crash or an OOM kill looks like to Envoy."""
        self.send_signal(signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=timeout)
        return self._proc.returncode

    def restart(self) -> SidecarProcess:
        """Stops and starts again on the same port, so Envoy's cluster still points here."""
        self.stop()
        self.requested_port = self.port
        return self.start()

    def cleanup(self) -> None:
        """Removes the log directory if this object created it."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.cleanup()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far, decoded (other lines skipped)."""
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


#: The conftest fixtures' factories, for annotating tests.
StartSidecar = Callable[..., SidecarThread]
StartSidecarProcess = Callable[..., SidecarProcess]
