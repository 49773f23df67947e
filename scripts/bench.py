"""What lastguard costs behind a real Envoy: `make bench` (or `python scripts/bench.py`).

Starts, all on 127.0.0.1:
- lastguard, as a real process through its CLI, with a realistic policy
  (3 issuers with inline JWKS, 13 rules, claim headers);
- a no-op ext_authz server (scripts/bench_noop.py, grpc.aio on our own proto):
  the floor any Python ext_authz server pays;
- one Envoy (`--concurrency 1`) with four listeners, each answering 200 itself
  (`direct_response`, no upstream app), after: `none` no auth filter;
  `jwt_authn` Envoy's native filter with the same issuer, keys and audience;
  `lastguard` ext_authz to lastguard; `noop` ext_authz to the no-op server.

Then runs wrk (installed with apt-get when missing) against them, every run
bounded in time: at saturation (64 connections) and paced at about 1,000
requests/s, interleaving the variants, several rounds, and prints medians, the
ratios lastguard / no-op and lastguard / jwt_authn, and the issue's targets.
Everything started is stopped on the way out, also on Ctrl-C.

Tokens for cache-miss runs are minted ahead (in parallel processes) and kept in
.bench/ with the bench issuer's keys, so later runs reuse them; each run gets a
slice of its own, so no token is sent twice in one bench. Results go to
.bench/results.json; logs (wrk, Envoy, both servers) stay in .bench/.

The cores may be shared: before each run the bench waits (bounded) for other
processes to quieten, and makes a run again when they still disturbed it; the
time this may take is capped, and what could not be avoided is reported.

Exit status: 0 when every run was valid, 1 when a sanity check or a run was
not (the table says which), 2 when the bench cannot run (no wrk), 130 on Ctrl-C.
See docs/performance.md for how to read the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import jwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import algorithms as jwt_algorithms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the harness in tests/support runs Envoy and the sidecar

from lastguard.sidecar import devissuer  # noqa: E402
from tests.support import envoy as envoy_support  # noqa: E402
from tests.support.sidecar import SidecarError, SidecarProcess, port_open  # noqa: E402

HOST = "127.0.0.1"
WRK_SCRIPTS = ROOT / "scripts" / "bench_wrk"
NOOP_SERVER = ROOT / "scripts" / "bench_noop.py"

ISSUER = "https://idp.bench.lastguard.dev"
AUDIENCE = "orders-api"
#: The measured request: matched by the 12th of the policy's 13 rules (scope api.read).
REQUEST_PATH = "/api/catalog/items?page=2"
SCOPES = "api.read orders.read"
TOKEN_LIFETIME = 30 * 86_400
#: A pool whose earliest token expires sooner than this is minted again.
MIN_REMAINING_LIFETIME = 2 * 86_400
ALGORITHMS = ("RS256", "ES256")
#: Other processes busier than this (cores, on average over a run) make the run "shared".
OTHER_LOAD_NOTICE = 0.15
#: After wrk exits: time for the checks still queued to finish before CPU is read.
SETTLE_SECONDS = 0.25


class BenchError(RuntimeError):
    """The bench cannot run or its measurements are not valid; the message says why."""


# --- settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Built once from the flags."""

    rounds: int = 3
    duration: int = 5
    connections: int = 64
    threads: int = 2
    paced_connections: int = 20
    paced_mean_delay_ms: int = 20
    #: Fresh tokens set aside per second of a saturated cache-miss run: above any
    #: Python ext_authz server's rate here (the no-op floor is ~5-6k/s), so a run
    #: never runs out. One that does is reported as invalid.
    miss_rate_ceiling: int = 8_000
    warmup: int = 1
    #: A run during which other processes kept more than OTHER_LOAD_NOTICE cores
    #: busy is run again up to this many times; the quietest attempt counts.
    retries: int = 1
    #: Before each run, wait up to this long for other processes to quieten.
    quiet_wait: float = 10.0
    #: Waiting and runs made again stop once they took this share of the planned time.
    disturbance_budget: float = 0.5
    workdir: Path = ROOT / ".bench"

    @property
    def paced_rate(self) -> int:
        return self.paced_connections * 1000 // self.paced_mean_delay_ms


# --- wrk ----------------------------------------------------------------------------


