"""Prometheus metrics of the sidecar, defined once.

Labels are bounded: results and reasons come from fixed sets (the `reason` of
each error type in `lastguard.sidecar.errors`), issuers from policies. Never a
token, a subject or a path.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter(
    "lastguard_decisions_total",
    "Check decisions by result (allow/deny) and reason.",
    ["result", "reason"],
)
CHECK_SECONDS = Histogram(
    "lastguard_check_duration_seconds",
    "Time spent deciding one Check request.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0),
)
KEY_FETCHES = Counter(
    "lastguard_key_fetches_total",
    "JWKS / discovery fetches by issuer and result (ok, error).",
    ["issuer", "result"],
)
TOKEN_CACHE = Counter(
    "lastguard_token_cache_total",
    "Verified-token cache lookups by result (hit, miss).",
    ["result"],
)
POLICY_RELOADS = Counter(
    "lastguard_policy_reloads_total",
    "Policy (re)loads by result (ok, error).",
    ["result"],
)
# Gauges say how to combine worker processes (`--workers`, prometheus multiprocess mode);
# with one process the mode changes nothing.
POLICIES_LOADED = Gauge(
    "lastguard_policies_loaded",
    "Number of JWTPolicies currently loaded.",
    multiprocess_mode="livemax",
)
POLICY_SNAPSHOTS = Counter(
    "lastguard_policy_snapshots_total",
    "Snapshots received from the policy server, by result (applied, rejected, unchanged); "
    "their sum is every snapshot received.",
    ["result"],
)
POLICY_SERVER_CONNECTED = Gauge(
    "lastguard_policy_server_connected",
    "1 while the stream to the policy server is open and has delivered a snapshot, else 0 "
    "(with several workers: 0 if any worker is disconnected).",
    multiprocess_mode="livemin",
)
