"""lastguard end to end on this machine: `make demo` (or `python scripts/demo.py`).

Starts, all on 127.0.0.1:
- the dev issuer, in this process (it mints the demo's tokens and serves their JWKS);
- the lastguard sidecar, as a real process through its CLI, with a demo policy;
- an echo app that answers with the headers it received;
- the real Envoy, running manifests/envoy/envoy-sidecar.yaml as shipped, ports aside.

Then sends requests through Envoy and prints what happened and why. Exits 1
if any step did not turn out as expected, 0 otherwise. Everything started is
stopped on the way out, also on Ctrl-C. Logs stay in .demo/ for reading.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the harness in tests/support runs the demo's servers too

from lastguard.sidecar import devissuer  # noqa: E402
from tests.support import envoy as envoy_support  # noqa: E402
from tests.support import envoy_config  # noqa: E402
from tests.support.sidecar import SidecarError, SidecarProcess  # noqa: E402
from tests.support.upstream import UpstreamApp  # noqa: E402

MANIFEST = ROOT / "manifests" / "envoy" / "envoy-sidecar.yaml"
AUDIENCE = "demo-api"
SUBJECT = "alice"


def demo_policy(issuer_url: str, jwks_uri: str) -> dict[str, Any]:
    return {
        "apiVersion": "lastguard.dev/v1alpha1",
        "kind": "JWTPolicy",
        "metadata": {"name": "demo", "namespace": "default"},
        "spec": {
            "issuers": [
                {
                    "issuer": issuer_url,
                    "jwksUri": jwks_uri,
                    "audiences": [AUDIENCE],
                    "outputClaimToHeaders": [{"header": "x-user", "claim": "sub"}],
                }
            ],
            "rules": [
                {"paths": ["/healthz"], "action": "Allow"},
                {"paths": ["/api/*"], "methods": ["GET"], "requiredScopes": ["read"]},
            ],
            "defaultAction": "Authenticate",
        },
    }


# --- the dev issuer, served from a thread of this process ----------------------


@contextmanager
def running_issuer(timeout: float = 10.0) -> Iterator[devissuer.DevIssuer]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="dev-issuer", daemon=True)
    thread.start()
    issuer = devissuer.DevIssuer()
    handle = None
    try:
        handle = asyncio.run_coroutine_threadsafe(
            devissuer.serve(issuer, "127.0.0.1", 0), loop
        ).result(timeout)
        yield issuer
    finally:
        if handle is not None:
            asyncio.run_coroutine_threadsafe(handle.close(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        loop.close()


# --- the walk-through ------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    title: str
    path: str
    headers: dict[str, str]
    expected_status: int
    #: What kind of token the request carries, for the table.
    token: str = "no token"
    #: For allowed requests: the x-user the app must see (None: the app must see none).
    expected_user: str | None = None
    method: str = "GET"


@dataclass(frozen=True)
class Outcome:
    status: int
    why: str
    ok: bool


def steps(issuer: devissuer.DevIssuer) -> list[Step]:
    def bearer(**mint: Any) -> dict[str, str]:
        claims = {"sub": SUBJECT, "scope": "read", **mint.pop("claims", {})}
        token = issuer.mint(claims, **{"audience": AUDIENCE, **mint})
        return {"authorization": f"Bearer {token}"}

    api, health = "/api/orders", "/healthz"
    read = bearer()
    expired = bearer(now=time.time() - 3600)
    other_audience = bearer(audience="other-api")
    write_only = bearer(claims={"scope": "write"})
    spoof = {"x-user": "admin"}
    return [
        Step("no token", api, {}, 401),
        Step("valid token", api, read, 200, "token with scope read", SUBJECT),
        Step("expired token", api, expired, 401, "token expired 1h ago"),
        Step("wrong audience", api, other_audience, 401, "token for other-api"),
        Step("missing scope", api, write_only, 403, "token with scope write"),
        Step("health, no token", health, {}, 200),
        Step("spoofed x-user + token", api, read | spoof, 200, "token with scope read", SUBJECT),
        Step("spoofed x-user on health", health, spoof, 200),
    ]


def run_step(step: Step, envoy: envoy_support.EnvoyProcess) -> Outcome:
    try:
        response = envoy.request(step.method, step.path, step.headers, timeout=5.0)
    except OSError as exc:
        return Outcome(0, f"request failed: {exc}", False)
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status == 200:
        user = body.get("headers", {}).get("x-user")
        why = f"app saw x-user: {user}" if user is not None else "app saw no x-user"
        ok = user == step.expected_user
    else:
        why = body.get("error_description") or body.get("error") or response.text[:60] or "-"
        ok = True
    return Outcome(response.status, why, ok and response.status == step.expected_status)


def print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def describe(step: Step) -> str:
    extras = [f"{k}: {v}" for k, v in step.headers.items() if k != "authorization"]
    return f"{step.method} {step.path} ({', '.join([step.token, *extras])})"


def expectation(step: Step) -> str:
    if step.expected_status != 200:
        return str(step.expected_status)
    return f"200, x-user={step.expected_user or '(none)'}"


# --- main -------------------------------------------------------------------------


def _stop_on_sigterm(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / ".demo", help="logs and config")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    workdir: Path = args.workdir
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "envoy").mkdir(parents=True)
    started = time.monotonic()
    say: Callable[[str], None] = lambda text: print(f"[{time.monotonic() - started:5.1f}s] {text}")  # noqa: E731

    with ExitStack() as stack:
        issuer = stack.enter_context(running_issuer())
        say(f"dev issuer       {issuer.url}")

        policy_file = workdir / "policy.yaml"
        policy_file.write_text(
            yaml.safe_dump(demo_policy(issuer.url, issuer.jwks_uri), sort_keys=False)
        )
        sidecar = SidecarProcess(policy_file, workdir=workdir, ready_timeout=15.0)
        stack.callback(sidecar.stop)
        sidecar.start()
        say(f"lastguard        127.0.0.1:{sidecar.port} (pid {sidecar.pid}, policy {policy_file})")

        app = stack.enter_context(UpstreamApp())
        say(f"echo app         {app.url}")

        config = envoy_config.rewrite_sidecar_bootstrap(
            yaml.safe_load(MANIFEST.read_text()), app_port=app.port, authz_port=sidecar.port
        )
        envoy = envoy_support.EnvoyProcess(
            bootstrap_config=config, workdir=workdir / "envoy", startup_timeout=15.0
        )
        stack.callback(envoy.stop)
        envoy.start()
        say(f"envoy            {envoy.url(path='')} ({MANIFEST.relative_to(ROOT)})")
        print()

        rows = [("step", "request", "expected", "got", "why", "result")]
        failures = 0
        for n, step in enumerate(steps(issuer), start=1):
            outcome = run_step(step, envoy)
            failures += not outcome.ok
            rows.append(
                (
                    f"{n}. {step.title}",
                    describe(step),
                    expectation(step),
                    str(outcome.status),
                    outcome.why,
                    "ok" if outcome.ok else "UNEXPECTED",
                )
            )
        print_table(rows)
        print()
        say(f"logs in {workdir.relative_to(ROOT) if workdir.is_relative_to(ROOT) else workdir}")
    if failures:
        print(f"{failures} step(s) did not go as expected", file=sys.stderr)
        return 1
    print("every step went as expected")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
    except (SidecarError, envoy_support.EnvoyError) as exc:
        print(f"demo could not start: {exc}", file=sys.stderr)
        sys.exit(1)
