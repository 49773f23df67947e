"""JWTPolicy parsing: spec in, model or field-path errors out."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from lastguard.sidecar.devissuer import DevIssuer
from lastguard.sidecar.errors import PolicyError
from lastguard.sidecar.policy import model
from lastguard.sidecar.policy.parse import parse_documents, parse_policy
from tests.support.policies import document as policy
from tests.support.policies import with_issuer

JWKS = json.dumps(DevIssuer("https://idp.example").jwks())


def test_defaults_follow_istio() -> None:
    p = parse_policy(policy())
    issuer = p.issuers[0]
    assert p.namespace == "shop" and p.name == "p" and p.match_labels is None
    assert p.default_action is model.Action.AUTHENTICATE
    assert issuer.from_headers == (model.HeaderLocation("authorization", "Bearer "),)
    assert issuer.clock_skew_seconds == 60
    assert issuer.algorithms == model.SUPPORTED_ALGORITHMS
    assert not issuer.forward_original_token
    assert issuer.jwks_cache_duration_seconds == 600
    assert issuer.key_source is model.KeySourceKind.JWKS_URI


def test_full_policy() -> None:
    doc = policy(
        selector={"matchLabels": {"app": "web"}},
        rules=[
            {"paths": ["/healthz"], "action": "Allow"},
            {"paths": ["/api/*"], "methods": ["get"], "requiredScopes": ["read"]},
            {"paths": ["/me"], "action": "Optional"},
            {
                "paths": ["/admin/*"],
                "requiredClaims": [{"claim": "groups", "values": ["admins"]}],
            },
        ],
        defaultAction="Deny",
    )
    doc["spec"]["issuers"][0].update(
        audiences=["web"],
        algorithms=["ES256"],
        fromHeaders=[{"name": "X-Token"}],
        fromParams=["access_token"],
        fromCookies=["session"],
        outputClaimToHeaders=[{"header": "X-User", "claim": "sub"}],
        outputPayloadToHeader="x-jwt-payload",
        forwardOriginalToken=True,
        clockSkewSeconds=5,
        maxLifetimeSeconds=3600,
    )
    p = parse_policy(doc)
    assert p.match_labels == (("app", "web"),)
    assert p.default_action is model.Action.DENY
    assert [r.action for r in p.rules] == [
        model.Action.ALLOW,
        model.Action.AUTHENTICATE,
        model.Action.OPTIONAL,
        model.Action.AUTHENTICATE,
    ]
    assert p.rules[1].methods == ("GET",)
    assert p.rules[3].required_claims == (model.RequiredClaim("groups", ("admins",)),)
    issuer = p.issuers[0]
    assert issuer.from_headers == (model.HeaderLocation("x-token", ""),)
    assert issuer.output_headers == ("x-user", "x-jwt-payload")
    assert issuer.max_lifetime_seconds == 3600


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        pytest.param(
            with_issuer(jwksUri="ftp://x"),
            "spec.issuers[0].jwksUri: must be an http(s) URL",
            id="jwks-uri-not-http",
        ),
        pytest.param(
            with_issuer(jwks=JWKS),
            "spec.issuers[0]: set only one of jwksUri, jwks, publicKeys (found jwksUri, jwks)",
            id="two-key-sources",
        ),
        pytest.param(
            with_issuer(jwksUri=None, issuer="not-a-url"),
            "spec.issuers[0].issuer: must be an http(s) URL when no jwksUri",
            id="discovery-needs-url-issuer",
        ),
        pytest.param(
            with_issuer(jwksUri=None, jwks="{not json"),
            "spec.issuers[0].jwks: must be a JWKS JSON document",
            id="inline-jwks-not-json",
        ),
        pytest.param(
            with_issuer(jwksUri=None, jwks='{"keys": []}'),
            'spec.issuers[0].jwks: must be a JWKS JSON object with a non-empty "keys" array',
            id="inline-jwks-empty",
        ),
        pytest.param(
            with_issuer(jwksUri=None, jwks=json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})),
            "spec.issuers[0].jwks: has no usable key: keys[0]",
            id="inline-jwks-only-symmetric",
        ),
        pytest.param(
            with_issuer(jwksUri=None, jwks="[" * 5000 + "]" * 5000),
            "spec.issuers[0].jwks: must be a JWKS JSON document",
            id="inline-jwks-deeply-nested",
        ),
        pytest.param(
            with_issuer(
                jwksUri=None,
                publicKeys={"k1": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"},
            ),
            "spec.issuers[0].publicKeys.k1: ",
            id="public-key-garbage-pem",
        ),
        pytest.param(
            with_issuer(jwksUri=None, publicKeys={"k1": "not pem"}),
            "spec.issuers[0].publicKeys.k1: must be a PEM public key or X.509 certificate",
            id="public-key-not-pem",
        ),
        pytest.param(
            with_issuer(algorithms=["HS256"]),
            "spec.issuers[0].algorithms[0]: unsupported algorithm 'HS256' (symmetric",
            id="symmetric-alg",
        ),
        pytest.param(
            with_issuer(algorithms=["none"]),
            "spec.issuers[0].algorithms[0]: unsupported algorithm 'none'",
            id="alg-none",
        ),
        pytest.param(
            with_issuer(clockSkewSeconds=True),
            "spec.issuers[0].clockSkewSeconds: must be integer, not boolean",
            id="bool-is-not-int",
        ),
        pytest.param(
            with_issuer(clockSkewSeconds=601),
            "spec.issuers[0].clockSkewSeconds: must be between 0 and 600",
            id="skew-too-large",
        ),
        pytest.param(
            with_issuer(jwksCacheDurationSeconds=5),
            "spec.issuers[0].jwksCacheDurationSeconds: must be between 30 and 86400",
            id="cache-too-short",
        ),
        pytest.param(
            with_issuer(outputClaimToHeaders=[{"header": "Host", "claim": "sub"}]),
            "spec.issuers[0].outputClaimToHeaders[0].header: 'Host' is reserved",
            id="reserved-output-header",
        ),
        pytest.param(
            with_issuer(outputClaimToHeaders=[{"header": "bad header", "claim": "sub"}]),
            "spec.issuers[0].outputClaimToHeaders[0].header: must be a valid HTTP header name",
            id="invalid-output-header",
        ),
        pytest.param(
            with_issuer(
                fromHeaders=[{"name": "x-token"}],
                outputClaimToHeaders=[{"header": "x-token", "claim": "sub"}],
            ),
            "spec.issuers[0].outputClaimToHeaders[0].header: must not be a header tokens are read",
            id="output-header-is-token-header",
        ),
        pytest.param(
            with_issuer(
                outputClaimToHeaders=[
                    {"header": "x-a", "claim": "sub"},
                    {"header": "x-a", "claim": "email"},
                ]
            ),
            "spec.issuers[0].outputClaimToHeaders: each output header may be set only once",
            id="duplicate-output-header",
        ),
        pytest.param(
            with_issuer(typo=1),
            "spec.issuers[0].typo: unknown field",
            id="unknown-field",
        ),
        pytest.param(
            policy(
                issuers=[
                    {"issuer": "https://a", "jwksUri": "https://a/k"},
                    {"issuer": "https://a", "jwksUri": "https://a/k2"},
                ]
            ),
            "spec.issuers[1].issuer: duplicates spec.issuers[0]",
            id="duplicate-issuer",
        ),
        pytest.param(
            policy(rules=[{"paths": ["api"]}]),
            "spec.rules[0].paths[0]: must start with '/'",
            id="relative-path",
        ),
        pytest.param(
            policy(rules=[{"paths": ["/a*b"]}]),
            "spec.rules[0].paths[0]: must start with '/', contain no '?', '#' or spaces",
            id="inner-wildcard",
        ),
        pytest.param(
            policy(rules=[{"paths": ["/a?x=1"]}]),
            "spec.rules[0].paths[0]",
            id="query-in-path",
        ),
        pytest.param(
            policy(rules=[{"methods": ["G3T"]}]),
            "spec.rules[0].methods[0]: must be an HTTP method name",
            id="bad-method",
        ),
        pytest.param(
            policy(rules=[{"action": "Permit"}]),
            "spec.rules[0].action: must be one of Authenticate, Optional, Allow, Deny",
            id="bad-action",
        ),
        pytest.param(
            policy(rules=[{"action": "Allow", "requiredScopes": ["x"]}]),
            "spec.rules[0]: requiredScopes and requiredClaims need action Authenticate or Optional",
            id="scopes-on-allow",
        ),
        pytest.param(
            policy(rules=[{"requiredClaims": [{"claim": "groups", "values": []}]}]),
            "spec.rules[0].requiredClaims[0].values: must list at least one value",
            id="claim-without-values",
        ),
        pytest.param(
            policy(issuers=[]),
            "spec.issuers: at least one issuer is required",
            id="authenticate-without-issuers",
        ),
        pytest.param(
            policy(selector={"matchLabels": {"app": 1}}),
            "spec.selector.matchLabels: keys and values must be strings",
            id="label-not-string",
        ),
        pytest.param(
            {**policy(), "apiVersion": "v1"},
            "apiVersion: must be lastguard.dev/v1alpha1",
            id="wrong-api-version",
        ),
        pytest.param(
            {**policy(), "metadata": {"name": "Upper"}},
            "metadata.name: must be a lower-case DNS subdomain name",
            id="bad-name",
        ),
        pytest.param(
            {k: v for k, v in policy().items() if k != "spec"},
            "spec: is required",
            id="no-spec",
        ),
    ],
)
def test_invalid_policies_name_the_field(doc: dict[str, Any], expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(doc)
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_all_problems_are_reported_at_once() -> None:
    doc = with_issuer(jwksUri="ftp://x", clockSkewSeconds=-1, typo=True)
    with pytest.raises(PolicyError) as info:
        parse_policy(doc)
    assert len(info.value.problems) == 3


def test_inline_keys_accepted() -> None:
    dev = DevIssuer("https://idp.example")
    p = parse_policy(with_issuer(jwksUri=None, publicKeys={"rsa-1": dev.public_pem("rsa-1")}))
    assert p.issuers[0].key_source is model.KeySourceKind.PUBLIC_KEYS
    p = parse_policy(with_issuer(jwksUri=None, jwks=JWKS))
    assert p.issuers[0].key_source is model.KeySourceKind.INLINE_JWKS


def test_policy_without_issuers_is_fine_when_no_action_reads_tokens() -> None:
    p = parse_policy(
        policy(issuers=[], rules=[{"paths": ["/healthz"], "action": "Allow"}], defaultAction="Deny")
    )
    assert p.issuers == ()


def test_stream_is_all_or_nothing_with_document_labels() -> None:
    good = policy()
    bad = copy.deepcopy(policy())
    bad["metadata"]["name"] = "second"
    bad["spec"]["issuers"][0]["jwksUri"] = "nope"
    text = "\n---\n".join(json.dumps(d) for d in (good, bad))
    with pytest.raises(PolicyError) as info:
        parse_documents(text)
    assert info.value.problems == [
        "document 1 (second): spec.issuers[0].jwksUri: must be an http(s) URL"
    ]


def test_duplicate_policy_names_rejected() -> None:
    text = "\n---\n".join(json.dumps(policy()) for _ in range(2))
    with pytest.raises(PolicyError, match="duplicate policy shop/p"):
        parse_documents(text)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("a: [unclosed", id="invalid-yaml"),
        pytest.param("- just\n- a list\n", id="not-an-object"),
        pytest.param("42", id="scalar"),
    ],
)
def test_garbage_files_are_clear_errors(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_documents(text)


def test_empty_documents_are_skipped() -> None:
    assert len(parse_documents("---\n" + json.dumps(policy()) + "\n---\n")) == 1
