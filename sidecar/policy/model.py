"""The JWTPolicy model: immutable, validated data. No I/O here.

This is the one definition of what a JWTPolicy field means. The policy file
loader, the operator and the CRD schema all go through
`lastguard.sidecar.policy.parse`, which is the only producer of these objects.
Names follow Istio's RequestAuthentication where the concept is the same.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

API_VERSION = "lastguard.dev/v1alpha1"
KIND = "JWTPolicy"

#: Asymmetric JWS algorithms lastguard verifies. Symmetric (HS*) and "none" never are.
SUPPORTED_ALGORITHMS: tuple[str, ...] = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)

DEFAULT_CLOCK_SKEW_SECONDS = 60
DEFAULT_JWKS_CACHE_SECONDS = 600
DEFAULT_JWKS_TIMEOUT_SECONDS = 5


class Action(enum.Enum):
    """What a rule (or the policy's default) does with a request."""

    AUTHENTICATE = "Authenticate"  # a valid token is required
    OPTIONAL = "Optional"  # no token is fine; a present token must be valid
    ALLOW = "Allow"  # no check at all (health and public paths)
    DENY = "Deny"  # always 403

    @property
    def reads_tokens(self) -> bool:
        return self in (Action.AUTHENTICATE, Action.OPTIONAL)


class KeySourceKind(enum.Enum):
    JWKS_URI = "jwksUri"
    INLINE_JWKS = "jwks"
    PUBLIC_KEYS = "publicKeys"
    DISCOVERY = "discovery"


@dataclass(frozen=True, slots=True)
class HeaderLocation:
    """A token carried in a request header, after an optional prefix (e.g. "Bearer ")."""

    name: str  # lower-case
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    header: str  # lower-case
    claim: str  # dotted path for nested claims


@dataclass(frozen=True, slots=True)
class Issuer:
    """One trusted token issuer and how to find, check and forward its tokens."""

    issuer: str
    jwks_uri: str | None = None
    jwks: str | None = None
    public_keys: tuple[tuple[str, str], ...] = ()  # (kid, PEM key or certificate)
    audiences: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = SUPPORTED_ALGORITHMS
    from_headers: tuple[HeaderLocation, ...] = (HeaderLocation("authorization", "Bearer "),)
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    forward_original_token: bool = False
    output_payload_to_header: str | None = None
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    clock_skew_seconds: int = DEFAULT_CLOCK_SKEW_SECONDS
    max_lifetime_seconds: int | None = None
    jwks_cache_duration_seconds: int = DEFAULT_JWKS_CACHE_SECONDS
    jwks_timeout_seconds: int = DEFAULT_JWKS_TIMEOUT_SECONDS

    @property
    def key_source(self) -> KeySourceKind:
        if self.jwks_uri is not None:
            return KeySourceKind.JWKS_URI
        if self.jwks is not None:
            return KeySourceKind.INLINE_JWKS
        if self.public_keys:
            return KeySourceKind.PUBLIC_KEYS
        return KeySourceKind.DISCOVERY

    @property
    def output_headers(self) -> tuple[str, ...]:
        """Every header this issuer may set on an allowed request."""
        names = [c.header for c in self.output_claim_to_headers]
        if self.output_payload_to_header:
            names.append(self.output_payload_to_header)
        return tuple(names)


@dataclass(frozen=True, slots=True)
class RequiredClaim:
    """The claim (dotted path) must equal, or as a list contain, one of `values`."""

    claim: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Rule:
    """Paths and methods to match (empty: all), and what to do with them."""

    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    action: Action = Action.AUTHENTICATE
    required_scopes: tuple[str, ...] = ()
    required_claims: tuple[RequiredClaim, ...] = ()


@dataclass(frozen=True, slots=True)
class JWTPolicy:
    namespace: str
    name: str
    #: None or empty: every workload in the namespace.
    match_labels: tuple[tuple[str, str], ...] | None = None
    issuers: tuple[Issuer, ...] = ()
    rules: tuple[Rule, ...] = ()
    default_action: Action = Action.AUTHENTICATE
    creation_timestamp: str | None = None
    generation: int | None = None
    uid: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def namespace_wide(self) -> bool:
        return not self.match_labels
