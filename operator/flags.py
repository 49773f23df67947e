"""The flags of `lastguard operator` (the operator and its injection webhook). No I/O.

Defined apart from `main` (which imports kopf, the Kubernetes client and
aiohttp) and `webhook` (aiohttp), so that the CLI builds its whole parser for every
subcommand without loading them: `lastguard sidecar` never imports the
operator's stack. The flags become config objects in `main.config_from` and
`webhook.config_from`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lastguard.operator import inject, inject_spec
from lastguard.operator.bootstrap import Protocol


def add_operator_arguments(parser: argparse.ArgumentParser) -> None:
    """The operator's own flags (`lastguard operator`)."""
    parser.add_argument(
        "--namespace",
        dest="namespaces",
        action="append",
        default=[],
        metavar="NAMESPACE",
        help="watch JWTPolicies in this namespace (repeatable; default: all namespaces)",
    )
    parser.add_argument(
        "--listen", default="0.0.0.0:15010", help="gRPC address sidecars get policies from"
    )
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate for --listen")
    parser.add_argument("--tls-key", type=Path, help="PEM private key for --listen")
    parser.add_argument(
        "--tls-client-ca", type=Path, help="require sidecar certificates signed by this CA"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="serve sidecars without TLS (local development)"
    )
    parser.add_argument("--metrics-listen", help="Prometheus address, e.g. 0.0.0.0:9090")
    parser.add_argument("--health-listen", help="HTTP /healthz and /readyz, e.g. 0.0.0.0:8080")
    parser.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write status only while holding the Lease (default: on)",
    )
    parser.add_argument("--lease-name", default="lastguard-operator")
    parser.add_argument(
        "--lease-namespace", default=None, help="default: this pod's namespace, else 'default'"
    )
    parser.add_argument(
        "--pod-name",
        default=None,
        help="this replica's identity in the Lease (default: $POD_NAME, else the hostname)",
    )
    parser.add_argument(
        "--kube-server",
        default=None,
        help="API server URL, without TLS verification (tests and local development only)",
    )
    parser.add_argument(
        "--publish-ca-bundle",
        type=Path,
        default=None,
        metavar="FILE",
        help=(
            "publish this PEM CA bundle (re-read on change) as a ConfigMap in every namespace "
            f"labelled {inject.NAMESPACE_LABEL}={inject.NAMESPACE_ENABLED}, "
            "for injected sidecars to mount (default: publish nothing)"
        ),
    )
    parser.add_argument(
        "--ca-configmap-name",
        default="lastguard-ca",
        help="the ConfigMap --publish-ca-bundle writes (data key ca.crt; default lastguard-ca)",
    )
    parser.add_argument("--resync-interval", type=float, default=300.0, help=argparse.SUPPRESS)
    parser.add_argument("--status-interval", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--ca-publish-interval", type=float, default=10.0, help=argparse.SUPPRESS)


def add_webhook_arguments(parser: argparse.ArgumentParser) -> None:
    """The webhook's flags; it runs when --webhook-cert and --webhook-key are given."""
    web_ = parser.add_argument_group("sidecar-injection webhook")
    web_.add_argument("--webhook-listen", default="0.0.0.0:9443", help="HTTPS address")
    web_.add_argument("--webhook-cert", type=Path, help="PEM certificate (re-read on change)")
    web_.add_argument("--webhook-key", type=Path, help="PEM private key (re-read on change)")
    web_.add_argument(
        "--webhook-exclude-namespace",
        action="append",
        default=[],
        metavar="NAMESPACE",
        help=(
            "never inject pods in this namespace (repeatable); kube-system, kube-public, "
            "kube-node-lease and the operator's own namespace are always excluded"
        ),
    )
    web_.add_argument("--inject-image", help="the lastguard image for injected sidecars")
    web_.add_argument(
        "--inject-image-pull-policy",
        default="IfNotPresent",
        choices=("Always", "IfNotPresent", "Never"),
    )
    web_.add_argument(
        "--inject-policy-server",
        metavar="ADDRESS",
        help="what sidecars dial (default: lastguard-operator.<own namespace>.svc:15010)",
    )
    web_.add_argument(
        "--inject-ca-configmap",
        default="lastguard-ca",
        help="ConfigMap, in each injected namespace, with the CA of the policy server",
    )
    web_.add_argument("--inject-ca-key", default="ca.crt", help="its key holding the PEM CA")
    web_.add_argument("--inject-envoy-image", default=inject_spec.DEFAULT_ENVOY_IMAGE)
    web_.add_argument(
        "--inject-default-mode",
        default=inject_spec.Mode.SIDECAR.value,
        choices=[m.value for m in inject_spec.Mode],
        help="without the lastguard.dev/mode annotation: lastguard only, or lastguard + Envoy",
    )
    web_.add_argument(
        "--inject-default-protocol",
        default=Protocol.GRPC.value,
        choices=[p.value for p in Protocol],
        help="without the lastguard.dev/protocol annotation: how Envoy asks lastguard "
        "(http is cheaper per request; docs/http-mode.md)",
    )
    web_.add_argument(
        "--inject-log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    defaults = inject_spec.Resources()
    for prefix, what in (("inject", "lastguard"), ("inject-envoy", "Envoy")):
        for name, default in (
            ("cpu-request", defaults.cpu_request),
            ("memory-request", defaults.memory_request),
            ("memory-limit", defaults.memory_limit),
        ):
            web_.add_argument(
                f"--{prefix}-{name}",
                default=default,
                metavar="QUANTITY",
                help=f"{what} container ('' for none; default {default})",
            )


def webhook_enabled(args: argparse.Namespace) -> bool:
    """Whether the flags ask for the webhook (a certificate or key was given)."""
    return bool(args.webhook_cert or args.webhook_key)
