"""The `lastguard` command: `sidecar`, `operator`, `verify` and `dev-issuer` subcommands.

Flags are parsed into frozen config objects here and nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from lastguard.sidecar import logs
from lastguard.sidecar.policy.select import Workload
from lastguard.sidecar.policy_client import DEFAULT_SNAPSHOT_FILE


def _pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    return key, value


def _workload(args: argparse.Namespace) -> Workload | None:
    if args.namespace is None and not args.label:
        return None
    return Workload.of(args.namespace or "default", dict(args.label))


def _add_workload_flags(p: argparse.ArgumentParser, *, file_required: bool = True) -> None:
    p.add_argument(
        "--policy-file", type=Path, required=file_required, help="YAML file of JWTPolicy documents"
    )
    p.add_argument("--namespace", help="this workload's namespace (selects among several policies)")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        type=_pair,
        metavar="KEY=VALUE",
        help="a pod label (repeatable)",
    )


POD_INFO_HELP = """\
--pod-info-dir expects a downward API volume with these items:
  volumes:
  - name: podinfo
    downwardAPI:
      items:
      - {path: namespace, fieldRef: {fieldPath: metadata.namespace}}
      - {path: labels, fieldRef: {fieldPath: metadata.labels}}
      - {path: name, fieldRef: {fieldPath: metadata.name}}
