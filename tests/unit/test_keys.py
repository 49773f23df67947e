"""Parsing JWKS documents and PEM keys into key sets: what is accepted, what is skipped, and why."""

from __future__ import annotations

import base64
import datetime
import hashlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa, x25519
from cryptography.x509.oid import NameOID
from jwt import algorithms as jwt_algorithms

from lastguard.sidecar import errors, keys

RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_SMALL = rsa.generate_private_key(public_exponent=65537, key_size=1024)
P256 = ec.generate_private_key(ec.SECP256R1())
P384 = ec.generate_private_key(ec.SECP384R1())
P521 = ec.generate_private_key(ec.SECP521R1())
K256 = ec.generate_private_key(ec.SECP256K1())
ED25519 = ed25519.Ed25519PrivateKey.generate()
ED448 = ed448.Ed448PrivateKey.generate()
X25519 = x25519.X25519PrivateKey.generate()

RSA_ALGS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(private: Any, **extra: Any) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = jwt_algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = jwt_algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = jwt_algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
    jwk.update(extra)
    return {k: v for k, v in jwk.items() if v is not None}


def private_jwk(private: Any, **extra: Any) -> dict[str, Any]:
    algorithm: Any = (
        jwt_algorithms.RSAAlgorithm
        if isinstance(private, rsa.RSAPrivateKey)
        else jwt_algorithms.ECAlgorithm
    )
    jwk = algorithm.to_jwk(private, as_dict=True)
    jwk.update(extra)
    return dict(jwk)


def pem(private: Any) -> str:
    data: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data.decode()