def ensure_wrk() -> str:
    """wrk's path, installing Debian's package when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise BenchError("wrk is not installed and there is no apt-get to install it")
    print("wrk not found: apt-get install -y wrk", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def install() -> bool:
        result = subprocess.run(  # noqa: S603
            [apt, "install", "-y", "-q", "wrk"], env=env, capture_output=True, check=False
        )
        return result.returncode == 0

    if not install():
        # A fresh machine has no package lists yet.
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True, check=False)  # noqa: S603
        if not install():
            raise BenchError(
                "could not install wrk (apt-get install -y wrk failed, also after apt-get "
                "update); install it by hand and run again"
            )
    found = shutil.which("wrk")
    if found is None:
        raise BenchError("apt-get installed wrk but it is not on PATH")
    return found


# --- keys and tokens ----------------------------------------------------------------


def _kid(alg: str, public: Any) -> str:
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"bench-{alg.lower()}-{hashlib.sha256(der).hexdigest()[:12]}"


def token_claims(serial: str, issued: int) -> dict[str, Any]:
    return {
        "iss": ISSUER,
        "sub": f"user-{serial}",
        "aud": AUDIENCE,
        "iat": issued,
        "nbf": issued,
        "exp": issued + TOKEN_LIFETIME,
        "jti": f"bench-{serial}",
        "scope": SCOPES,
        "groups": ["buyers"],
        "org": {"tenant": "acme"},
    }


def _mint_chunk(job: tuple[bytes, str, str, int, int, int]) -> list[str]:
    """Runs in a worker process: `count` tokens with serials `first`...; picklable input."""
    pem, alg, kid, first, count, issued = job
    key: Any = serialization.load_pem_private_key(pem, password=None)  # ours: RSA or EC
    prefix = alg.lower()
    return [
        jwt.encode(token_claims(f"{prefix}-{n}", issued), key, algorithm=alg, headers={"kid": kid})
        for n in range(first, first + count)
    ]


class BenchIssuer:
    """The measured issuer's signing keys (RSA-2048 for RS256, P-256 for ES256), kept on disk.

    Not `DevIssuer`: its keys live in memory and are new on every start, while the
    bench keeps minted tokens across runs, so the keys that signed them must stay.
    A bench-only key: never used anywhere else.
    """

    def __init__(self, keydir: Path) -> None:
        keydir.mkdir(parents=True, exist_ok=True)
        self.pems: dict[str, bytes] = {}
        self.keys: dict[str, Any] = {}
        for alg in ALGORITHMS:
            path = keydir / f"{alg.lower()}.pem"
            if not path.exists():
                private: Any = (
                    rsa.generate_private_key(public_exponent=65537, key_size=2048)
                    if alg == "RS256"
                    else ec.generate_private_key(ec.SECP256R1())
                )
                path.write_bytes(
                    private.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
                path.chmod(0o600)
            self.pems[alg] = path.read_bytes()
            self.keys[alg] = serialization.load_pem_private_key(self.pems[alg], password=None)
        self.kids = {alg: _kid(alg, self.keys[alg].public_key()) for alg in ALGORITHMS}

    def jwks_json(self) -> str:
        keys = []
        for alg in ALGORITHMS:
            public = self.keys[alg].public_key()
            family = jwt_algorithms.RSAAlgorithm if alg == "RS256" else jwt_algorithms.ECAlgorithm
            jwk = family.to_jwk(public, as_dict=True)
            jwk.update(kid=self.kids[alg], alg=alg, use="sig")
            keys.append(jwk)
        return json.dumps({"keys": keys})

    def mint(self, serial: str, alg: str) -> str:
        claims = token_claims(serial, int(time.time()))
        return jwt.encode(claims, self.keys[alg], algorithm=alg, headers={"kid": self.kids[alg]})


class TokenPool:
    """Unique tokens of one algorithm, one a line in `<alg>.txt`, described by `<alg>.json`.

    Reused across bench runs while the signing key is the same and the tokens
    have days left; grown by appending when a bench needs more.
    """

    CHUNK = 2_000

    def __init__(self, directory: Path, issuer: BenchIssuer, alg: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.issuer = issuer
        self.alg = alg
        self.path = directory / f"{alg.lower()}.txt"
        self.meta_path = directory / f"{alg.lower()}.json"

    def _usable_count(self) -> int:
        try:
            meta = json.loads(self.meta_path.read_text())
            with open(self.path, "rb") as tokens:
                lines = sum(chunk.count(b"\n") for chunk in iter(lambda: tokens.read(1 << 20), b""))
        except (OSError, ValueError):
            return 0
        fresh_enough = meta.get("earliest_exp", 0) > time.time() + MIN_REMAINING_LIFETIME
        if meta.get("kid") != self.issuer.kids[self.alg] or not fresh_enough:
            return 0
        return int(meta["count"]) if meta.get("count") == lines else 0

    def ensure(self, needed: int, say: Callable[[str], None]) -> int:
        """Makes sure the pool holds at least `needed` tokens; returns how many it holds."""
        have = self._usable_count()
        if have >= needed:
            return have
        if have == 0:
            self.path.unlink(missing_ok=True)
            self.meta_path.unlink(missing_ok=True)
            earliest = None
        else:
            earliest = json.loads(self.meta_path.read_text())["earliest_exp"]
        missing = needed - have
        say(f"minting {missing:,} {self.alg} tokens into {_shown(self.path)} ...")
        started = time.monotonic()
        issued = int(time.time())
        jobs = [
            (self.issuer.pems[self.alg], self.alg, self.issuer.kids[self.alg], first, n, issued)
            for first, n in _chunks(have, missing, self.CHUNK)
        ]
        pool = ProcessPoolExecutor(max_workers=os.cpu_count() or 1)
        try:
            with open(self.path, "a") as out:
                for tokens in pool.map(_mint_chunk, jobs):
                    out.write("\n".join(tokens) + "\n")
        finally:
            # On Ctrl-C: drop the chunks not started. The pool's count stays as it
            # was, so the next run sees a file longer than its count and mints anew.
            pool.shutdown(wait=True, cancel_futures=True)
        meta = {
            "alg": self.alg,
            "kid": self.issuer.kids[self.alg],
            "count": needed,
            "earliest_exp": min(earliest or issued + TOKEN_LIFETIME, issued + TOKEN_LIFETIME),
        }
        self.meta_path.write_text(json.dumps(meta))
        say(f"  {missing:,} tokens in {time.monotonic() - started:.1f}s")
        return needed

    def line(self, n: int) -> str:
        """The n-th token (0-based)."""
        with open(self.path) as tokens:
            for number, token in enumerate(tokens):
                if number == n:
                    return token.strip()
        raise BenchError(f"{self.path} has no line {n}")


def _shown(path: Path) -> Path:
    """`path` relative to the repository when it is inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _chunks(first: int, count: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(first, first + count, size):
        yield start, min(size, first + count - start)


# --- the policy and Envoy ------------------------------------------------------------


def bench_policy(jwks_json: str, partner: devissuer.DevIssuer, jobs: devissuer.DevIssuer) -> Any:
    """A JWTPolicy shaped like a real API's: three issuers, thirteen rules, claim headers."""
    return {
        "apiVersion": "lastguard.dev/v1alpha1",
        "kind": "JWTPolicy",
        "metadata": {"name": "orders-api", "namespace": "shop"},
        "spec": {
            "issuers": [
                {
                    "issuer": ISSUER,
                    "jwks": jwks_json,
                    "audiences": [AUDIENCE],
                    "algorithms": list(ALGORITHMS),
                    "maxLifetimeSeconds": TOKEN_LIFETIME + 86_400,
                    "outputClaimToHeaders": [
                        {"header": "x-user", "claim": "sub"},
                        {"header": "x-groups", "claim": "groups"},
                        {"header": "x-tenant", "claim": "org.tenant"},
                    ],
                },
                {
                    "issuer": partner.url,
                    "jwks": json.dumps(partner.jwks()),
                    "audiences": ["orders-partner"],
                    "algorithms": ["ES256"],
                    "fromHeaders": [{"name": "x-partner-token"}],
                    "outputClaimToHeaders": [{"header": "x-partner", "claim": "sub"}],
                },
                {
                    "issuer": jobs.url,
                    "jwks": json.dumps(jobs.jwks()),
                    "audiences": [AUDIENCE],
                    "algorithms": ["EdDSA"],
                    "outputClaimToHeaders": [{"header": "x-service", "claim": "sub"}],
                },
            ],
            "rules": [
                {"paths": ["/healthz", "/readyz"], "action": "Allow"},
                {"paths": ["/metrics"], "action": "Allow"},
                {"paths": ["/admin/*", "/debug/*"], "action": "Deny"},
                {"paths": ["/public/*"], "action": "Optional"},
                {"paths": ["/api/orders/*"], "methods": ["GET"], "requiredScopes": ["orders.read"]},
                {
                    "paths": ["/api/orders/*"],
                    "methods": ["POST", "PUT", "DELETE"],
                    "requiredScopes": ["orders.write"],
                    "requiredClaims": [{"claim": "groups", "values": ["buyers", "admins"]}],
                },
                {
                    "paths": ["/api/payments/*"],
                    "requiredScopes": ["payments.write"],
                    "requiredClaims": [{"claim": "groups", "values": ["finance"]}],
                },
                {"paths": ["/api/users/*"], "methods": ["GET"], "requiredScopes": ["users.read"]},
                {
                    "paths": ["/api/users/*"],
                    "methods": ["PUT", "PATCH", "DELETE"],
                    "requiredScopes": ["users.write"],
                },
                {
                    "paths": ["/api/reports/*"],
                    "requiredClaims": [{"claim": "org.tenant", "values": ["acme", "globex"]}],
                },
                {"paths": ["/api/partners/*"], "requiredScopes": ["partner.orders"]},
                {"paths": ["/api/*"], "methods": ["GET", "HEAD"], "requiredScopes": ["api.read"]},
                {"paths": ["/api/*"], "requiredScopes": ["api.write"]},
            ],
            "defaultAction": "Deny",
        },
    }


def _direct_response_listener(
    name: str, http_filters: Sequence[Mapping[str, Any]], clusters: Sequence[dict[str, Any]] = ()
) -> envoy_support.ListenerSpec:
    """The tests' listener, answering 200 itself instead of routing to an app.

    The auth filters still run before the router, which sends the direct
    response; so no upstream can be the bottleneck. The access log goes too:
    a line per request would be measured along with the filters.
    """
    listener = envoy_support.http_listener(name, http_filters)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["access_log"]
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
        }
    ]
    return envoy_support.ListenerSpec(name=name, listener=listener, clusters=tuple(clusters))