"""


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (the operator's flags come from a module without kopf or
    the Kubernetes client, so building them loads neither)."""
    from lastguard.operator import flags as operator_flags

    parser = argparse.ArgumentParser(prog="lastguard", description=__doc__)
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)

    side = sub.add_parser(
        "sidecar",
        help="run the Envoy ext_authz server",
        description="Policies come from --policy-file or from the operator (--policy-server).",
        epilog=POD_INFO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_workload_flags(side, file_required=False)
    side.add_argument(
        "--policy-server",
        metavar="ADDRESS",
        help="the operator's policy distribution address (host:port), instead of --policy-file",
    )
    side.add_argument(
        "--policy-server-ca",
        type=Path,
        metavar="FILE",
        help="PEM CA bundle that signed the policy server's certificate (TLS)",
    )
    side.add_argument(
        "--policy-server-insecure",
        action="store_true",
        help="talk to the policy server in plaintext (local development only)",
    )
    side.add_argument(
        "--pod-info-dir",
        type=Path,
        metavar="DIR",
        help="downward API volume with this pod's namespace, labels and name (see below)",
    )
    side.add_argument(
        "--snapshot-file",
        metavar="FILE",
        help=(
            "where the last policy snapshot from the policy server is kept, so a restarted "
            f"sidecar enforces it at once (default: {DEFAULT_SNAPSHOT_FILE}; '' keeps it "
            "in memory only)"
        ),
    )
    side.add_argument("--listen", default="127.0.0.1:9191", help="gRPC address for Envoy")
    side.add_argument(
        "--http-listen",
        default=None,
        help="also answer Envoy's HTTP ext_authz protocol here, e.g. 127.0.0.1:9192 "
        "(much cheaper per request than gRPC; see docs/http-mode.md)",
    )
    side.add_argument(
        "--metrics-listen", default=None, help="Prometheus address, e.g. 127.0.0.1:9090"
    )
    side.add_argument(
        "--health-listen",
        default=None,
        help="HTTP address for Kubernetes probes: GET /healthz and /readyz (e.g. 0.0.0.0:9091)",
    )
    side.add_argument(
        "--workers",
        type=int,
        default=1,
        help="sidecar processes sharing the ports (SO_REUSEPORT), for more than one core; "
        "needs fixed ports (default 1)",
    )
    side.add_argument("--ready-file", type=Path, default=None, help=argparse.SUPPRESS)
    side.add_argument("--realm", default="lastguard", help="realm in WWW-Authenticate challenges")
    side.add_argument(
        "--allow-without-policy",
        action="store_true",
        help="allow requests when no policy selects this workload (default: deny with 403)",
    )
    side.add_argument(
        "--log-claims", action="store_true", help="include verified claims in denial logs"
    )
    side.add_argument("--reload-interval", type=float, default=1.0)
    side.add_argument("--token-cache-entries", type=int, default=100_000)
    side.add_argument(
        "--gc-full-interval",
        type=float,
        default=600.0,
        help="seconds between scheduled full garbage collections, which replace the "
        "automatic ones that pause Check (0: Python's defaults)",
    )
    side.add_argument(
        "--token-cache-mib",
        type=int,
        default=64,
        help="memory bound of the verified-token cache (about 4 KB per token)",
    )

    ver = sub.add_parser("verify", help="decide one request offline and explain why")
    _add_workload_flags(ver)
    ver.add_argument("--token", help="the JWT (or '-' to read it from stdin)")
    ver.add_argument("--path", default="/")
    ver.add_argument("--method", default="GET")
    ver.add_argument(
        "--header",
        action="append",
        default=[],
        type=_pair,
        metavar="NAME=VALUE",
        help="extra request header",
    )

    op = sub.add_parser(
        "operator", help="watch JWTPolicies, write their status, stream them to sidecars"
    )
    operator_flags.add_operator_arguments(op)
    operator_flags.add_webhook_arguments(op)

    dev = sub.add_parser("dev-issuer", help="serve a JWKS and mint tokens (demos and tests only)")
    dev.add_argument("--listen", default="127.0.0.1:9000")
    dev.add_argument("--issuer", default=None, help="issuer URL (default: http://LISTEN)")
    dev.add_argument("--mint", action="store_true", help="print one token and exit")
    dev.add_argument("--claims", default="{}", help="JSON claims for --mint")
    dev.add_argument("--alg", default="RS256")
    dev.add_argument("--lifetime", type=int, default=300)
    return parser


def _sidecar_source_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the policy source flags, if anything."""
    if (args.policy_file is None) == (args.policy_server is None):
        return "give exactly one of --policy-file FILE and --policy-server ADDRESS"
    if args.pod_info_dir is not None and (args.namespace is not None or args.label):
        return "--pod-info-dir already gives the namespace and labels; drop --namespace/--label"
    server_only = [
        flag
        for flag, value in (
            ("--policy-server-ca", args.policy_server_ca),
            ("--policy-server-insecure", args.policy_server_insecure),
            ("--snapshot-file", args.snapshot_file),
        )
        if value
    ]
    if args.policy_server is None:
        if server_only:
            return f"{', '.join(server_only)} only apply with --policy-server"
        return None
    if args.pod_info_dir is None and args.namespace is None:
        return (
            "--policy-server needs this pod's identity: --pod-info-dir DIR (downward API) "
            "or --namespace NS [--label KEY=VALUE ...]"
        )
    if (args.policy_server_ca is None) != args.policy_server_insecure:
        return (
            "--policy-server needs exactly one of --policy-server-ca FILE (TLS) and "
            "--policy-server-insecure (plaintext, local development only)"
        )
    return None


def _workers_problem(args: argparse.Namespace) -> str | None:
    from lastguard.sidecar.workers import fixed_port_problem

    if args.workers < 1:
        return "--workers must be at least 1"
    return fixed_port_problem(args.listen, args.http_listen)


async def _run_operator(args: argparse.Namespace) -> int:
    from lastguard.operator import main as operator_main
    from lastguard.operator import webhook
    from lastguard.operator.flags import webhook_enabled

    handle = None
    if webhook_enabled(args):
        try:
            handle = await webhook.start_webhook(args)
        except webhook.WebhookError as exc:
            print(f"lastguard operator: {exc}", file=sys.stderr)
            return 2
    try:
        return await operator_main.run(args)
    finally:
        if handle is not None:
            await handle.close()


async def _run_sidecar(args: argparse.Namespace) -> int:
    from lastguard.sidecar.podinfo import PodInfoError
    from lastguard.sidecar.server import Sidecar, SidecarConfig

    snapshot_file = None
    if args.policy_server is not None:
        chosen = DEFAULT_SNAPSHOT_FILE if args.snapshot_file is None else args.snapshot_file
        snapshot_file = Path(chosen) if chosen else None
    config = SidecarConfig(
        policy_file=args.policy_file,
        policy_server=args.policy_server,
        policy_server_ca=args.policy_server_ca,
        policy_server_insecure=args.policy_server_insecure,
        snapshot_file=snapshot_file,
        pod_info_dir=args.pod_info_dir,
        pod_name=socket.gethostname(),  # a pod's hostname is its name; pod info overrides
        listen=args.listen,
        http_listen=args.http_listen,
        ready_file=args.ready_file,
        metrics_listen=args.metrics_listen,
        health_listen=args.health_listen,
        gc_full_interval=args.gc_full_interval,
        workload=_workload(args),
        default_namespace=args.namespace or "default",
        realm=args.realm,
        allow_without_policy=args.allow_without_policy,
        log_claims=args.log_claims,
        reload_interval=args.reload_interval,
        token_cache_entries=args.token_cache_entries,
        token_cache_bytes=args.token_cache_mib * 1024 * 1024,
    )
    try:
        sidecar = Sidecar(config)
    except PodInfoError as exc:
        print(f"lastguard sidecar: {exc}", file=sys.stderr)
        return 2
    await sidecar.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sidecar.stop()
    return 0


async def _run_verify(args: argparse.Namespace) -> int:
    from lastguard.sidecar import verify

    token = sys.stdin.readline().strip() if args.token == "-" else args.token
    headers = dict(args.header)
    result = await verify.explain(
        args.policy_file,
        _workload(args),
        args.namespace or "default",
        token=token,
        method=args.method.upper(),
        path=args.path,
        headers=headers,
    )
    print(json.dumps(result, indent=2, default=str))
    return 0 if result["allowed"] else 1


async def _run_dev_issuer(args: argparse.Namespace) -> int:
    from lastguard.sidecar import devissuer

    host, _, port = args.listen.rpartition(":")
    if args.mint:
        issuer = devissuer.DevIssuer(args.issuer or f"http://{args.listen}")
        print(issuer.mint(json.loads(args.claims), alg=args.alg, lifetime=args.lifetime))
        return 0
    issuer = devissuer.DevIssuer(args.issuer)  # None: the bound URL
    handle = await devissuer.serve(issuer, host or "127.0.0.1", int(port))
    print(
        json.dumps({"issuer": issuer.issuer_url, "jwks_uri": f"{handle.url}/jwks.json"}), flush=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await handle.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "sidecar":
        problem = _sidecar_source_problem(args)
        if problem is None and args.workers != 1:
            problem = _workers_problem(args)
        if problem is not None:
            parser.error(problem)
    logs.configure(args.log_level)
    if args.command == "sidecar" and args.workers > 1:
        from lastguard.sidecar.workers import Supervisor

        supervisor = Supervisor(
            argv,
            args.workers,
            metrics_listen=args.metrics_listen,
            health_listen=args.health_listen,
        )
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(supervisor.run())
        return 130
    runner = {
        "sidecar": _run_sidecar,
        "verify": _run_verify,
        "dev-issuer": _run_dev_issuer,
        "operator": _run_operator,
    }
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(runner[args.command](args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