def certificate(private: Any) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lastguard test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(private, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def spki_sha256(private: Any) -> str:
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def parse_one(jwk: Any) -> tuple[keys.KeySet, list[str]]:
    return keys.parse_jwks({"keys": [jwk]})


# --- which JWKs are accepted, bound to which algorithms ----------------------

ACCEPTED = [
    pytest.param(public_jwk(RSA, kid="k"), RSA_ALGS, id="rsa-2048-all-rsa-algs"),
    pytest.param(public_jwk(RSA, kid="k", alg="RS256"), {"RS256"}, id="rsa-alg-narrows-rs256"),
    pytest.param(public_jwk(RSA, kid="k", alg="PS384"), {"PS384"}, id="rsa-alg-narrows-ps384"),
    pytest.param(public_jwk(P256, kid="k"), {"ES256"}, id="ec-p256-es256-only"),
    pytest.param(public_jwk(P384, kid="k"), {"ES384"}, id="ec-p384-es384-only"),
    pytest.param(public_jwk(P521, kid="k"), {"ES512"}, id="ec-p521-es512-only"),
    pytest.param(public_jwk(P256, kid="k", alg="ES256"), {"ES256"}, id="ec-p256-with-alg"),
    pytest.param(public_jwk(ED25519, kid="k"), {"EdDSA"}, id="okp-ed25519-eddsa"),
    pytest.param(public_jwk(ED448, kid="k"), {"EdDSA"}, id="okp-ed448-eddsa"),
    pytest.param(public_jwk(RSA, kid="k", use="sig"), RSA_ALGS, id="use-sig"),
    pytest.param(public_jwk(RSA, kid="k", key_ops=["verify"]), RSA_ALGS, id="key-ops-with-verify"),
    pytest.param(public_jwk(RSA), RSA_ALGS, id="no-kid"),
    pytest.param(
        {**public_jwk(RSA, kid="k"), "n": public_jwk(RSA)["n"] + "=="},
        RSA_ALGS,
        id="padded-base64url-tolerated",
    ),
]


@pytest.mark.parametrize(("jwk", "algorithms"), ACCEPTED)
def test_accepted_keys_are_bound_to_their_algorithms(
    jwk: dict[str, Any], algorithms: set[str]
) -> None:
    keyset, problems = parse_one(jwk)
    assert problems == []
    (key,) = keyset.keys
    assert key.algorithms == algorithms
    assert key.kid == jwk.get("kid")


# --- which JWKs are skipped, with which problem -------------------------------

SKIPPED = [
    pytest.param({"kty": "oct", "kid": "s", "k": b64(b"secret" * 8)}, "symmetric", id="oct"),
    pytest.param(private_jwk(RSA, kid="p"), "private key material", id="rsa-private-jwk"),
    pytest.param(private_jwk(P256, kid="p"), "private key material", id="ec-private-jwk"),
    pytest.param(
        {**public_jwk(ED25519, kid="p"), "d": b64(b"\x01" * 32)},
        "private key material",
        id="okp-private-jwk",
    ),
    pytest.param(public_jwk(RSA_SMALL, kid="s"), "1024 bits is too small", id="rsa-1024"),
    pytest.param(public_jwk(RSA, kid="k", use="enc"), "use is 'enc'", id="use-enc"),
    pytest.param(
        public_jwk(RSA, kid="k", key_ops=["encrypt"]), "key_ops", id="key-ops-without-verify"
    ),
    pytest.param(public_jwk(RSA, kid="k", key_ops="verify"), "key_ops", id="key-ops-not-a-list"),
    pytest.param(
        public_jwk(RSA, kid="k", alg="HS256"),
        "alg 'HS256' cannot be used with an RSA key",
        id="hs256-on-rsa-key",
    ),
    pytest.param(public_jwk(RSA, kid="k", alg="none"), "alg 'none'", id="alg-none"),
    pytest.param(public_jwk(RSA, kid="k", alg="ES256"), "alg 'ES256'", id="es256-on-rsa-key"),
    pytest.param(
        public_jwk(P256, kid="k", alg="ES384"),
        "cannot be used with an EC P-256 key",
        id="es384-on-p256-key",
    ),
    pytest.param(public_jwk(P256, kid="k", alg="RS256"), "alg 'RS256'", id="rs256-on-ec-key"),
    pytest.param(public_jwk(ED25519, kid="k", alg="RS256"), "alg 'RS256'", id="rs256-on-okp"),
    pytest.param(public_jwk(K256, kid="k"), "unsupported EC curve 'secp256k1'", id="secp256k1"),
    pytest.param(
        {"kty": "OKP", "crv": "X25519", "kid": "x", "x": b64(b"\x09" * 32)},
        "unsupported OKP curve 'X25519'",
        id="okp-x25519",
    ),
    pytest.param({"kty": "DSA", "kid": "d"}, "unsupported kty 'DSA'", id="unknown-kty"),
    pytest.param({"kid": "m", "n": "AQAB", "e": "AQAB"}, "unsupported kty None", id="no-kty"),
    pytest.param({**public_jwk(RSA), "kid": 7}, "kid is not a string", id="kid-not-string"),
    pytest.param("not-a-key", "not a JSON object", id="entry-not-object"),
    pytest.param(
        {**public_jwk(RSA, kid="k"), "n": "abc$def"},
        '"n" is missing or not base64url',
        id="n-not-base64url",
    ),
    pytest.param(
        {k: v for k, v in public_jwk(RSA, kid="k").items() if k != "e"},
        '"e" is missing',
        id="rsa-without-e",
    ),
    pytest.param({**public_jwk(RSA, kid="k"), "n": 12345}, '"n" is missing', id="n-not-string"),
    pytest.param(
        {**public_jwk(P256, kid="k"), "y": public_jwk(P256)["x"]},
        "malformed key",
        id="ec-point-not-on-curve",
    ),
    pytest.param(
        {**public_jwk(P256, kid="k"), "x": b64(b"\x01" * 31)},
        "malformed key",
        id="ec-coordinate-wrong-length",
    ),
    pytest.param(
        {**public_jwk(ED25519, kid="k"), "x": b64(b"\x01" * 5)},
        "malformed key",
        id="okp-x-wrong-length",
    ),
]


@pytest.mark.parametrize(("jwk", "problem"), SKIPPED)
def test_unusable_keys_are_skipped_with_a_problem(jwk: Any, problem: str) -> None:
    keyset, problems = parse_one(jwk)
    assert keyset.keys == ()
    assert len(problems) == 1
    assert problems[0].startswith("keys[0]")
    assert problem in problems[0]


def test_problem_names_index_and_kid_and_good_keys_survive() -> None:
    keyset, problems = keys.parse_jwks(
        {
            "keys": [
                public_jwk(RSA, kid="good"),
                {"kty": "oct", "kid": "x", "k": "c2VjcmV0"},
                public_jwk(P256, kid="ec"),
            ]
        }
    )
    assert keyset.kids == ("ec", "good")
    assert problems == ["keys[1] (kid 'x'): symmetric keys are not supported"]


@pytest.mark.parametrize(
    "document",
    [
        pytest.param([], id="list"),
        pytest.param("keys", id="string"),
        pytest.param({}, id="no-keys-member"),
        pytest.param({"keys": {"kid": "a"}}, id="keys-not-a-list"),
    ],
)
def test_a_document_that_is_not_a_jwks_raises(document: Any) -> None:
    with pytest.raises(errors.KeyFetchError):
        keys.parse_jwks(document)


def test_an_empty_key_list_is_an_empty_set() -> None:
    assert keys.parse_jwks({"keys": []}) == (keys.EMPTY, [])


# --- lookups ------------------------------------------------------------------

KEYSET, _ = keys.parse_jwks(
    {
        "keys": [
            public_jwk(RSA, kid="rsa"),
            public_jwk(P256, kid="ec"),
            public_jwk(ED25519, kid="ed"),
            public_jwk(P384, kid="rsa"),  # same kid, other key: rotation overlap
            public_jwk(RSA, kid="pinned", alg="PS256"),
        ]
    }
)


@pytest.mark.parametrize(
    ("kid", "alg", "expected"),
    [
        pytest.param("rsa", "RS256", [("rsa", "RS256")], id="kid-and-alg-match"),
        pytest.param("rsa", "ES384", [("rsa", "ES384")], id="duplicate-kid-other-type"),
        pytest.param("ec", "ES256", [("ec", "ES256")], id="ec-kid"),
        pytest.param("ec", "RS256", [], id="alg-not-allowed-by-kid"),
        pytest.param("rsa", "HS256", [], id="hs256-never-matches-rsa-key"),
        pytest.param("rsa", "none", [], id="none-never-matches"),
        pytest.param("nope", "RS256", [], id="unknown-kid"),
        pytest.param(None, "RS256", [("rsa", "RS256")], id="no-kid-tries-all-for-alg"),
        pytest.param(
            None, "PS256", [("rsa", "PS256"), ("pinned", "PS256")], id="no-kid-several-keys"
        ),
        pytest.param("pinned", "RS256", [], id="alg-member-excludes-other-rsa-algs"),
        pytest.param(None, "EdDSA", [("ed", "EdDSA")], id="no-kid-eddsa"),
    ],
)
def test_candidates(kid: str | None, alg: str, expected: list[tuple[str, str]]) -> None:
    found = KEYSET.candidates(kid, alg)
    assert [(k.kid, alg) for k in found] == expected
    assert all(alg in k.algorithms for k in found)


def test_kid_queries() -> None:
    assert KEYSET.kids == ("ec", "ed", "pinned", "rsa")
    assert KEYSET.has_kid("ec") and not KEYSET.has_kid("nope")
    assert keys.EMPTY.candidates(None, "RS256") == () and keys.EMPTY.kids == ()


def test_exact_duplicates_are_listed_once() -> None:
    keyset, problems = keys.parse_jwks({"keys": [public_jwk(RSA, kid="a")] * 2})
    assert problems == [] and len(keyset.keys) == 1


# --- identity of key material ---------------------------------------------------


def fingerprint(*jwks: dict[str, Any]) -> Any:
    return keys.parse_jwks({"keys": list(jwks)})[0].fingerprint


@pytest.mark.parametrize(
    ("before", "after", "same"),
    [
        pytest.param([public_jwk(RSA, kid="a")], [public_jwk(RSA, kid="a")], True, id="reparse"),
        pytest.param(
            [public_jwk(RSA, kid="a"), public_jwk(P256, kid="b")],
            [public_jwk(P256, kid="b"), public_jwk(RSA, kid="a")],
            True,
            id="order-does-not-matter",
        ),
        pytest.param(
            [public_jwk(RSA, kid="a"), public_jwk(P256, kid="b")],
            [public_jwk(RSA, kid="a")],
            False,
            id="key-removed",
        ),
        pytest.param(
            [public_jwk(RSA, kid="a")], [public_jwk(RSA, kid="b")], False, id="kid-renamed"
        ),
        pytest.param(
            [public_jwk(RSA, kid="a")], [public_jwk(P256, kid="a")], False, id="material-replaced"
        ),
        pytest.param(
            [public_jwk(RSA, kid="a")],
            [public_jwk(RSA, kid="a", alg="RS256")],
            False,
            id="alg-binding-changed",
        ),
    ],
)
def test_fingerprint_tracks_key_material(
    before: list[dict[str, Any]], after: list[dict[str, Any]], same: bool
) -> None:
    assert (fingerprint(*before) == fingerprint(*after)) is same


def test_thumbprint_is_sha256_of_spki_whatever_the_format() -> None:
    from_jwk = parse_one(public_jwk(P256, kid="a"))[0].keys[0]
    from_pem = keys.parse_pem_keys([("a", pem(P256))])[0].keys[0]
    assert from_jwk.thumbprint == from_pem.thumbprint == spki_sha256(P256)


# --- parsed keys verify with PyJWT's algorithms -------------------------------


def sign(private: Any, alg: str, message: bytes) -> bytes:
    algorithm = jwt_algorithms.get_default_algorithms()[alg]
    return bytes(algorithm.sign(message, private))


@pytest.mark.parametrize(
    ("private", "alg"),
    [
        pytest.param(RSA, "RS256", id="rs256"),
        pytest.param(RSA, "RS512", id="rs512"),
        pytest.param(RSA, "PS256", id="ps256"),
        pytest.param(P256, "ES256", id="es256"),
        pytest.param(P384, "ES384", id="es384"),
        pytest.param(P521, "ES512", id="es512"),
        pytest.param(ED25519, "EdDSA", id="eddsa-ed25519"),
        pytest.param(ED448, "EdDSA", id="eddsa-ed448"),
    ],
)
def test_parsed_keys_verify_signatures(private: Any, alg: str) -> None:
    (key,) = parse_one(public_jwk(private, kid="k"))[0].candidates("k", alg)
    algorithm = jwt_algorithms.get_default_algorithms()[alg]
    signature = sign(private, alg, b"payload")
    assert algorithm.verify(b"payload", key.key, signature)
    assert not algorithm.verify(b"tampered", key.key, signature)


def test_rsa_key_object_is_public_only() -> None:
    (key,) = parse_one(public_jwk(RSA, kid="k"))[0].keys
    assert isinstance(key.key, rsa.RSAPublicKey)
    signature = RSA.sign(b"m", padding.PKCS1v15(), hashes.SHA256())
    key.key.verify(signature, b"m", padding.PKCS1v15(), hashes.SHA256())


# --- PEM keys and certificates --------------------------------------------------

PKCS1_RSA = (
    RSA.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    .decode()
)
PRIVATE_PEM = RSA.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption(),
).decode()


