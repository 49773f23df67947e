"""The processes around the measured ones, and what /proc says about any of them.

The no-op ext_authz server (scripts/bench_noop.py) as a process; CPU seconds
and RSS of a pid, the whole machine's busy time (to tell when other processes
share the cores), lastguard's token cache counters, and Envoy's pid. Linux only.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from benchkit import ROOT, config
from tests.support import envoy as envoy_support
from tests.support.sidecar import SidecarError, port_open

NOOP_SERVER = ROOT / "scripts" / "bench_noop.py"


class NoopServer:
    """scripts/bench_noop.py as a process; learns its port from the line it prints."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port = 0
        self.http_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> NoopServer:
        command = [
            sys.executable, str(NOOP_SERVER),
            "--listen", f"{config.HOST}:0", "--http-listen", f"{config.HOST}:0",
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(  # noqa: S603
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise config.BenchError(f"no-op server exited: {self.log_path.read_text()[-2000:]}")
            for line in self.log_path.read_text().splitlines():
                if line.startswith("{"):
                    listening = json.loads(line)
                    self.port = int(listening["grpc"].rpartition(":")[2])
                    self.http_port = int(listening["http"].rpartition(":")[2])
            if self.port and port_open(self.port):
                return self
            time.sleep(0.05)
        raise config.BenchError(f"no-op server not listening within {timeout}s")

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    # After "pid (comm)": state is field 3, utime 14 and stime 15 (man 5 proc).
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat), steal included."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _TICKS


def own_cpu_seconds() -> float:
    """This script's CPU and its waited-for children's (wrk): what is ours besides the servers."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def token_cache_lookups(metrics_port: int) -> dict[str, float]:
    """lastguard's `lastguard_token_cache_total` counters: {"hit": n, "miss": n}."""
    url = f"http://{config.HOST}:{metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        raise config.BenchError(
            f"lastguard's metrics stopped answering ({exc}): did it exit?"
        ) from exc
    counts = {"hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        for result in counts:
            if line.startswith(f'lastguard_token_cache_total{{result="{result}"}}'):
                counts[result] = float(line.split()[-1])
    return counts


def pid_running(config_path: Path) -> int:
    """The pid of the process whose command line names `config_path` (our Envoy)."""
    needle = str(config_path).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except OSError:
                continue
    raise config.BenchError(f"no process runs {config_path}")


def run_script(main: Callable[[], int], name: str) -> NoReturn:
    """Runs a script's `main` and exits with its code; the exit codes bench and soak share.

    SIGTERM stops it as Ctrl-C does (130), so everything it started is stopped; 2 when
    the measurement is not valid (`BenchError`), 1 when a process would not start.
    """
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
    except config.BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(2)
    except (SidecarError, envoy_support.EnvoyError) as exc:
        print(f"{name} could not start: {exc}", file=sys.stderr)
        sys.exit(1)
