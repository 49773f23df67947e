"""TLS for the policy distribution server: the PEM files, and credentials that follow them.

`TlsFiles` names the PEM files; `reloading_credentials` turns them into gRPC
server credentials that re-read the files when they change on disk
(cert-manager, a Secret update), so the next sidecar that connects gets the
renewed certificate with no restart.

Invariants: the files are read once at start, where a failure raises; after
that, a pair that fails to read keeps the last good one (logged), never stops
the server. With `client_ca`, every sidecar must present a certificate that CA
signed (mutual TLS).

grpc is imported only where credentials are built: `TlsFiles` is also the
operator's config type (`main.OperatorConfig.tls`), and `main` must load without
grpc (the distribution server is imported when the operator starts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

# The distribution server's own logger: these lines are about its TLS.
log = logging.getLogger("lastguard.operator.distribution")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for serving TLS. With `client_ca`, every sidecar must present a
    certificate that CA signed (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class _CertificateFiles:
    """Fetches the TLS configuration again whenever the PEM files change.

    gRPC calls `fetch` before each new handshake; returning None keeps the
    current configuration. So a certificate renewed on disk (cert-manager, a
    Secret update) is served to the next connecting sidecar with no restart; a
    pair that fails to read keeps the last good one.
    """

    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self.initial = self._configuration()
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, ...]:
        files = [self.tls.cert, self.tls.key, *([self.tls.client_ca] if self.tls.client_ca else [])]
        return tuple(f.stat().st_mtime_ns for f in files)

    def _configuration(self) -> Any:
        import grpc

        return grpc.ssl_server_certificate_configuration(
            [(self.tls.key.read_bytes(), self.tls.cert.read_bytes())],
            root_certificates=self.tls.client_ca.read_bytes() if self.tls.client_ca else None,
        )

    def fetch(self) -> Any:
        try:
            stamp = self._stamp()
            if stamp == self._seen:
                return None
            configuration = self._configuration()
        except OSError as exc:
            log.warning("policy TLS files unreadable; serving the last good ones: %s", exc)
            return None
        self._seen = stamp
        log.info("policy TLS certificate reloaded", extra={"fields": {"cert": str(self.tls.cert)}})
        return configuration


def reloading_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that pick up renewed certificate files (see _CertificateFiles)."""
    import grpc

    files = _CertificateFiles(tls)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files.fetch, require_client_authentication=tls.client_ca is not None
    )
