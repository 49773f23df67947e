"""Verification keys: turning a JWKS document or PEM keys into a `KeySet`. Pure: no I/O.

A `KeySet` is parsed once per fetch and then only read on the request path, so
every decision about which key may verify which algorithm is taken here, at
parse time, and `KeySet.candidates` is a dictionary lookup.

Invariants:
- Every key is a public, asymmetric signing key: RSA of at least 2048 bits, EC
  on P-256, P-384 or P-521, or OKP Ed25519 / Ed448. Symmetric keys (`kty: oct`),
  keys carrying private material, encryption keys (`use` other than "sig",
  `key_ops` without "verify") and anything malformed are skipped, each with one
  human-readable problem string for the caller to log.
- Each key is bound to the algorithms its type allows (RSA: RS*/PS*, P-256:
  ES256, P-384: ES384, P-521: ES512, OKP: EdDSA), narrowed to its `alg` member
  when present. A key whose `alg` does not fit its type is skipped. This binding
  is what makes algorithm confusion impossible: an HS256 (or ES256) token never
  reaches an RSA key.
- A bad individual key never raises; only a document that is not a JWKS at all
  raises `KeyFetchError`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt import algorithms as jwt_algorithms

from lastguard.sidecar import errors

MIN_RSA_BITS = 2048

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS: Mapping[str, frozenset[str]] = {
    "P-256": frozenset({"ES256"}),
    "P-384": frozenset({"ES384"}),
    "P-521": frozenset({"ES512"}),
}
_EC_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
OKP_ALGORITHMS = frozenset({"EdDSA"})

#: JWK members that only a private key has (RFC 7518 6.2.2, 6.3.2, RFC 8037 2).
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")
#: Unpadded base64url (RFC 7515 2); trailing padding is tolerated, other characters are not.
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
_KEY_MEMBERS = {"RSA": ("n", "e"), "EC": ("x", "y"), "OKP": ("x",)}

_NO_KEYS: Mapping[str | None, tuple[VerificationKey, ...]] = {}


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One public key, the JWS algorithms it may verify, and what identifies its material."""

    kid: str | None
    #: A cryptography public key object, usable as `key` in PyJWT's `Algorithm.verify`.
    key: Any = field(compare=False, repr=False)
    algorithms: frozenset[str]
    #: sha256 hex of the key's SubjectPublicKeyInfo DER.
    thumbprint: str


@dataclass(frozen=True, slots=True)
class KeySet:
    """The usable keys of one source, indexed by algorithm and kid at construction."""

    keys: tuple[VerificationKey, ...]
    _index: Mapping[str, Mapping[str | None, tuple[VerificationKey, ...]]] = field(
        init=False, repr=False, compare=False
    )
    _fingerprint: frozenset[tuple[str | None, str, frozenset[str]]] = field(
        init=False, repr=False, compare=False
    )
    _kids: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, dict[str | None, list[VerificationKey]]] = {}
        for key in self.keys:
            for alg in key.algorithms:
                by_kid = index.setdefault(alg, {})
                # None collects every key allowing alg: a token without kid tries them all.
                by_kid.setdefault(None, []).append(key)
                if key.kid is not None:
                    by_kid.setdefault(key.kid, []).append(key)
        frozen = {
            alg: {kid: tuple(keys) for kid, keys in by_kid.items()} for alg, by_kid in index.items()
        }
        object.__setattr__(self, "_index", frozen)
        object.__setattr__(
            self,
            "_fingerprint",
            frozenset((k.kid, k.thumbprint, k.algorithms) for k in self.keys),
        )
        object.__setattr__(self, "_kids", frozenset(k.kid for k in self.keys if k.kid is not None))

    def candidates(self, kid: str | None, alg: str) -> tuple[VerificationKey, ...]:
        """Keys that may verify a token with this kid (None: any kid) and alg."""
        return self._index.get(alg, _NO_KEYS).get(kid, ())

    def has_kid(self, kid: str) -> bool:
        return kid in self._kids

    @property
    def kids(self) -> tuple[str, ...]:
        """Distinct kids, sorted (for status and logs)."""
        return tuple(sorted(self._kids))

    @property
    def fingerprint(self) -> frozenset[tuple[str | None, str, frozenset[str]]]:
        """Identity of the key material and its algorithm bindings, for change detection."""
        return self._fingerprint


EMPTY = KeySet(())


def parse_jwks(document: Any) -> tuple[KeySet, list[str]]:
    """The usable keys of a decoded JWKS document, and one problem per skipped key."""
    if not isinstance(document, dict):
        raise errors.KeyFetchError("the JWKS document is not a JSON object")
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise errors.KeyFetchError('the JWKS document has no "keys" list')
    found: list[VerificationKey] = []
    problems: list[str] = []
    for i, entry in enumerate(entries):
        where = f"keys[{i}]"
        if isinstance(entry, dict) and isinstance(entry.get("kid"), str):
            where += f" (kid {entry['kid']!r})"
        try:
            found.append(_from_jwk(entry))
        except _Skip as skip:
            problems.append(f"{where}: {skip}")
    return KeySet(_unique(found)), problems