def bench_listeners(jwks_json: str, ports: Mapping[str, int]) -> list[envoy_support.ListenerSpec]:
    """Envoy's listeners, one per variant; `ports` maps each ext_authz variant to its server's
    port (gRPC for `lastguard` and `noop`, HTTP for the `_http` variants)."""
    authz = [authz_listener(variant, ports[variant]) for variant in SERVER_OF]
    return [
        _direct_response_listener("none", []),
        _direct_response_listener(
            "jwt_authn",
            [
                envoy_support.jwt_authn_filter(
                    issuer=ISSUER,
                    audiences=[AUDIENCE],
                    local_jwks=jwks_json,
                    claim_to_headers=[("x-user", "sub"), ("x-tenant", "org.tenant")],
                )
            ],
        ),
        *authz,
    ]


def authz_listener(variant: str, port: int) -> envoy_support.ListenerSpec:
    """The listener of one ext_authz variant (`lastguard`, `noop`, ...), its server on `port`."""
    protocol = PROTOCOL_OF[variant]
    return _direct_response_listener(
        variant,
        [envoy_support.ext_authz_filter(authz_cluster=variant, timeout="2s", protocol=protocol)],
        [envoy_support.static_cluster(variant, port, http2=protocol == "grpc")],
    )


# --- processes and /proc ------------------------------------------------------------


