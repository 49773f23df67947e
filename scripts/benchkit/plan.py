"""What a bench runs: the cases, the variants, and every run in order with its tokens.

A variant is one of Envoy's listeners; `VARIANT_CASES` says which cases it
runs, and the `*_OF` tables which server answers each ext_authz variant, over
which protocol, and which floor it is held to. `plan` is pure: the same
settings give the same runs, each with its own slice of the token pools.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from benchkit import config, tokens


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


def plan(settings: config.Settings) -> tuple[list[RunSpec], dict[str, int]]:
    """Every run in order, each with its own slice of fresh tokens; tokens needed per alg."""
    assert {(v, c) for v, cs in VARIANT_CASES.items() for c in cs} == set(RUN_ORDER)
    round_order = [
        (v, c, m) for group in (CHECKED_FIRST, CHURNING_LAST) for m in MODES for v, c in group
    ]
    used = dict.fromkeys(tokens.ALGORITHMS, 0)
    runs = []
    for rnd in range(settings.rounds):
        for variant, case_name, mode in round_order:
            case = CASES[case_name]
            start = count = 0
            if case.fresh_every and case.alg is not None:
                if mode == "saturate":
                    fresh_per_second = min(
                        settings.hit_rate_ceiling * case.fresh_share, settings.miss_rate_ceiling
                    )
                else:
                    fresh_per_second = settings.paced_rate * 2 * case.fresh_share
                count = math.ceil(settings.duration * fresh_per_second) + 1_000
                start = used[case.alg]
                used[case.alg] += count
            runs.append(RunSpec(rnd, variant, case_name, mode, start, count))
    return runs, used
