"""`lastguard sidecar --workers N`: processes sharing one port, one set of metrics and probes."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from lastguard.sidecar.workers import fixed_port_problem, worker_argv
from tests.support import policies
from tests.support.sidecar import HOST, PolicyWriter, SidecarProcess, free_port

pytestmark = pytest.mark.e2e

_KEY = jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
JWKS = {"keys": [{**json.loads(_KEY), "kid": "k1", "alg": "ES256"}]}
POLICY = policies.document(
    issuers=[{"issuer": "https://idp.example", "jwks": json.dumps(JWKS)}],
    rules=[{"paths": ["/healthz"], "action": "Allow"}],
)


def test_worker_argv_drops_the_supervisors_flags_in_both_forms() -> None:
    argv = [
        "--log-level", "debug", "sidecar", "--workers", "2", "--metrics-listen=0.0.0.0:9090",
        "--health-listen", "0.0.0.0:9091", "--listen", "127.0.0.1:9191", "--policy-file", "p",
    ]  # fmt: skip
    assert worker_argv(argv, Path("/run/ready-0")) == [
        "--log-level", "debug", "sidecar", "--listen", "127.0.0.1:9191", "--policy-file", "p",
        "--ready-file", "/run/ready-0",
    ]  # fmt: skip


def test_workers_need_fixed_ports() -> None:
    assert fixed_port_problem("127.0.0.1:9191", None) is None
    assert fixed_port_problem("127.0.0.1:9191", "127.0.0.1:9192") is None
    assert "--listen" in (fixed_port_problem("127.0.0.1:0", None) or "")
    assert "--http-listen" in (fixed_port_problem("127.0.0.1:9191", "127.0.0.1:0") or "")


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def eventually(predicate: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)


def metric(port: int, line_prefix: str) -> float:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(line_prefix)]
    return sum(values)


def test_two_workers_share_the_port_the_metrics_and_the_probes(
    write_policy: PolicyWriter, tmp_path: Path
) -> None:
    grpc_port, http_port, health_port = free_port(), free_port(), free_port()
    sidecar = SidecarProcess(
        write_policy(POLICY),
        port=grpc_port,
        metrics=True,
        workdir=tmp_path,
        ready_timeout=30.0,
        extra_args=[
            "--workers", "2", "--http-listen", f"{HOST}:{http_port}",
            "--health-listen", f"{HOST}:{health_port}",
        ],
    )  # fmt: skip
    sidecar.start()
    try:
        assert sidecar.metrics_port is not None
        eventually(lambda: get(health_port, "/readyz") == 200)
        workers = children(sidecar.pid)
        assert len(workers) == 2
        before = {pid: cpu_ticks(pid) for pid in workers}

        requests = 400  # each on a new connection, which the kernel hashes to a worker
        statuses = [get(http_port, "/api") for _ in range(requests)]
        assert statuses == [401] * requests
        busy = [pid for pid in workers if cpu_ticks(pid) - before[pid] >= 2]
        assert len(busy) == 2, "both workers answer"
        missing = 'lastguard_decisions_total{reason="missing_token",result="deny"}'
        assert metric(sidecar.metrics_port, missing) == requests  # summed over workers

        # A worker that dies is replaced; its counts stay in the totals.
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        eventually(lambda: len(children(sidecar.pid) - {victim}) == 2)
        eventually(lambda: get(health_port, "/readyz") == 200)
        assert get(http_port, "/healthz") == 200
        assert metric(sidecar.metrics_port, missing) == requests
        assert metric(sidecar.metrics_port, "lastguard_policies_loaded ") == 1
    finally:
        assert sidecar.stop() == 0, sidecar.log_tail()
    assert not children(sidecar.pid)