class NoopServer:
    """scripts/bench_noop.py as a process; learns its port from the line it prints."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port = 0
        self.http_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> NoopServer:
        command = [
            sys.executable, str(NOOP_SERVER), "--listen", f"{HOST}:0", "--http-listen", f"{HOST}:0"
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(  # noqa: S603
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BenchError(f"no-op server exited: {self.log_path.read_text()[-2000:]}")
            for line in self.log_path.read_text().splitlines():
                if line.startswith("{"):
                    listening = json.loads(line)
                    self.port = int(listening["grpc"].rpartition(":")[2])
                    self.http_port = int(listening["http"].rpartition(":")[2])
            if self.port and port_open(self.port):
                return self
            time.sleep(0.05)
        raise BenchError(f"no-op server not listening within {timeout}s")

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
    url = f"http://{HOST}:{metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        raise BenchError(f"lastguard's metrics stopped answering ({exc}): did it exit?") from exc
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
    raise BenchError(f"no process runs {config_path}")


# --- cases, variants and the plan ----------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    alg: str | None  # the token's algorithm (None: no token)
    hot: bool  # carries the one repeated token
    fresh_every: int  # every N-th request carries a never-seen token (0: never)
    status: int = 200  # what every response must be

    @property
    def fresh_share(self) -> float:
        return 1 / self.fresh_every if self.fresh_every else 0.0


CASES = {
    c.name: c
    for c in (
        Case("hit-rs256", "cache hit, RS256 (one token)", "RS256", hot=True, fresh_every=0),
        Case("hit-es256", "cache hit, ES256 (one token)", "ES256", hot=True, fresh_every=0),
        Case("miss-rs256", "cache miss, RS256 (fresh tokens)", "RS256", hot=False, fresh_every=1),
        Case("miss-es256", "cache miss, ES256 (fresh tokens)", "ES256", hot=False, fresh_every=1),
        Case("mix-rs256", "90% hit / 10% miss, RS256", "RS256", hot=True, fresh_every=10),
        Case("deny", "no token: 401", None, hot=False, fresh_every=0, status=401),
    )
}

#: Which cases each listener runs. `none` and `noop` check no token: one case
#: each is their floor. jwt_authn has no token cache (Envoy's default), so each
#: of its requests verifies the signature: its "hit" is also its miss.
VARIANT_CASES = {
    "none": ("hit-rs256",),
    "noop": ("hit-rs256",),
    "noop_http": ("hit-rs256",),
    "jwt_authn": ("hit-rs256", "hit-es256", "deny"),
    "lastguard": tuple(CASES),
    "lastguard_http": tuple(CASES),
}
#: The ext_authz variants: which process serves each (lastguard and the no-op server
#: each answer both protocols), over which protocol, and which floor it is held to.
SERVER_OF = {
    "noop": "noop",
    "noop_http": "noop",
    "lastguard": "lastguard",
    "lastguard_http": "lastguard",
}
PROTOCOL_OF = {"noop": "grpc", "noop_http": "http", "lastguard": "grpc", "lastguard_http": "http"}
FLOOR_OF = {"lastguard": "noop", "lastguard_http": "noop_http"}
#: The order of a round's runs: the variants compared with each other run next
#: to each other, and every saturated run has a paced twin. Runs that verify
#: fresh tokens come last: they grow Python's heap, and the garbage collector's
#: next full pass (100 ms or more with a full token cache) lands in whichever
#: lastguard run comes next. Each round after the first starts with an unmeasured
#: settling run that absorbs it, so cache hits and denials are measured without it.
CHECKED_FIRST = (
    ("none", "hit-rs256"),
    ("noop", "hit-rs256"),
    ("jwt_authn", "hit-rs256"),
    ("lastguard", "hit-rs256"),
    ("noop_http", "hit-rs256"),
    ("lastguard_http", "hit-rs256"),
    ("jwt_authn", "hit-es256"),
    ("lastguard", "hit-es256"),
    ("lastguard_http", "hit-es256"),
    ("jwt_authn", "deny"),
    ("lastguard", "deny"),
    ("lastguard_http", "deny"),
)
CHURNING_LAST = (
    ("lastguard", "miss-rs256"),
    ("lastguard_http", "miss-rs256"),
    ("lastguard", "miss-es256"),
    ("lastguard_http", "miss-es256"),
    ("lastguard", "mix-rs256"),
    ("lastguard_http", "mix-rs256"),
)
RUN_ORDER = CHECKED_FIRST + CHURNING_LAST
MODES = ("saturate", "paced")


@dataclass(frozen=True)
class RunSpec:
    round: int
    variant: str
    case: str
    mode: str
    slice_start: int = 0  # in the pool of the case's algorithm
    slice_count: int = 0


def plan(settings: Settings) -> tuple[list[RunSpec], dict[str, int]]:
    """Every run in order, each with its own slice of fresh tokens; tokens needed per alg."""
    assert {(v, c) for v, cs in VARIANT_CASES.items() for c in cs} == set(RUN_ORDER)
    round_order = [
        (v, c, m) for group in (CHECKED_FIRST, CHURNING_LAST) for m in MODES for v, c in group
    ]
    used = dict.fromkeys(ALGORITHMS, 0)
    runs = []
    for rnd in range(settings.rounds):
        for variant, case_name, mode in round_order:
            case = CASES[case_name]
            start = count = 0
            if case.fresh_every and case.alg is not None:
                rate = settings.miss_rate_ceiling if mode == "saturate" else settings.paced_rate * 2
                count = math.ceil(settings.duration * rate * case.fresh_share) + 1_000
                start = used[case.alg]
                used[case.alg] += count
            runs.append(RunSpec(rnd, variant, case_name, mode, start, count))
    return runs, used


# --- one wrk run ------------------------------------------------------------------------


@dataclass
class RunResult:
    spec: RunSpec
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    reused_tokens: int
    #: CPU seconds spent during the run, per process: lastguard, noop, envoy.
    cpu: dict[str, float] = field(default_factory=dict)
    #: Cores busy with processes that are not part of the bench, on average over the run.
    other_cores: float = 0.0
    #: How many times the run was made (more than 1: earlier attempts shared the machine).
    attempts: int = 1
    #: lastguard's token cache lookups during the run (lastguard runs only).
    cache_hits: int = 0
    cache_misses: int = 0

    @property
    def cache_hit_share(self) -> float:
        lookups = self.cache_hits + self.cache_misses
        return self.cache_hits / lookups if lookups else math.nan

    def cpu_per_1k(self, process: str) -> float:
        return self.cpu[process] / self.requests * 1000 if self.requests else math.nan

    @property
    def problems(self) -> list[str]:
        case = CASES[self.spec.case]
        out = []
        wrong = self.non_2xx if case.status == 200 else self.requests - self.non_2xx
        if wrong:
            out.append(f"{wrong} responses were not {case.status}")
        if self.socket_errors:
            out.append(f"{self.socket_errors} socket errors or timeouts")
        if self.reused_tokens:
            out.append(f"{self.reused_tokens} requests re-sent a token (pool slice too small)")
        if self.requests == 0:
            out.append("no request completed")
        expected_hits = 1 - case.fresh_share
        lookups_wrong = abs(self.cache_hit_share - expected_hits) > 0.02
        if case.alg and SERVER_OF.get(self.spec.variant) == "lastguard" and lookups_wrong:
            out.append(f"token cache hits {self.cache_hit_share:.1%}, expected {expected_hits:.0%}")
        return out


class Bench:
    """The running servers and what is needed to load them."""

    def __init__(
        self,
        settings: Settings,
        wrk: str,
        envoy: envoy_support.EnvoyProcess,
        pids: dict[str, int],
        hot_tokens: dict[str, str],
        pools: dict[str, Path],
        metrics_port: int,
    ) -> None:
        self.settings = settings
        self.metrics_port = metrics_port
        self.wrk = wrk
        self.envoy = envoy
        self.pids = pids
        self.hot_tokens = hot_tokens
        self.pools = pools
        self.wrk_log = settings.workdir / "wrk.log"
        #: Seconds spent waiting for quiet and on discarded attempts, against the budget.
        self.disturbance_seconds = 0.0
        self.disturbance_budget = 0.0  # set by the caller once the plan is known

    def command(self, spec: RunSpec, duration: int) -> list[str]:
        s = self.settings
        case = CASES[spec.case]
        paced = spec.mode == "paced"
        threads = 1 if paced else s.threads
        connections = s.paced_connections if paced else s.connections
        hot = self.hot_tokens[case.alg] if case.hot and case.alg else "-"
        pool = str(self.pools[case.alg]) if spec.slice_count and case.alg else "-"
        script = WRK_SCRIPTS / ("paced.lua" if paced else "requests.lua")
        argv = [
            self.wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
            "--timeout", "5s", "-s", str(script), self.envoy.url(spec.variant, "/"),
            REQUEST_PATH, hot, pool, str(spec.slice_start), str(spec.slice_count),
            str(case.fresh_every), str(threads),
        ]  # fmt: skip
        if paced:
            argv.append(str(s.paced_mean_delay_ms))
        return argv

    def run(self, spec: RunSpec, duration: int | None = None) -> RunResult:
        duration = duration or self.settings.duration
        argv = self.command(spec, duration)
        lookups_before = token_cache_lookups(self.metrics_port)
        before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        busy_before, own_before, wall_before = (
            machine_busy_seconds(),
            own_cpu_seconds(),
            time.monotonic(),
        )
        completed = subprocess.run(  # noqa: S603
            argv, capture_output=True, text=True, timeout=duration + 60, check=False
        )
        # Checks still queued when wrk stopped finish now, and count for this run.
        time.sleep(SETTLE_SECONDS)
        busy = machine_busy_seconds() - busy_before
        own = own_cpu_seconds() - own_before
        wall = time.monotonic() - wall_before
        after = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        lookups_after = token_cache_lookups(self.metrics_port)
        if SERVER_OF.get(spec.variant) != "lastguard":
            lookups_after = lookups_before
        cpu = {name: after[name] - before[name] for name in self.pids}
        with open(self.wrk_log, "a") as log:
            log.write(f"### {spec}\n$ {' '.join(a[:60] for a in argv)}\n")
            log.write(completed.stdout + completed.stderr + "\n")
        line = next(
            (ln for ln in completed.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None
        )
        if completed.returncode != 0 or line is None:
            raise BenchError(
                f"wrk failed ({completed.returncode}) for {spec}:\n{completed.stderr[-2000:]}"
            )
        data = json.loads(line.removeprefix("BENCH_RESULT "))
        latency, errors = data["latency_us"], data["errors"]
        seconds = data["duration_us"] / 1e6
        return RunResult(
            spec=spec,
            requests=data["requests"],
            seconds=seconds,
            rps=data["requests"] / seconds if seconds else 0.0,
            p50_ms=latency["p50"] / 1000,
            p90_ms=latency["p90"] / 1000,
            p99_ms=latency["p99"] / 1000,
            p999_ms=latency["p999"] / 1000,
            max_ms=latency["max"] / 1000,
            non_2xx=errors["status"],
            socket_errors=sum(errors[k] for k in ("connect", "read", "write", "timeout")),
            reused_tokens=data["reused"],
            cpu=cpu,
            other_cores=max(0.0, busy - own - sum(cpu.values())) / wall,
            cache_hits=round(lookups_after["hit"] - lookups_before["hit"]),
            cache_misses=round(lookups_after["miss"] - lookups_before["miss"]),
        )

    def other_load(self, seconds: float = 0.5) -> float:
        """Cores other processes keep busy right now, over `seconds`."""
        ours = sum(cpu_seconds(pid) for pid in self.pids.values())
        busy, own, wall = machine_busy_seconds(), own_cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        ours = sum(cpu_seconds(pid) for pid in self.pids.values()) - ours
        busy, own = machine_busy_seconds() - busy, own_cpu_seconds() - own
        return max(0.0, busy - own - ours) / (time.monotonic() - wall)

    @property
    def patient(self) -> bool:
        return self.disturbance_seconds < self.disturbance_budget

    def wait_for_quiet(self) -> None:
        """Waits (bounded) until other processes leave the cores alone."""
        started = time.monotonic()
        while self.patient and time.monotonic() - started < self.settings.quiet_wait:
            if self.other_load() <= OTHER_LOAD_NOTICE:
                break
        self.disturbance_seconds += time.monotonic() - started

    def measure(self, spec: RunSpec, spare: SpareTokens) -> RunResult:
        """`run`, repeated while other processes disturb it (bounded); the quietest counts."""
        attempts: list[RunResult] = []
        for attempt in range(1 + self.settings.retries):
            if attempt:
                again = spare.renew(spec)
                if again is None or not self.patient:
                    break  # out of spare cache-miss tokens, or of time for this
                spec = again
                self.disturbance_seconds += attempts[-1].seconds
            self.wait_for_quiet()
            attempts.append(self.run(spec))
            if attempts[-1].other_cores <= OTHER_LOAD_NOTICE:
                break
        best = min(attempts, key=lambda r: r.other_cores)
        best.attempts = len(attempts)
        return best


class SpareTokens:
    """Fresh-token slices beyond the planned ones, for runs made again."""

    def __init__(self, first: Mapping[str, int], end: Mapping[str, int]) -> None:
        self.next = dict(first)
        self.end = dict(end)

    def renew(self, spec: RunSpec) -> RunSpec | None:
        """`spec` with an unused slice of the same size, or None when none is left."""
        alg = CASES[spec.case].alg
        if not spec.slice_count or alg is None:
            return spec
        start = self.next[alg]
        if start + spec.slice_count > self.end[alg]:
            return None
        self.next[alg] += spec.slice_count
        return dataclasses.replace(spec, slice_start=start)


# --- sanity checks ------------------------------------------------------------------------


def sanity_check(
    envoy: envoy_support.EnvoyProcess, hot_tokens: dict[str, str], pool_tokens: dict[str, str]
) -> list[str]:
    """Each listener answers as its variant must, so no run measures the wrong thing."""

    def bearer(token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}

    checks: list[tuple[str, str, dict[str, str], int]] = [
        ("none", REQUEST_PATH, bearer(hot_tokens["RS256"]), 200),
        ("noop", REQUEST_PATH, bearer(hot_tokens["RS256"]), 200),
        ("noop", REQUEST_PATH, {}, 200),
        ("noop_http", REQUEST_PATH, bearer(hot_tokens["RS256"]), 200),
        ("noop_http", REQUEST_PATH, {}, 200),
    ]
    for variant in ("jwt_authn", *FLOOR_OF):
        for alg in ALGORITHMS:
            checks.append((variant, REQUEST_PATH, bearer(hot_tokens[alg]), 200))
            checks.append((variant, REQUEST_PATH, bearer(pool_tokens[alg]), 200))
        checks.append((variant, REQUEST_PATH, {}, 401))
        checks.append((variant, REQUEST_PATH, bearer(hot_tokens["RS256"] + "x"), 401))
    for variant in FLOOR_OF:
        checks += [
            (variant, "/admin/users", bearer(hot_tokens["RS256"]), 403),
            (variant, "/api/payments/1", bearer(hot_tokens["RS256"]), 403),
            (variant, "/healthz", {}, 200),
        ]
    problems = []
    for listener, path, headers, expected in checks:
        response = envoy.request("GET", path, headers, listener=listener)
        if response.status != expected:
            what = "a token" if headers else "no token"
            problems.append(
                f"{listener}: GET {path} with {what} answered {response.status}, not {expected}: "
                f"{response.text[:200]}"
            )
    return problems


# --- summary ---------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _share(runs: Sequence[RunResult]) -> float:
    hits = sum(r.cache_hits for r in runs)
    lookups = hits + sum(r.cache_misses for r in runs)
    return hits / lookups if lookups else math.nan


@dataclass
class Row:
    variant: str
    case: str
    rps: float
    p50_ms: float
    p99_ms: float
    paced_rps: float
    paced_p99_ms: float
    server_cpu_s_per_1k: float  # the ext_authz server's (lastguard or noop); NaN otherwise
    envoy_cpu_s_per_1k: float
    paced_server_cpu_s_per_1k: float
    cache_hit_share: float  # lastguard's token cache, saturated and paced runs together
    runs: int
    #: Runs left out of the medians: other processes disturbed them, and quiet ones exist.
    left_out: int
    problems: list[str]


def _quiet(runs: Sequence[RunResult]) -> list[RunResult]:
    """The runs no other process disturbed, if there are any; else all of them."""
    return [r for r in runs if r.other_cores <= OTHER_LOAD_NOTICE] or list(runs)


def summarize(results: Sequence[RunResult]) -> list[Row]:
    """Medians per variant and case, of the quiet runs where there are some."""
    rows = []
    for variant, case in RUN_ORDER:
        mine = [r for r in results if (r.spec.variant, r.spec.case) == (variant, case)]
        if not mine:
            continue
        sat = _quiet([r for r in mine if r.spec.mode == "saturate"])
        paced = _quiet([r for r in mine if r.spec.mode == "paced"])
        server = SERVER_OF.get(variant)

        def cpu(runs: Sequence[RunResult], process: str | None) -> float:
            return _median([r.cpu_per_1k(process) for r in runs]) if process else math.nan

        rows.append(
            Row(
                variant=variant,
                case=case,
                rps=_median([r.rps for r in sat]),
                p50_ms=_median([r.p50_ms for r in sat]),
                p99_ms=_median([r.p99_ms for r in sat]),
                paced_rps=_median([r.rps for r in paced]),
                paced_p99_ms=_median([r.p99_ms for r in paced]),
                server_cpu_s_per_1k=cpu(sat, server),
                envoy_cpu_s_per_1k=cpu(sat, "envoy"),
                paced_server_cpu_s_per_1k=cpu(paced, server),
                cache_hit_share=_share(mine),
                runs=len(mine),
                left_out=len(mine) - len(sat) - len(paced),
                problems=[
                    f"{r.spec.mode} round {r.spec.round + 1}: {problem}"
                    for r in mine
                    for problem in r.problems
                ],
            )
        )
    return rows


def _fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def print_table(rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = right or [False] * len(widths)
    for n, row in enumerate(rows):
        cells = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)
        ]
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def results_table(rows: Sequence[Row]) -> None:
    header = (
        "variant", "case", "req/s", "p50 ms", "p99 ms", "p99 ms @1k/s", "(rate)",
        "authz CPU s/1k", "@1k/s", "Envoy CPU s/1k", "cache hits", "valid",
    )  # fmt: skip
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.variant,
                row.case,
                _fmt(row.rps, ",.0f"),
                _fmt(row.p50_ms, ".2f"),
                _fmt(row.p99_ms, ".2f"),
                _fmt(row.paced_p99_ms, ".2f"),
                _fmt(row.paced_rps, ",.0f"),
                _fmt(row.server_cpu_s_per_1k, ".3f"),
                _fmt(row.paced_server_cpu_s_per_1k, ".3f"),
                _fmt(row.envoy_cpu_s_per_1k, ".3f"),
                _fmt(100 * row.cache_hit_share, ".0f") + ("%" if row.cache_hit_share >= 0 else ""),
                "yes" if not row.problems else "NO",
            )
        )
    print_table(lines, right=[False, False, *[True] * 9, False])


def _row(rows: Sequence[Row], variant: str, case: str) -> Row | None:
    return next((r for r in rows if (r.variant, r.case) == (variant, case)), None)


def _jwt_authn_peer(case: str) -> str:
    """jwt_authn's row to compare a lastguard case with: same algorithm, or the denial."""
    return {"deny": "deny", "hit-es256": "hit-es256", "miss-es256": "hit-es256"}.get(
        case, "hit-rs256"
    )