def parse_pem_keys(pairs: Iterable[tuple[str, str]]) -> tuple[KeySet, list[str]]:
    """Keys from (kid, PEM) pairs; each PEM is a public key or an X.509 certificate.

    A certificate contributes its public key only: its validity dates and chain
    are not checked, because configuring it is what makes it trusted.
    """
    found: list[VerificationKey] = []
    problems: list[str] = []
    for kid, pem in pairs:
        try:
            found.append(_from_pem(kid, pem))
        except _Skip as skip:
            problems.append(f"kid {kid!r}: {skip}")
    return KeySet(_unique(found)), problems


class _Skip(Exception):
    """This key is unusable; the message says why."""


def _from_jwk(jwk: Any) -> VerificationKey:
    if not isinstance(jwk, dict):
        raise _Skip("not a JSON object")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _Skip("kid is not a string")
    kty = jwk.get("kty")
    if kty == "oct":
        raise _Skip("symmetric keys are not supported")
    if any(member in jwk for member in _PRIVATE_MEMBERS):
        raise _Skip("contains private key material")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise _Skip(f"use is {use!r}, not 'sig'")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise _Skip('key_ops does not include "verify"')
    if kty not in _KEY_MEMBERS:
        raise _Skip(f"unsupported kty {kty!r}")
    for member in _KEY_MEMBERS[kty]:
        value = jwk.get(member)
        if not isinstance(value, str) or not _BASE64URL.match(value):
            raise _Skip(f'"{member}" is missing or not base64url')
    if kty == "EC" and jwk.get("crv") not in _EC_ALGORITHMS:
        raise _Skip(f"unsupported EC curve {jwk.get('crv')!r}")
    if kty == "OKP" and jwk.get("crv") not in _OKP_CURVES:
        raise _Skip(f"unsupported OKP curve {jwk.get('crv')!r}")
    try:
        public_key = _JWK_LOADERS[kty](jwk)
    except Exception as exc:  # any library error means a malformed value
        raise _Skip(f"malformed key: {exc}") from exc
    return _bind(kid, public_key, jwk.get("alg"))


_JWK_LOADERS = {
    "RSA": jwt_algorithms.RSAAlgorithm.from_jwk,
    "EC": jwt_algorithms.ECAlgorithm.from_jwk,
    "OKP": jwt_algorithms.OKPAlgorithm.from_jwk,
}


def _from_pem(kid: str, pem: str) -> VerificationKey:
    data = pem.encode()
    if b"PRIVATE KEY-----" in data:
        raise _Skip("contains private key material")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            public_key: Any = x509.load_pem_x509_certificate(data).public_key()
        elif b"PUBLIC KEY-----" in data:
            public_key = serialization.load_pem_public_key(data)
        else:
            raise _Skip("not a PEM public key or certificate")
    except ValueError as exc:
        raise _Skip(f"malformed PEM: {exc}") from exc
    return _bind(kid, public_key, None)


def _bind(kid: str | None, public_key: Any, alg: Any) -> VerificationKey:
    """The key with the algorithms its type allows, narrowed to `alg` if given."""
    allowed = _algorithms_for(public_key)
    if alg is not None:
        if alg not in allowed:
            raise _Skip(f"alg {alg!r} cannot be used with {_describe(public_key)}")
        allowed = frozenset({alg})
    return VerificationKey(kid, public_key, allowed, _thumbprint(public_key))


def _algorithms_for(public_key: Any) -> frozenset[str]:
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise _Skip(f"RSA key of {public_key.key_size} bits is too small")
        return RSA_ALGORITHMS
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        crv = _EC_CURVE_NAMES.get(public_key.curve.name)
        if crv is None:
            raise _Skip(f"unsupported EC curve {public_key.curve.name!r}")
        return _EC_ALGORITHMS[crv]
    if isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return OKP_ALGORITHMS
    raise _Skip(f"unsupported key type {type(public_key).__name__}")


def _describe(public_key: Any) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "an RSA key"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"an EC {_EC_CURVE_NAMES[public_key.curve.name]} key"
    return "an OKP key"


def _thumbprint(public_key: Any) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _unique(keys: list[VerificationKey]) -> tuple[VerificationKey, ...]:
    """Drops exact repeats (same kid, material and algorithms), keeping order."""
    seen: set[tuple[str | None, str, frozenset[str]]] = set()
    out: list[VerificationKey] = []
    for key in keys:
        ident = (key.kid, key.thumbprint, key.algorithms)
        if ident not in seen:
            seen.add(ident)
            out.append(key)
    return tuple(out)
