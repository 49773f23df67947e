"""`lastguard sidecar --workers N`: N sidecar processes sharing one port, for more than a core.

A Python process decides on one core at a time. With `--workers N` this
process becomes a small supervisor: it starts N ordinary sidecar processes with
the same flags, and each binds the same gRPC (and HTTP) address with
`SO_REUSEPORT`, so the kernel spreads Envoy's connections across them. Every
worker loads policies and keys itself and keeps its own token cache.

The supervisor owns what must be one per pod:

- **Metrics.** Workers write their metrics into a shared directory
  (prometheus_client's multiprocess mode, `PROMETHEUS_MULTIPROC_DIR`); the
  supervisor serves `--metrics-listen`, summing counters and histograms over
  workers, dead ones included, so totals never go backwards when a worker is
  replaced.
- **Probes.** `--health-listen` answers `/healthz` while every worker runs and
  `/readyz` once every worker has loaded a policy set (each worker touches its
  `--ready-file`).
- **Restarts.** A worker that exits is started again after a short backoff;
  SIGTERM or SIGINT stops every worker (each drains its in-flight checks) and
  then the supervisor.

Ports must be fixed (not 0): the workers must all bind the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger("lastguard.workers")

#: Flags the supervisor keeps for itself; workers get everything else.
_SUPERVISOR_FLAGS = ("--workers", "--metrics-listen", "--health-listen")
_RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0)
_STOP_GRACE = 10.0


def worker_argv(argv: Sequence[str], ready_file: Path) -> list[str]:
    """The sidecar's own command line without the supervisor's flags, plus `--ready-file`.

    Both `--flag value` and `--flag=value` forms are removed. Pure.
    """
    out: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        name = arg.partition("=")[0]
        if name in _SUPERVISOR_FLAGS:
            skip_value = "=" not in arg
            continue
        out.append(arg)
    return [*out, "--ready-file", str(ready_file)]


def fixed_port_problem(listen: str, http_listen: str | None) -> str | None:
    """Why these addresses cannot be shared by workers, or None. Pure."""
    for flag, address in (("--listen", listen), ("--http-listen", http_listen)):
        if address is not None and address.rpartition(":")[2] in ("", "0"):
            return f"--workers needs a fixed port in {flag} (got {address!r})"
    return None


class _Worker:
    def __init__(self, index: int, argv: list[str], ready_file: Path, env: dict[str, str]) -> None:
        self.index = index
        self.argv = argv
        self.ready_file = ready_file
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0

    async def start(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lastguard.sidecar.cli", *self.argv, env=self.env
        )
        log.info("worker started", extra={"fields": {"worker": self.index, "pid": self.pid}})

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def ready(self) -> bool:
        return self.running() and self.ready_file.exists()


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        workers: int,
        *,
        metrics_listen: str | None,
        health_listen: str | None,
    ) -> None:
        self.argv = list(argv)
        self.count = workers
        self.metrics_listen = metrics_listen
        self.health_listen = health_listen
        self.directory = Path(tempfile.mkdtemp(prefix="lastguard-workers-"))
        self.workers: list[_Worker] = []
        self._stopping = asyncio.Event()

    def _metrics_dir(self) -> Path:
        return self.directory / "metrics"

    async def run(self) -> int:
        """Runs the workers until SIGTERM or SIGINT; returns the exit code."""
        from lastguard.sidecar import health_http

        metrics_dir = self._metrics_dir()
        metrics_dir.mkdir()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        metrics_server = self._serve_metrics(metrics_dir)
        health = None
        if self.health_listen:
            health = await health_http.serve(
                self.health_listen, lambda: all(w.ready() for w in self.workers)
            )
        try:
            for index in range(self.count):
                ready_file = self.directory / f"ready-{index}"
                worker = _Worker(index, worker_argv(self.argv, ready_file), ready_file, env)
                self.workers.append(worker)
                await worker.start()
            watchers = [asyncio.create_task(self._watch(w)) for w in self.workers]
            await self._stopping.wait()
            for task in watchers:
                task.cancel()
            await self._stop_workers()
        finally:
            if health is not None:
                health.close()
                await health.wait_closed()
            if metrics_server is not None:
                metrics_server.shutdown()
            shutil.rmtree(self.directory, ignore_errors=True)
        return 0

    def _serve_metrics(self, metrics_dir: Path) -> WSGIServer | None:
        if not self.metrics_listen:
            return None
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
        host, _, port = self.metrics_listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)  # noqa: S104
        return server

    async def _watch(self, worker: _Worker) -> None:
        """Restarts `worker` whenever it exits, until the supervisor stops."""
        from prometheus_client import multiprocess

        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if self._stopping.is_set():
                return
            # Its gauges go (counters and histograms stay, summed with the live ones).
            multiprocess.mark_process_dead(worker.pid, str(self._metrics_dir()))  # type: ignore[no-untyped-call]
            delay = _RESTART_BACKOFF[min(worker.restarts, len(_RESTART_BACKOFF) - 1)]
            log.warning(
                "worker exited; starting it again",
                extra={"fields": {"worker": worker.index, "exit": code, "in_seconds": delay}},
            )
            worker.restarts += 1
            await asyncio.sleep(delay)
            await worker.start()

    async def _stop_workers(self) -> None:
        for worker in self.workers:
            if worker.running():
                assert worker.process is not None
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                await asyncio.wait_for(worker.process.wait(), _STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