def ratios(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Each lastguard row against its protocol's no-op floor and against jwt_authn."""
    out = []
    for row in rows:
        if row.variant not in FLOOR_OF:
            continue
        noop = _row(rows, FLOOR_OF[row.variant], "hit-rs256")
        peer = _row(rows, "jwt_authn", _jwt_authn_peer(row.case))
        out.append(
            {
                "variant": row.variant,
                "case": row.case,
                "rps_vs_noop": row.rps / noop.rps if noop else math.nan,
                "cpu_vs_noop": row.server_cpu_s_per_1k / noop.server_cpu_s_per_1k
                if noop
                else math.nan,
                "jwt_authn_case": peer.case if peer else None,
                "rps_vs_jwt_authn": row.rps / peer.rps if peer else math.nan,
                "paced_p99_minus_jwt_authn_ms": row.paced_p99_ms - peer.paced_p99_ms
                if peer
                else math.nan,
                "paced_p99_minus_noop_ms": row.paced_p99_ms - noop.paced_p99_ms
                if noop
                else math.nan,
            }
        )
    return out


def ratios_table(items: Sequence[dict[str, Any]]) -> None:
    lines = [
        (
            "variant", "case", "req/s / no-op", "CPU / no-op", "p99 @1k/s - no-op",
            "req/s / jwt_authn", "p99 @1k/s - jwt_authn", "(jwt_authn case)",
        )
    ]  # fmt: skip
    for item in items:
        lines.append(
            (
                item.get("variant", "lastguard"),
                item["case"],
                _fmt(item["rps_vs_noop"], ".2f") + "x",
                _fmt(item["cpu_vs_noop"], ".2f") + "x",
                _fmt(item["paced_p99_minus_noop_ms"], "+.2f") + " ms",
                _fmt(item["rps_vs_jwt_authn"], ".3f") + "x",
                _fmt(item["paced_p99_minus_jwt_authn_ms"], "+.2f") + " ms",
                item["jwt_authn_case"] or "-",
            )
        )
    print_table(lines, right=[False, False, True, True, True, True, True, False])


def targets(
    rows: Sequence[Row], items: Sequence[dict[str, Any]], idle_rss: float
) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and pass or FAIL."""
    out: list[dict[str, Any]] = []

    def target(name: str, value: float, limit: float, unit: str, higher_is_better: bool) -> None:
        passed = value >= limit if higher_is_better else value <= limit
        out.append(
            {
                "target": name,
                "value": value,
                "limit": limit,
                "unit": unit,
                "pass": bool(passed and not math.isnan(value)),
            }
        )

    for item in items:
        name = f"{item.get('variant', 'lastguard')} {item['case']}"
        if item["case"] in ("hit-rs256", "hit-es256"):
            target(f"{name}: CPU per request <= 1.2x no-op", item["cpu_vs_noop"], 1.2, "x", False)
            target(f"{name}: throughput >= 0.9x no-op", item["rps_vs_noop"], 0.9, "x", True)
    for item in items:
        if item["case"] != "deny":
            target(
                f"{item.get('variant', 'lastguard')} {item['case']}: p99 at 1k req/s within "
                "2 ms of jwt_authn",
                item["paced_p99_minus_jwt_authn_ms"], 2.0, "ms", False,
            )  # fmt: skip
    for variant in FLOOR_OF:
        hit, miss = _row(rows, variant, "hit-rs256"), _row(rows, variant, "miss-rs256")
        if hit and miss:
            target(
                f"{variant} miss-rs256: throughput >= 0.45x hit-rs256",
                miss.rps / hit.rps, 0.45, "x", True,
            )  # fmt: skip
    target("lastguard idle RSS < 60 MB", idle_rss, 60.0, "MB", False)
    return out


def targets_table(items: Sequence[dict[str, Any]]) -> None:
    lines = [("target", "measured", "result")]
    for item in items:
        unit = item["unit"]
        measured = _fmt(item["value"], ".2f") + ("x" if unit == "x" else f" {unit}")
        lines.append((item["target"], measured, "pass" if item["pass"] else "FAIL"))
    print_table(lines, right=[False, True, False])


# --- environment -------------------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603
    except OSError:
        return "?"
    text = (result.stdout + result.stderr).strip()
    return text.splitlines()[0].strip() if text else "?"


def environment(wrk: str) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    envoy_version = _first_line([str(envoy_support.envoy_binary()), "--version"])
    git = shutil.which("git") or "git"
    commit = _first_line([git, "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _first_line([git, "-C", str(ROOT), "status", "--porcelain", "--", "sidecar", "proto"])
    return {
        "lastguard": commit + (" + uncommitted changes" if dirty not in ("", "?") else ""),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "PyJWT": version("PyJWT"),
        "cryptography": version("cryptography"),
        "envoy": envoy_version.partition("version:")[2].strip() or envoy_version,
        "wrk": _first_line([wrk, "-v"]),
    }


# --- main ----------------------------------------------------------------------------------------


def no_nan(value: Any) -> Any:
    """JSON has no NaN: a value that could not be measured is null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [no_nan(v) for v in value]
    return value


def _stop_on_sigterm(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 2 s runs")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections at saturation")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads at saturation")
    parser.add_argument(
        "--miss-rate-ceiling",
        type=int,
        default=Settings.miss_rate_ceiling,
        help="fresh tokens set aside per second of a saturated cache-miss run",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=Settings.retries,
        help="runs made again when other processes disturbed them (default 1)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=ROOT / ".bench", help="tokens, keys, logs, results"
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="RESULTS_JSON",
        help="print the tables of an earlier run from its results.json, and exit",
    )
    args = parser.parse_args(argv)
    if args.report is not None:
        sys.exit(reprint(args.report))
    rounds, duration = (1, 2) if args.quick else (args.rounds, args.duration)
    if rounds < 1 or duration < 1 or args.threads < 1 or args.connections < args.threads:
        parser.error("rounds and duration must be >= 1, connections >= threads >= 1")
    return Settings(
        rounds=rounds,
        duration=duration,
        connections=args.connections,
        threads=args.threads,
        miss_rate_ceiling=args.miss_rate_ceiling,
        retries=max(0, args.retries),
        workdir=args.workdir.resolve(),
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    workdir = settings.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    wrk = ensure_wrk()
    env = environment(wrk)
    say(f"lastguard {env['lastguard']}; Python {env['python']}, grpcio {env['grpcio']}")
    say(f"Envoy {env['envoy']}; {env['wrk']}")

    runs, needed = plan(settings)
    # Half as many again for runs made again; then one for the sanity check.
    end = {alg: needed[alg] + (needed[alg] // 2 if settings.retries else 0) for alg in ALGORITHMS}
    spare = SpareTokens(needed, end)
    issuer = BenchIssuer(workdir / "keys")
    pools = {alg: TokenPool(workdir / "tokens", issuer, alg) for alg in ALGORITHMS}
    for alg in ALGORITHMS:
        pools[alg].ensure(end[alg] + 1, say)
    hot_tokens = {alg: issuer.mint(f"hot-{alg.lower()}", alg) for alg in ALGORITHMS}
    pool_tokens = {alg: pools[alg].line(end[alg]) for alg in ALGORITHMS}

    partner = devissuer.DevIssuer("https://partners.bench.lastguard.dev")
    jobs = devissuer.DevIssuer("https://jobs.bench.lastguard.dev")
    policy_file = workdir / "policy.yaml"
    policy_file.write_text(
        yaml.safe_dump(bench_policy(issuer.jwks_json(), partner, jobs), sort_keys=False)
    )

    results: list[RunResult] = []
    with ExitStack() as stack:
        sidecar = SidecarProcess(
            policy_file,
            workdir=logs / "lastguard",
            metrics=True,  # its token cache counters tell each run's hits and misses
            reload_interval=1.0,
            ready_timeout=30.0,
            extra_args=["--http-listen", f"{HOST}:0"],
        )
        stack.callback(sidecar.stop)
        sidecar.start()
        time.sleep(1.0)  # let start-up settle before reading the idle footprint
        idle_rss = rss_mb(sidecar.pid)
        say(
            f"lastguard  127.0.0.1:{sidecar.port} gRPC, :{sidecar.http_port} HTTP "
            f"(pid {sidecar.pid}), idle RSS {idle_rss:.1f} MB"
        )

        noop = NoopServer(logs / "noop.log")
        stack.callback(noop.stop)
        noop.start()
        noop_idle_rss = rss_mb(noop.pid)
        say(
            f"no-op      127.0.0.1:{noop.port} gRPC, :{noop.http_port} HTTP "
            f"(pid {noop.pid}), idle RSS {noop_idle_rss:.1f} MB"
        )

        envoy = envoy_support.EnvoyProcess(
            bench_listeners(
                issuer.jwks_json(),
                {
                    "lastguard": sidecar.port,
                    "lastguard_http": sidecar.http_port or 0,
                    "noop": noop.port,
                    "noop_http": noop.http_port,
                },
            ),
            workdir=logs / "envoy",
            startup_timeout=30.0,
        )
        stack.callback(envoy.stop)
        envoy.start()
        envoy_pid = pid_running(envoy.config_path)
        say(
            "envoy      "
            + ", ".join(f"{name} :{port}" for name, port in sorted(envoy.ports.items()))
            + f" (pid {envoy_pid}, --concurrency 1)"
        )

        problems = sanity_check(envoy, hot_tokens, pool_tokens)
        if problems:
            for problem in problems:
                print(f"sanity check failed: {problem}", file=sys.stderr)
            return 1
        say("sanity checks passed: 200 with a valid token, 401 without, 403 by rule")

        bench = Bench(
            settings,
            wrk,
            envoy,
            {"lastguard": sidecar.pid, "noop": noop.pid, "envoy": envoy_pid},
            hot_tokens,
            {alg: pools[alg].path for alg in ALGORITHMS},
            metrics_port=sidecar.metrics_port or 0,
        )
        bench.wrk_log.unlink(missing_ok=True)
        runs_by_round = [[r for r in runs if r.round == n] for n in range(settings.rounds)]
        bench.disturbance_budget = settings.disturbance_budget * len(runs) * settings.duration
        for variant in VARIANT_CASES:
            bench.run(RunSpec(-1, variant, "hit-rs256", "saturate"), settings.warmup)
        say(
            f"warmed up; {len(runs)} runs of {settings.duration}s: {settings.rounds} rounds x "
            f"{len(runs) // settings.rounds} (saturation: {settings.threads} threads, "
            f"{settings.connections} connections; paced: {settings.paced_connections} "
            f"connections, random delays averaging {settings.paced_mean_delay_ms} ms)"
        )
        for spec in runs:
            if spec.round > 0 and spec is runs_by_round[spec.round][0]:
                bench.run(RunSpec(spec.round, "lastguard", "hit-rs256", "saturate"), 2)
            result = bench.measure(spec, spare)
            results.append(result)
            server = SERVER_OF.get(spec.variant)
            cpu = f", {server} CPU {result.cpu_per_1k(server):.3f} s/1k" if server else ""
            flag = "  !! " + "; ".join(result.problems) if result.problems else ""
            if result.attempts > 1:
                flag += f"  (attempt {result.attempts}: other processes were busy)"
            if result.other_cores > OTHER_LOAD_NOTICE:
                flag += f"  (other processes: {result.other_cores:.2f} cores)"
            say(
                f"round {spec.round + 1}/{settings.rounds} {spec.mode:8} {spec.variant:14} "
                f"{spec.case:10} {result.rps:9,.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
                f"p99 {result.p99_ms:6.2f} ms{cpu}{flag}"
            )
        final_rss = rss_mb(sidecar.pid)
        noop_final_rss = rss_mb(noop.pid)

    rss = {
        "lastguard_idle": idle_rss,
        "lastguard_after": final_rss,
        "noop_idle": noop_idle_rss,
        "noop_after": noop_final_rss,
    }
    valid = print_report(settings, results, rss)
    report: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "environment": env,
        "envoy_concurrency": 1,
        "request": {"method": "GET", "path": REQUEST_PATH},
        "rss_mb": rss,
        "runs": [asdict(r) for r in results],
    }
    rows = summarize(results)
    items = ratios(rows)
    report |= {
        "summary": [asdict(row) for row in rows],
        "ratios": items,
        "targets": targets(rows, items, idle_rss),
        "elapsed_seconds": time.monotonic() - started,
    }
    results_path = workdir / "results.json"
    results_path.write_text(json.dumps(no_nan(report), indent=2, default=str) + "\n")
    print()
    shown = _shown(results_path)
    say(f"results in {shown} (print its tables again: scripts/bench.py --report {shown})")
    return 0 if valid else 1


def print_report(
    settings: Settings, results: Sequence[RunResult], rss: Mapping[str, float]
) -> bool:
    """Prints the tables, the memory line, the targets and notes; True if every run was valid."""
    rows = summarize(results)
    items = ratios(rows)
    print()
    print(
        f"medians of {settings.rounds} interleaved rounds, {settings.duration}s per run; "
        f"Envoy --concurrency 1, routes answer 200 themselves (direct_response)"
    )
    results_table(rows)
    print()
    print(
        "lastguard against its protocol's floor (no-op ext_authz server: gRPC for lastguard, "
        "HTTP for lastguard_http) and Envoy's native jwt_authn"
    )
    ratios_table(items)
    fresh_sent = sum(
        round(r.requests * CASES[r.spec.case].fresh_share)
        for r in results
        if r.spec.variant in FLOOR_OF
    )
    print()
    print(
        f"lastguard RSS: {rss['lastguard_idle']:.1f} MB idle, {rss['lastguard_after']:.1f} MB "
        f"after the runs ({fresh_sent:,} distinct tokens verified, token cache at its default "
        f"bounds); no-op server: {rss['noop_idle']:.1f} MB idle, {rss['noop_after']:.1f} MB after"
    )
    print()
    targets_table(targets(rows, items, rss["lastguard_idle"]))
    repeated = sum(r.attempts > 1 for r in results)
    shared = [r for r in results if r.other_cores > OTHER_LOAD_NOTICE]
    left_out = sum(row.left_out for row in rows)
    if repeated or shared:
        print(
            f"\nnote: other processes shared the cores: {repeated} of {len(results)} runs were "
            f"made again; {len(shared)} of the runs kept were still disturbed (more than "
            f"{OTHER_LOAD_NOTICE} cores busy elsewhere), {left_out} of them left out of the "
            "medians for a quiet run of the same row; other_cores in results.json"
        )
    invalid = [(row, p) for row in rows for p in row.problems]
    for row, problem in invalid:
        print(f"INVALID {row.variant} {row.case}: {problem}", file=sys.stderr)
    return not invalid


def reprint(path: Path) -> int:
    """`--report`: the tables of an earlier run, from its results.json."""
    data = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(Settings)}
    settings = Settings(**{k: v for k, v in data["settings"].items() if k in known})
    results = []
    for item in data["runs"]:
        fields: dict[str, Any] = {
            k: math.nan if v is None else v for k, v in item.items() if k != "spec"
        }
        results.append(RunResult(spec=RunSpec(**item["spec"]), **fields))
    env = data["environment"]
    print(f"{path}: lastguard {env['lastguard']}, Envoy {env['envoy']}, {env['wrk']}")
    print(f"{env['cpu']} x {env['cpus']}, Python {env['python']}, grpcio {env['grpcio']}")
    return 0 if print_report(settings, results, data["rss_mb"]) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(2)
    except (SidecarError, envoy_support.EnvoyError) as exc:
        print(f"bench could not start: {exc}", file=sys.stderr)
        sys.exit(1)