@pytest.mark.parametrize(
    ("pem_text", "algorithms", "thumbprint_of"),
    [
        pytest.param(pem(RSA), RSA_ALGS, RSA, id="rsa-spki"),
        pytest.param(PKCS1_RSA, RSA_ALGS, RSA, id="rsa-pkcs1"),
        pytest.param(pem(P384), {"ES384"}, P384, id="ec-p384"),
        pytest.param(pem(ED25519), {"EdDSA"}, ED25519, id="ed25519"),
        pytest.param(certificate(RSA), RSA_ALGS, RSA, id="rsa-certificate"),
        pytest.param(certificate(P256), {"ES256"}, P256, id="ec-certificate"),
    ],
)
def test_pem_keys_accepted(pem_text: str, algorithms: set[str], thumbprint_of: Any) -> None:
    keyset, problems = keys.parse_pem_keys([("kid-1", pem_text)])
    assert problems == []
    (key,) = keyset.keys
    assert key.kid == "kid-1"
    assert key.algorithms == algorithms
    assert key.thumbprint == spki_sha256(thumbprint_of)


@pytest.mark.parametrize(
    ("pem_text", "problem"),
    [
        pytest.param(PRIVATE_PEM, "private key material", id="private-key-pem"),
        pytest.param(pem(RSA_SMALL), "too small", id="rsa-1024"),
        pytest.param(pem(K256), "unsupported EC curve", id="secp256k1"),
        pytest.param(pem(X25519), "unsupported key type", id="x25519"),
        pytest.param("hello", "not a PEM public key or certificate", id="not-pem"),
        pytest.param(
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            "malformed PEM",
            id="garbage-public-key",
        ),
        pytest.param(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "malformed PEM",
            id="garbage-certificate",
        ),
    ],
)
def test_pem_keys_skipped(pem_text: str, problem: str) -> None:
    keyset, problems = keys.parse_pem_keys([("bad", pem_text), ("good", pem(RSA))])
    assert keyset.kids == ("good",)
    assert len(problems) == 1 and problems[0].startswith("kid 'bad': ")
    assert problem in problems[0]
