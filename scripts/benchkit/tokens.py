"""The measured issuer's tokens: its signing keys, kept on disk, and pools of minted tokens.

Cache-miss runs need tokens never sent before, tens of thousands of them: they
are minted ahead, in parallel processes, into a pool file per algorithm that
later benches reuse while the key that signed them is the same and they have
days left. Each run reads a slice of its own (wrk's scripts do), so no token is
sent twice in one bench.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import algorithms as jwt_algorithms

from benchkit import config

ISSUER = "https://idp.bench.lastguard.dev"
AUDIENCE = "orders-api"
SCOPES = "api.read orders.read"
TOKEN_LIFETIME = 30 * 86_400
#: A pool whose earliest token expires sooner than this is minted again.
MIN_REMAINING_LIFETIME = 2 * 86_400
ALGORITHMS = ("RS256", "ES256")


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
        say(f"minting {missing:,} {self.alg} tokens into {config.shown(self.path)} ...")
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
        raise config.BenchError(f"{self.path} has no line {n}")


def _chunks(first: int, count: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(first, first + count, size):
        yield start, min(size, first + count - start)
