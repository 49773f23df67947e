"""lastguard's exception tree, in one place.

Every way a request can fail has its own type. Each carries what the single
mapping boundary (`lastguard.sidecar.decision`) needs to build a denial: the
HTTP status, the RFC 6750 error code, a short description that is safe to send
to a client, and a stable `reason` used as a metrics label and in logs.

Invariant: no message here ever contains a token or any part of one.
"""

from __future__ import annotations


class LastguardError(Exception):
    """Base of every error lastguard raises on purpose."""


# --- policies ---------------------------------------------------------------


class PolicyError(LastguardError):
    """A JWTPolicy document is invalid. `problems` lists each one with its field path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


# --- keys -------------------------------------------------------------------


class KeyFetchError(LastguardError):
    """Fetching or parsing a JWKS or OIDC discovery document failed."""


# --- request denials --------------------------------------------------------


class DenyError(LastguardError):
    """A reason to deny a request. Subclasses fix status, error and reason."""

    status: int = 401
    error: str | None = "invalid_token"
    reason: str = "invalid_token"
    description: str = "the access token is invalid"

    def __init__(self, description: str | None = None) -> None:
        if description is not None:
            self.description = description
        super().__init__(self.description)


class MissingToken(DenyError):
    """No token was presented where one is required (RFC 6750 3.1: no error code)."""

    error = None
    reason = "missing_token"
    description = "an access token is required"


class TokenError(DenyError):
    """The presented token is not acceptable: 401 invalid_token."""


class TokenTooLarge(TokenError):
    reason = "token_too_large"
    description = "the access token is too large"


class MalformedToken(TokenError):
    reason = "malformed"
    description = "the access token is malformed"


class UnsupportedAlgorithm(TokenError):
    reason = "algorithm"
    description = "the token's signing algorithm is not allowed"


class CriticalHeader(TokenError):
    reason = "crit"
    description = "the token has critical header parameters that are not supported"


class UnknownIssuer(TokenError):
    reason = "issuer"
    description = "the token's issuer is not trusted"


class TokenLocationNotAllowed(TokenError):
    reason = "location"
    description = "the token was presented in a location its issuer does not use"


class Expired(TokenError):
    reason = "expired"
    description = "the access token expired"


class NotYetValid(TokenError):
    reason = "not_yet_valid"
    description = "the access token is not valid yet"


class MissingExpiry(TokenError):
    reason = "no_exp"
    description = "the access token has no valid exp claim"


class LifetimeExceeded(TokenError):
    reason = "lifetime"
    description = "the access token's lifetime exceeds the allowed maximum"


class AudienceMismatch(TokenError):
    reason = "audience"
    description = "the access token is not meant for this audience"


class UnknownKey(TokenError):
    reason = "unknown_kid"
    description = "the token was signed with an unknown key"


class BadSignature(TokenError):
    reason = "signature"
    description = "the token's signature is invalid"


class KeysUnavailable(DenyError):
    """The issuer's keys have never been obtained: the server cannot decide (503)."""

    status = 503
    error = "temporarily_unavailable"
    reason = "keys_unavailable"
    description = "the signing keys for this token's issuer are unavailable"


class AccessError(DenyError):
    """The token is valid but does not grant this request: 403."""

    status = 403


class InsufficientScope(AccessError):
    error = "insufficient_scope"
    reason = "insufficient_scope"
    description = "the access token lacks a required scope"

    def __init__(self, scopes: tuple[str, ...]) -> None:
        self.scopes = scopes
        super().__init__()


class ClaimMismatch(AccessError):
    error = "insufficient_scope"
    reason = "claim"

    def __init__(self, claim: str) -> None:
        self.claim = claim
        super().__init__(f"the access token's {claim} claim does not allow this request")


class RuleDenied(AccessError):
    error = "access_denied"
    reason = "rule_deny"
    description = "this request is denied by policy"


class NoPolicy(AccessError):
    error = "access_denied"
    reason = "no_policy"
    description = "no JWTPolicy selects this workload"


class NotReady(DenyError):
    """No policy set has been loaded yet: the sidecar cannot decide (503)."""

    status = 503
    error = "temporarily_unavailable"
    reason = "not_ready"
    description = "the authorization server has not loaded its policies yet"
