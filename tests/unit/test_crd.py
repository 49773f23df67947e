"""The JWTPolicy CRD: a valid Kubernetes object that judges policies as the parser does.

`lastguard.sidecar.policy.parse` is the reference: the sidecar and the operator
run it on every policy. The CRD (manifests/crds/) repeats its constraints for
the API server, so a bad policy is refused at `kubectl apply` instead of showing
up later in the policy's status. Two judges read the same tables here:

- the CRD, emulated as the API server applies it: nulls pruned, schema defaults
  filled in, the openAPIV3Schema checked with `jsonschema` (unknown fields are
  errors, as under kubectl's strict field validation; `pattern` runs on RE2, as
  in Go), then every x-kubernetes-validations rule evaluated with celpy
  (cel-python) with `self` bound to the node the rule is attached to;
- `parse_policy`.

Every case must get the same verdict from both, on the same field. The one
place they cannot agree is key material (CEL cannot parse JSON or decode
keys): CEL_CANNOT_DECODE pins that the API server accepts those and the parser
rejects them, so the operator reports them in status.

celpy lacks the Kubernetes string extension `lowerAscii`, so it is supplied
here (ASCII-only lower-casing, as in cel-go's ext.Strings). Estimated CEL cost,
which a real API server checks when the CRD is created, is not emulated; the
bounds every list, map and string carries are what keep it low.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import re2
import yaml

from lastguard.sidecar.devissuer import DevIssuer
from lastguard.sidecar.errors import PolicyError
from lastguard.sidecar.policy import fields, model, parse
from tests.support.policies import document as policy
from tests.support.policies import with_issuer

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "manifests" / "crds" / "jwtpolicies.lastguard.dev.yaml"
SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))

CRD: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
VERSION: dict[str, Any] = CRD["spec"]["versions"][0]
SCHEMA: dict[str, Any] = VERSION["schema"]["openAPIV3Schema"]

Steps = tuple[str, ...]  # a schema location: property names, "[]" for items, "{}" for map values


def walk_schema(node: dict[str, Any], steps: Steps = ()) -> Iterator[tuple[Steps, dict[str, Any]]]:
    yield steps, node
    for name, sub in node.get("properties", {}).items():
        yield from walk_schema(sub, (*steps, name))
    if "items" in node:
        yield from walk_schema(node["items"], (*steps, "[]"))
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk_schema(node["additionalProperties"], (*steps, "{}"))


def schema_path(steps: Steps) -> str:
    """A schema location for people: spec.issuers[].publicKeys{}."""
    return ".".join(steps).replace(".[]", "[]").replace(".{}", "{}")


def node_at(*steps: str) -> dict[str, Any]:
    return dict(walk_schema(SCHEMA))[steps]


def field_path(parts: tuple[str | int, ...] | list[str | int]) -> str:
    """Formats a document path the way the parser names fields: spec.issuers[0].jwksUri."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# --- the CRD as a judge -----------------------------------------------------------


def _re2_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    # The API server runs `pattern` with Go's regexp (RE2): `$` is the end of the
    # text and `\s` is ASCII; Python's re would judge some strings differently.
    if validator.is_type(instance, "string") and not re2.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _re2_pattern}
)


def _json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """The structural schema as JSON Schema: x-kubernetes-* dropped, unknown fields refused."""
    nested = ("properties", "items", "additionalProperties")
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k not in nested}
    if "properties" in node:
        out["properties"] = {name: _json_schema(sub) for name, sub in node["properties"].items()}
        out["additionalProperties"] = False
    if "items" in node:
        out["items"] = _json_schema(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _json_schema(node["additionalProperties"])
    return out


SCHEMA_VALIDATOR = _Validator(_json_schema(SCHEMA))


def _lower_ascii(value: celpy.celtypes.StringType) -> celpy.celtypes.StringType:
    return celpy.celtypes.StringType(re.sub("[A-Z]", lambda m: m[0].lower(), str(value)))


_CEL = celpy.Environment()
_CEL_FUNCTIONS = {"lowerAscii": _lower_ascii}


@dataclass(eq=False)
class CelRule:
    steps: Steps
    rule: str
    message: str
    field_path: str

    def __post_init__(self) -> None:
        self.program = _CEL.program(_CEL.compile(self.rule), functions=_CEL_FUNCTIONS)

    @property
    def where(self) -> str:
        return schema_path(self.steps) + self.field_path

    def holds(self, value: Any) -> bool:
        result = self.program.evaluate({"self": celpy.json_to_cel(value)})
        if not isinstance(result, celpy.celtypes.BoolType):
            raise AssertionError(f"rule at {self.where} gave {result!r}, not a bool")
        return bool(result)


CEL_RULES = [
    CelRule(
        steps,
        " ".join(v["rule"].split()),
        " ".join(v["message"].split()),
        v.get("fieldPath", ""),
    )
    for steps, node in walk_schema(SCHEMA)
    for v in node.get("x-kubernetes-validations", [])
]


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    rule: CelRule | None = None  # None: the OpenAPI schema said no

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _prune_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune_nulls(v) for v in value]
    return value


def _apply_defaults(value: Any, node: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for name, sub in node.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _apply_defaults(value[name], sub)
        if isinstance(node.get("additionalProperties"), dict):
            for item in value.values():
                _apply_defaults(item, node["additionalProperties"])
    elif isinstance(value, list) and "items" in node:
        for item in value:
            _apply_defaults(item, node["items"])


def as_stored(doc: Any) -> Any:
    """What the API server validates and stores: nulls pruned, then defaults applied."""
    stored = _prune_nulls(doc)
    _apply_defaults(stored, SCHEMA)
    return stored


def _instances(
    value: Any, steps: Steps, path: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    if not steps:
        yield path, value
        return
    step, rest = steps[0], steps[1:]
    if step == "[]" and isinstance(value, list):
        for i, item in enumerate(value):
            yield from _instances(item, rest, (*path, i))
    elif step == "{}" and isinstance(value, dict):
        for key, item in value.items():
            yield from _instances(item, rest, (*path, key))
    elif isinstance(value, dict) and step in value:
        yield from _instances(value[step], rest, (*path, step))


def _schema_problems(error: jsonschema.ValidationError) -> list[Problem]:
    # Like the API server, name the missing or unknown field itself, not its parent.
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return [Problem(field_path([*path, k]), "Required value") for k in missing]
    if error.validator == "additionalProperties" and error.validator_value is False:
        unknown = [k for k in error.instance if k not in error.schema.get("properties", {})]
        return [Problem(field_path([*path, k]), "unknown field") for k in unknown]
    return [Problem(field_path(path), error.message)]


def crd_problems(doc: Any) -> list[Problem]:
    """The CRD's verdict: schema errors first; CEL rules run on a schema-valid object."""
    stored = as_stored(doc)
    problems = [p for e in SCHEMA_VALIDATOR.iter_errors(stored) for p in _schema_problems(e)]
    if problems:
        return problems
    for rule in CEL_RULES:
        for path, value in _instances(stored, rule.steps):
            if not rule.holds(value):
                where = field_path(path) + rule.field_path
                problems.append(Problem(where, rule.message, rule))
    return problems


def parser_problems(doc: Any) -> list[str]:
    try:
        parse.parse_policy(copy.deepcopy(doc))
    except PolicyError as exc:
        return exc.problems
    return []


def _same_field(a: str, b: str) -> bool:
    """One path is the other or encloses it (the judges may point at different depths)."""
    short, long = sorted((a, b), key=len)
    return not short or long == short or long.startswith((short + ".", short + "["))


# --- documents --------------------------------------------------------------------

DEV = DevIssuer("https://idp.example")
JWKS = json.dumps(DEV.jwks())
PEM = DEV.public_pem("ec-1")


def discovery(**fields: Any) -> dict[str, Any]:
    """An issuer without jwksUri: keys by OIDC discovery unless `fields` give a source."""
    return with_issuer(jwksUri=None, **fields)


def with_rules(*rules: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return policy(rules=list(rules), **spec)


def claim_header(header: str, claim: str = "sub") -> dict[str, str]:
    return {"header": header, "claim": claim}


I0, R0 = "spec.issuers[0]", "spec.rules[0]"


def case(case_id: str, doc: dict[str, Any], expected: str) -> Any:
    """A rejected document and where (for CEL rules, also what) the CRD says is wrong."""
    return pytest.param(doc, expected, id=case_id)


STATUS = {
    "observedGeneration": 3,
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "KeysLoaded",
            "message": "every issuer has keys",
            "lastTransitionTime": "2026-01-02T03:04:05Z",
            "observedGeneration": 3,
        }
    ],
    "issuers": [
        {
            "issuer": "https://idp.example",
            "ready": True,
            "keyIds": ["k1", "k2"],
            "lastError": "",
            "lastFetchTime": "2026-01-02T03:04:05Z",
        }
    ],
    "selectedWorkloads": ["Deployment/orders-api"],
    "conflicts": ["shop/older-policy"],
    "sidecars": {"current": 2, "total": 3},
}

#: Sets every field of the CRD, spec and status. Both judges must accept it, and its
#: spec fields must be exactly the CRD's and exactly the ones the parser reads.
MAXIMAL: dict[str, Any] = {
    "apiVersion": "lastguard.dev/v1alpha1",
    "kind": "JWTPolicy",
    "metadata": {"name": "maximal", "namespace": "shop"},
    "spec": {
        "selector": {"matchLabels": {"app": "orders-api", "tier": ""}},
        "issuers": [
            {
                "issuer": "https://idp.example",
                "jwksUri": "https://idp.example/jwks",
                "audiences": ["orders-api"],
                "algorithms": ["RS256", "ES256"],
                "fromHeaders": [{"name": "X-Token", "prefix": "Token "}],
                "fromParams": ["access_token"],
                "fromCookies": ["session"],
                "forwardOriginalToken": True,
                "outputPayloadToHeader": "x-jwt-payload",
                "outputClaimToHeaders": [claim_header("x-user"), claim_header("x-tenant", "t.id")],
                "clockSkewSeconds": 30,
                "maxLifetimeSeconds": 3600,
                "jwksCacheDurationSeconds": 300,
                "jwksTimeoutSeconds": 3,
            },
            {"issuer": "internal-signer", "jwks": JWKS},
            {"issuer": "legacy-signer", "publicKeys": {"k1": PEM}},
        ],
        "rules": [
            {"paths": ["/healthz"], "action": "Allow"},
            {
                "paths": ["/api/*"],
                "methods": ["GET", "head"],
                "action": "Optional",
                "requiredScopes": ["read"],
                "requiredClaims": [{"claim": "groups", "values": ["staff", "admins"]}],
            },
        ],
        "defaultAction": "Deny",
    },
    "status": STATUS,
}


# --- the CRD as a Kubernetes object ----------------------------------------------


@pytest.mark.parametrize(
    "k8s_version", sorted({"1.30", kubernetes_validate.latest_version()}), ids=lambda v: f"k8s-{v}"
)
def test_crd_is_a_valid_kubernetes_object(k8s_version: str) -> None:
    kubernetes_validate.validate(CRD, k8s_version, strict=True)


def test_crd_names_and_version() -> None:
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "jwtpolicies.lastguard.dev"
    assert (spec["group"], spec["scope"]) == ("lastguard.dev", "Namespaced")
    assert spec["names"] == {
        "kind": model.KIND,
        "listKind": "JWTPolicyList",
        "plural": "jwtpolicies",
        "singular": "jwtpolicy",
        "shortNames": ["jwtp"],
        "categories": ["lastguard"],
    }
    assert [v["name"] for v in spec["versions"]] == [model.API_VERSION.split("/")[1]]
    assert model.API_VERSION.split("/")[0] == spec["group"]
    assert VERSION["served"] and VERSION["storage"]
    assert VERSION["subresources"] == {"status": {}}
    assert [(c["name"], c["type"], c["jsonPath"]) for c in VERSION["additionalPrinterColumns"]] == [
        ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status'),
        ("Issuers", "string", ".spec.issuers[*].issuer"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]


SCHEMA_NODES = [
    pytest.param(steps, node, id=schema_path(steps) or "root")
    for steps, node in walk_schema(SCHEMA)
]


@pytest.mark.parametrize(("steps", "node"), SCHEMA_NODES)
def test_schema_node_is_structural_and_bounded(steps: Steps, node: dict[str, Any]) -> None:
    # kubernetes_validate checks the CRD's shape, not these rules the API server adds.
    # apiVersion and kind are the API server's own; everything else is bounded (a
    # date-time is, by its format).
    assert "type" in node
    assert not ("properties" in node and "additionalProperties" in node)
    own = steps not in {("apiVersion",), ("kind",)}
    if node["type"] == "string" and own and "enum" not in node and "format" not in node:
        assert "maxLength" in node, "an unbounded string makes CEL cost estimation fail"
    if node["type"] == "array":
        assert "maxItems" in node
    if isinstance(node.get("additionalProperties"), dict):
        assert "maxProperties" in node
    if "pattern" in node:
        re2.compile(node["pattern"])
    if "default" in node:
        assert not list(_Validator(_json_schema(node)).iter_errors(node["default"]))
    if node.get("x-kubernetes-list-type") == "map":
        keys = node["x-kubernetes-list-map-keys"]
        assert set(keys) <= set(node["items"].get("required", []))
    for validation in node.get("x-kubernetes-validations", []):
        assert validation["rule"].strip() and validation["message"].strip()
        assert validation.get("reason", "FieldValueInvalid") in {
            "FieldValueInvalid",
            "FieldValueForbidden",
            "FieldValueRequired",
            "FieldValueDuplicate",
        }
        if "fieldPath" in validation:
            assert validation["fieldPath"].lstrip(".") in node["properties"]


# --- one table, two judges ---------------------------------------------------------

ACCEPTED = [
    pytest.param(policy(), id="jwks-uri"),
    pytest.param(discovery(), id="oidc-discovery"),
    pytest.param(
        discovery(issuer="HTTPS://IdP.example:8443/realms/a?x=1#f"),
        id="discovery-url-any-case-port-query",
    ),
    pytest.param(discovery(issuer="http://user@idp.example"), id="discovery-url-with-userinfo"),
    pytest.param(with_issuer(jwksUri="http://[::1]:8080/jwks"), id="jwks-uri-ipv6"),
    pytest.param(with_issuer(jwksUri="https://idp.example"), id="jwks-uri-without-path"),
    pytest.param(discovery(issuer="internal-signer", jwks=JWKS), id="inline-jwks-any-issuer"),
    pytest.param(
        discovery(issuer="urn:signer", publicKeys={"k1": PEM, "k2": PEM}), id="public-keys"
    ),
    pytest.param(discovery(publicKeys={}), id="empty-public-keys-means-discovery"),
    pytest.param(
        policy(
            issuers=[], rules=[{"paths": ["/healthz"], "action": "Allow"}], defaultAction="Deny"
        ),
        id="no-issuers-when-nothing-reads-tokens",
    ),
    pytest.param(policy(issuers=None, defaultAction="Allow"), id="issuers-absent-allow-all"),
    pytest.param(with_issuer(fromParams=["access_token"]), id="params-only"),
    pytest.param(with_issuer(fromCookies=["session"]), id="cookies-only"),
    pytest.param(
        with_issuer(fromHeaders=[{"name": "X-Token", "prefix": ""}]), id="header-without-prefix"
    ),
    pytest.param(
        with_issuer(fromHeaders=[{"name": "x-token"}, {"name": "x-token"}]),
        id="repeated-token-header",
    ),
    pytest.param(
        with_issuer(
            fromParams=["access_token"], outputClaimToHeaders=[claim_header("x-token-header")]
        ),
        id="output-header-fine-without-token-headers",
    ),
    pytest.param(
        # The parser checks only claim headers against token headers, so the CRD does
        # too. Tightening this means changing both, and this case.
        with_issuer(fromHeaders=[{"name": "x-token"}], outputPayloadToHeader="X-Token"),
        id="payload-header-may-equal-token-header",
    ),
    pytest.param(
        with_issuer(outputClaimToHeaders=[claim_header("X-User"), claim_header("x-tenant")]),
        id="distinct-output-headers",
    ),
    pytest.param(with_issuer(outputPayloadToHeader="x-envoy"), id="x-envoy-without-dash-is-free"),
    pytest.param(with_issuer(clockSkewSeconds=0), id="skew-min"),
    pytest.param(with_issuer(clockSkewSeconds=600), id="skew-max"),
    pytest.param(with_issuer(clockSkewSeconds=None), id="null-is-absent"),
    pytest.param(with_issuer(maxLifetimeSeconds=1), id="lifetime-min"),
    pytest.param(with_issuer(maxLifetimeSeconds=315_360_000), id="lifetime-max"),
    pytest.param(with_issuer(jwksCacheDurationSeconds=30), id="cache-min"),
    pytest.param(with_issuer(jwksCacheDurationSeconds=86_400), id="cache-max"),
    pytest.param(with_issuer(jwksTimeoutSeconds=1), id="timeout-min"),
    pytest.param(with_issuer(jwksTimeoutSeconds=60), id="timeout-max"),
    pytest.param(with_issuer(algorithms=[]), id="empty-algorithms-means-all"),
    pytest.param(with_issuer(algorithms=list(model.SUPPORTED_ALGORITHMS)), id="every-algorithm"),
    pytest.param(with_issuer(audiences=["a", "https://api.example"]), id="audiences"),
    pytest.param(
        with_rules({"paths": ["/", "/*", "/api/*", "/a-b_c.d~e%20/f:g@h!$&'()+,;="]}),
        id="path-shapes",
    ),
    pytest.param(with_rules({"methods": ["get", "Post", "PURGE"]}), id="methods-any-case"),
    pytest.param(with_rules({"paths": [], "methods": []}), id="empty-match-lists"),
    pytest.param(with_rules({"action": "Allow", "requiredScopes": []}), id="empty-scopes-on-allow"),
    pytest.param(
        with_rules({"action": "Optional", "requiredScopes": ["read"]}), id="scopes-on-optional"
    ),
    pytest.param(
        with_rules({"requiredClaims": [{"claim": "a.b", "values": ["x"]}]}),
        id="claims-on-default-action",
    ),
    pytest.param(policy(selector={}), id="empty-selector"),
    pytest.param(policy(selector={"matchLabels": {}}), id="empty-match-labels"),
    pytest.param({**policy(), "status": STATUS}, id="with-status"),
    pytest.param(MAXIMAL, id="maximal"),
]

REJECTED_BY_SCHEMA = [
    case("no-spec", {**policy(), "spec": None}, "spec"),
    case("unknown-top-level-field", {**policy(), "typo": 1}, "typo"),
    case("unknown-spec-field", policy(typo=1), "spec.typo"),
    case(
        "match-expressions",
        policy(selector={"matchExpressions": []}),
        "spec.selector.matchExpressions",
    ),
    case(
        "label-not-string",
        policy(selector={"matchLabels": {"app": 1}}),
        "spec.selector.matchLabels.app",
    ),
    case("issuers-not-a-list", policy(issuers={"issuer": "x"}), "spec.issuers"),
    case("issuer-not-an-object", policy(issuers=["https://idp.example"]), f"{I0}"),
    case("issuer-missing", with_issuer(issuer=None), f"{I0}.issuer"),
    case("issuer-empty", with_issuer(issuer=""), f"{I0}.issuer"),
    case("unknown-issuer-field", with_issuer(typo=True), f"{I0}.typo"),
    case("jwks-uri-empty", with_issuer(jwksUri=""), f"{I0}.jwksUri"),
    case("jwks-uri-not-string", with_issuer(jwksUri=42), f"{I0}.jwksUri"),
    case("public-keys-not-a-map", discovery(publicKeys=PEM), f"{I0}.publicKeys"),
    case("public-key-not-string", discovery(publicKeys={"k1": 1}), f"{I0}.publicKeys.k1"),
    case("audiences-not-a-list", with_issuer(audiences="web"), f"{I0}.audiences"),
    case("audience-empty", with_issuer(audiences=[""]), f"{I0}.audiences[0]"),
    case("symmetric-alg", with_issuer(algorithms=["HS256"]), f"{I0}.algorithms[0]"),
    case("alg-none", with_issuer(algorithms=["none"]), f"{I0}.algorithms[0]"),
    case("alg-case", with_issuer(algorithms=["rs256"]), f"{I0}.algorithms[0]"),
    case("token-header-without-name", with_issuer(fromHeaders=[{}]), f"{I0}.fromHeaders[0].name"),
    case(
        "token-header-invalid",
        with_issuer(fromHeaders=[{"name": "bad header"}]),
        f"{I0}.fromHeaders[0].name",
    ),
    case(
        "prefix-not-string",
        with_issuer(fromHeaders=[{"name": "x", "prefix": 1}]),
        f"{I0}.fromHeaders[0].prefix",
    ),
    case(
        "unknown-token-header-field",
        with_issuer(fromHeaders=[{"name": "x", "typo": 1}]),
        f"{I0}.fromHeaders[0].typo",
    ),
    case("param-empty", with_issuer(fromParams=[""]), f"{I0}.fromParams[0]"),
    case("cookie-not-string", with_issuer(fromCookies=[7]), f"{I0}.fromCookies[0]"),
    case("forward-not-bool", with_issuer(forwardOriginalToken="yes"), f"{I0}.forwardOriginalToken"),
    case(
        "payload-header-invalid",
        with_issuer(outputPayloadToHeader="x:payload"),
        f"{I0}.outputPayloadToHeader",
    ),
    case(
        "payload-header-empty", with_issuer(outputPayloadToHeader=""), f"{I0}.outputPayloadToHeader"
    ),
    case(
        "claim-header-invalid",
        with_issuer(outputClaimToHeaders=[claim_header("bad header")]),
        f"{I0}.outputClaimToHeaders[0].header",
    ),
    case(
        "claim-header-without-claim",
        with_issuer(outputClaimToHeaders=[{"header": "x-user"}]),
        f"{I0}.outputClaimToHeaders[0].claim",
    ),
    case(
        "claim-header-empty-claim",
        with_issuer(outputClaimToHeaders=[claim_header("x-user", "")]),
        f"{I0}.outputClaimToHeaders[0].claim",
    ),
    case("bool-is-not-int", with_issuer(clockSkewSeconds=True), f"{I0}.clockSkewSeconds"),
    case("string-is-not-int", with_issuer(clockSkewSeconds="60"), f"{I0}.clockSkewSeconds"),
    case("skew-negative", with_issuer(clockSkewSeconds=-1), f"{I0}.clockSkewSeconds"),
    case("skew-too-large", with_issuer(clockSkewSeconds=601), f"{I0}.clockSkewSeconds"),
    case("lifetime-zero", with_issuer(maxLifetimeSeconds=0), f"{I0}.maxLifetimeSeconds"),
    case(
        "lifetime-over-ten-years",
        with_issuer(maxLifetimeSeconds=315_360_001),
        f"{I0}.maxLifetimeSeconds",
    ),
    case(
        "cache-too-short",
        with_issuer(jwksCacheDurationSeconds=29),
        f"{I0}.jwksCacheDurationSeconds",
    ),
    case(
        "cache-too-long",
        with_issuer(jwksCacheDurationSeconds=86_401),
        f"{I0}.jwksCacheDurationSeconds",
    ),
    case("timeout-zero", with_issuer(jwksTimeoutSeconds=0), f"{I0}.jwksTimeoutSeconds"),
    case("timeout-too-long", with_issuer(jwksTimeoutSeconds=61), f"{I0}.jwksTimeoutSeconds"),
    case("rules-not-a-list", policy(rules={"paths": ["/"]}), "spec.rules"),
    case("unknown-rule-field", with_rules({"typo": 1}), f"{R0}.typo"),
    case("paths-not-a-list", with_rules({"paths": "/api/*"}), f"{R0}.paths"),
    case("relative-path", with_rules({"paths": ["api"]}), f"{R0}.paths[0]"),
    case("empty-path", with_rules({"paths": [""]}), f"{R0}.paths[0]"),
    case("inner-wildcard", with_rules({"paths": ["/a*b"]}), f"{R0}.paths[0]"),
    case("double-wildcard", with_rules({"paths": ["/**"]}), f"{R0}.paths[0]"),
    case("query-in-path", with_rules({"paths": ["/a?x=1"]}), f"{R0}.paths[0]"),
    case("fragment-in-path", with_rules({"paths": ["/a#top"]}), f"{R0}.paths[0]"),
    case("space-in-path", with_rules({"paths": ["/a b"]}), f"{R0}.paths[0]"),
    case("nbsp-in-path", with_rules({"paths": ["/a\u00a0b"]}), f"{R0}.paths[0]"),
    case("line-separator-in-path", with_rules({"paths": ["/a\u2028"]}), f"{R0}.paths[0]"),
    case("method-with-digit", with_rules({"methods": ["G3T"]}), f"{R0}.methods[0]"),
    case("method-empty", with_rules({"methods": [""]}), f"{R0}.methods[0]"),
    case("two-methods-in-one", with_rules({"methods": ["GET POST"]}), f"{R0}.methods[0]"),
    case("bad-action", with_rules({"action": "Permit"}), f"{R0}.action"),
    case("action-case", with_rules({"action": "allow"}), f"{R0}.action"),
    case("bad-default-action", policy(defaultAction="Reject"), "spec.defaultAction"),
    case("scopes-not-a-list", with_rules({"requiredScopes": "read"}), f"{R0}.requiredScopes"),
    case(
        "claim-without-values",
        with_rules({"requiredClaims": [{"claim": "g"}]}),
        f"{R0}.requiredClaims[0].values",
    ),
    case(
        "claim-with-no-values",
        with_rules({"requiredClaims": [{"claim": "g", "values": []}]}),
        f"{R0}.requiredClaims[0].values",
    ),
    case(
        "claim-without-name",
        with_rules({"requiredClaims": [{"values": ["x"]}]}),
        f"{R0}.requiredClaims[0].claim",
    ),
    case(
        "claim-empty-value",
        with_rules({"requiredClaims": [{"claim": "g", "values": [""]}]}),
        f"{R0}.requiredClaims[0].values[0]",
    ),
]

REJECTED_BY_CEL = [
    case(
        "jwks-uri-and-jwks",
        with_issuer(jwks=JWKS),
        f"{I0}: set only one of jwksUri, jwks, publicKeys",
    ),
    case(
        "jwks-uri-and-public-keys",
        with_issuer(publicKeys={"k1": PEM}),
        f"{I0}: set only one of jwksUri, jwks, publicKeys",
    ),
    case(
        "jwks-and-public-keys",
        discovery(jwks=JWKS, publicKeys={"k1": PEM}),
        f"{I0}: set only one of jwksUri, jwks, publicKeys",
    ),
    case(
        "discovery-needs-url-issuer",
        discovery(issuer="not-a-url"),
        f"{I0}.issuer: must be an http(s) URL when no jwksUri, jwks or publicKeys",
    ),
    case(
        "discovery-needs-http",
        discovery(issuer="ftp://idp.example"),
        f"{I0}.issuer: must be an http(s) URL when no jwksUri",
    ),
    case(
        "discovery-url-without-host",
        discovery(issuer="https://"),
        f"{I0}.issuer: must be an http(s) URL when no jwksUri",
    ),
    case(
        "empty-public-keys-are-no-source",
        discovery(issuer="idp.example", publicKeys={}),
        f"{I0}.issuer: must be an http(s) URL when no jwksUri",
    ),
    case(
        "jwks-uri-not-http", with_issuer(jwksUri="ftp://x"), f"{I0}.jwksUri: must be an http(s) URL"
    ),
    case(
        "jwks-uri-without-scheme",
        with_issuer(jwksUri="idp.example/jwks"),
        f"{I0}.jwksUri: must be an http(s) URL",
    ),
    case(
        "jwks-uri-empty-host",
        with_issuer(jwksUri="https:///jwks"),
        f"{I0}.jwksUri: must be an http(s) URL",
    ),
    case(
        "jwks-uri-port-without-host",
        with_issuer(jwksUri="http://:8080/jwks"),
        f"{I0}.jwksUri: must be an http(s) URL",
    ),
    case(
        "jwks-uri-userinfo-without-host",
        with_issuer(jwksUri="https://user@:443/jwks"),
        f"{I0}.jwksUri: must be an http(s) URL",
    ),
    case(
        "jwks-uri-without-slashes",
        with_issuer(jwksUri="https:idp.example/jwks"),
        f"{I0}.jwksUri: must be an http(s) URL",
    ),
    case(
        "inline-jwks-not-json",
        discovery(jwks="{not json"),
        f"{I0}.jwks: must be a JWKS JSON document",
    ),
    case(
        "inline-jwks-array",
        discovery(jwks="[" + JWKS + "]"),
        f"{I0}.jwks: must be a JWKS JSON document",
    ),
    case("inline-jwks-is-pem", discovery(jwks=PEM), f"{I0}.jwks: must be a JWKS JSON document"),
    case(
        "public-key-not-pem",
        discovery(publicKeys={"k1": "not pem"}),
        f"{I0}.publicKeys.k1: must be a PEM public key or X.509 certificate",
    ),
    case(
        "reserved-claim-header",
        with_issuer(outputClaimToHeaders=[claim_header("Host")]),
        f"{I0}.outputClaimToHeaders[0].header: is reserved",
    ),
    case(
        "reserved-payload-header",
        with_issuer(outputPayloadToHeader="Authorization"),
        f"{I0}.outputPayloadToHeader: is reserved",
    ),
    case(
        "x-envoy-header",
        with_issuer(outputClaimToHeaders=[claim_header("X-Envoy-Original-Path")]),
        f"{I0}.outputClaimToHeaders[0].header: is reserved",
    ),
    case(
        "duplicate-claim-headers",
        with_issuer(outputClaimToHeaders=[claim_header("x-a"), claim_header("X-A", "email")]),
        f"{I0}.outputClaimToHeaders: each output header may be set only once",
    ),
    case(
        "payload-header-is-claim-header",
        with_issuer(outputPayloadToHeader="x-user", outputClaimToHeaders=[claim_header("X-User")]),
        f"{I0}.outputClaimToHeaders: each output header may be set only once",
    ),
    case(
        "claim-header-is-token-header",
        with_issuer(
            fromHeaders=[{"name": "X-Token"}], outputClaimToHeaders=[claim_header("x-token")]
        ),
        f"{I0}.outputClaimToHeaders: must not be a header tokens are read from",
    ),
    case(
        "duplicate-issuer",
        policy(
            issuers=[
                {"issuer": "https://a.example"},
                {"issuer": "https://b.example"},
                {"issuer": "https://a.example", "jwksUri": "https://a.example/k"},
            ]
        ),
        "spec.issuers: each issuer may be listed only once",
    ),
    case(
        "scopes-on-allow",
        with_rules({"action": "Allow", "requiredScopes": ["x"]}),
        f"{R0}: requiredScopes and requiredClaims need action Authenticate or Optional",
    ),
    case(
        "claims-on-deny",
        with_rules(
            {"action": "Allow"},
            {"action": "Deny", "requiredClaims": [{"claim": "g", "values": ["x"]}]},
        ),
        "spec.rules[1]: requiredScopes and requiredClaims need action Authenticate or Optional",
    ),
    case(
        "default-action-needs-issuer",
        policy(issuers=[]),
        "spec.issuers: at least one issuer is required when any action is Authenticate or Optional",
    ),
    case(
        "optional-rule-needs-issuer",
        policy(issuers=None, defaultAction="Deny", rules=[{"action": "Optional"}]),
        "spec.issuers: at least one issuer is required",
    ),
    case(
        "rule-without-action-authenticates",
        policy(issuers=[], defaultAction="Deny", rules=[{"action": "Allow"}, {"paths": ["/a"]}]),
        "spec.issuers: at least one issuer is required",
    ),
    case(
        "empty-spec",
        {**policy(issuers=[]), "spec": {}},
        "spec.issuers: at least one issuer is required",
    ),
]


@pytest.mark.parametrize("doc", ACCEPTED)
def test_both_accept(doc: dict[str, Any]) -> None:
    assert crd_problems(doc) == []
    assert parser_problems(doc) == []


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_samples_pass_both(sample: Path) -> None:
    doc = yaml.safe_load(sample.read_text())
    assert crd_problems(doc) == []
    assert parser_problems(doc) == []


def _assert_both_reject(doc: dict[str, Any], path: str, fragment: str, *, by_cel: bool) -> None:
    crd = crd_problems(doc)
    assert any(p.path == path and fragment in p.message for p in crd), [str(p) for p in crd]
    assert all((p.rule is not None) == by_cel for p in crd), [str(p) for p in crd]
    parser = parser_problems(doc)
    assert parser, "the parser accepted what the CRD rejects"
    assert any(_same_field(p.split(": ", 1)[0], path) for p in parser), (path, parser)


@pytest.mark.parametrize(("doc", "path"), REJECTED_BY_SCHEMA)
def test_schema_rejects_and_so_does_the_parser(doc: dict[str, Any], path: str) -> None:
    _assert_both_reject(doc, path, "", by_cel=False)


@pytest.mark.parametrize(("doc", "expected"), REJECTED_BY_CEL)
def test_cel_rejects_and_so_does_the_parser(doc: dict[str, Any], expected: str) -> None:
    path, message = expected.split(": ", 1)
    _assert_both_reject(doc, path, message, by_cel=True)


def test_every_cel_rule_has_a_rejecting_case() -> None:
    fired = {
        id(p.rule)
        for param in REJECTED_BY_CEL
        for p in crd_problems(param.values[0])
        if p.rule is not None
    }
    assert [r.where + ": " + r.message for r in CEL_RULES if id(r) not in fired] == []


OUTPUT_HEADER_PLACES = {
    "payload": lambda header: with_issuer(outputPayloadToHeader=header),
    "claim": lambda header: with_issuer(outputClaimToHeaders=[claim_header(header)]),
}


@pytest.mark.parametrize("place", OUTPUT_HEADER_PLACES)
@pytest.mark.parametrize(
    "header",
    [*sorted(fields.RESERVED_HEADERS), "Content-Type", "X-ENVOY-ORIGINAL-PATH", "x-envoy-x"],
)
def test_every_reserved_header_is_refused_by_both(place: str, header: str) -> None:
    doc = OUTPUT_HEADER_PLACES[place](header)
    crd = crd_problems(doc)
    assert crd and all(p.message.startswith("is reserved") for p in crd), [str(p) for p in crd]
    assert any("is reserved" in p for p in parser_problems(doc))


def _char_verdicts(
    make: Callable[[str], dict[str, Any]], chars: list[str]
) -> list[tuple[str, bool, bool]]:
    """(char, CRD accepts, parser accepts) for the document `make(char)`; only disagreements."""
    out = []
    for c in chars:
        doc = make(c)
        crd, parser = not crd_problems(doc), not parser_problems(doc)
        if crd != parser:
            out.append((c, crd, parser))
    return out


ASCII = [chr(i) for i in range(128)]


def test_header_name_characters_agree() -> None:
    chars = [*ASCII, "\u00e9", "\u00a0", "\u212a"]
    assert (
        _char_verdicts(lambda c: with_issuer(outputClaimToHeaders=[claim_header(f"x-{c}a")]), chars)
        == []
    )
    assert _char_verdicts(lambda c: with_issuer(fromHeaders=[{"name": f"x-{c}a"}]), chars) == []


def test_method_characters_agree() -> None:
    chars = [*ASCII, "\u00e9", "\u00c9"]
    assert _char_verdicts(lambda c: with_rules({"methods": [f"G{c}T"]}), chars) == []


def test_path_characters_agree() -> None:
    # The parser refuses '?', '#', an inner '*' and whatever Python's \s (str.isspace)
    # matches; the CRD spells that set out for RE2. Candidates are every character of
    # the Basic Multilingual Plane (all whitespace lives there) that either side
    # treats specially, plus a few ordinary ones.
    pattern = node_at("spec", "rules", "[]", "paths", "[]")["pattern"]
    special = [
        chr(cp)
        for cp in range(0x10000)
        if not 0xD800 <= cp <= 0xDFFF
        and (chr(cp).isspace() or not re2.search(pattern, f"/a{chr(cp)}b"))
    ]
    assert len(special) > 25  # the whitespace set really was enumerated
    chars = [*special, "a", "%", "~", "\u00e9", "\u200b", "\U0001f600"]
    assert _char_verdicts(lambda c: with_rules({"paths": [f"/a{c}b"]}), chars) == []


# --- cases that once diverged, and where the two cannot agree ----------------------
#
# These were found where the parser was laxer than the CRD (fixed since) or had no
# bounds; they must now agree like every other case.

LONG = "x" * 257
FORMERLY_DIVERGENT = [
    pytest.param(with_rules({"paths": ["/api\n"]}), id="path-with-trailing-newline"),
    pytest.param(
        with_issuer(outputClaimToHeaders=[claim_header("x-user\n")]),
        id="header-with-trailing-newline",
    ),
    pytest.param(with_rules({"methods": ["GET\n"]}), id="method-with-trailing-newline"),
    pytest.param(with_rules({"methods": ["po\u017ft"]}), id="method-with-long-s"),
    pytest.param(with_issuer(jwksUri=" https://idp.example/jwks"), id="url-with-leading-space"),
    pytest.param(with_issuer(jwksUri="ht\ttps://idp.example/jwks"), id="url-with-tab"),
    pytest.param(with_issuer(jwksUri="http://junk[::1]/jwks"), id="url-text-before-ipv6-literal"),
    pytest.param(with_issuer(clockSkewSeconds=60.0), id="integral-float"),
    pytest.param(
        with_rules({"requiredClaims": [{"claim": LONG, "values": ["x"]}]}),
        id="longer-than-max-length",
    ),
    pytest.param(
        policy(issuers=[{"issuer": f"https://idp{i}.example"} for i in range(17)]),
        id="more-than-max-items",
    ),
]


@pytest.mark.parametrize("doc", FORMERLY_DIVERGENT)
def test_formerly_divergent_cases_agree(doc: dict[str, Any]) -> None:
    assert (crd_problems(doc) == []) == (parser_problems(doc) == [])


# CEL cannot parse JSON or decode keys: the API server accepts these, the parser
# (run by the operator, which reports the problems in the policy's status, and by
# the sidecar, which then keeps the last good policy) rejects them.
CEL_CANNOT_DECODE = [
    pytest.param(discovery(jwks='{"keys": []}'), id="inline-jwks-empty-key-set"),
    pytest.param(
        discovery(jwks=json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}]})),
        id="inline-jwks-without-usable-key",
    ),
    pytest.param(
        discovery(
            publicKeys={"k1": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"}
        ),
        id="public-key-malformed-pem",
    ),
]


@pytest.mark.parametrize("doc", CEL_CANNOT_DECODE)
def test_key_material_is_checked_by_the_parser_only(doc: dict[str, Any]) -> None:
    assert crd_problems(doc) == []
    assert parser_problems(doc) != []


# --- defaults ---------------------------------------------------------------------


@pytest.mark.parametrize("doc", [*ACCEPTED, *(yaml.safe_load(p.read_text()) for p in SAMPLES)])
def test_crd_defaults_change_nothing_the_parser_builds(doc: dict[str, Any]) -> None:
    # The API server stores the object with its defaults filled in; the operator then
    # parses that. It must build the very policy the undefaulted document gives.
    assert parse.parse_policy(as_stored(doc)) == parse.parse_policy(copy.deepcopy(doc))


def test_crd_defaults_are_the_model_defaults() -> None:
    issuer = model.Issuer(issuer="x")
    stored = as_stored(
        policy(
            issuers=[{"issuer": "https://idp.example", "fromHeaders": [{"name": "x-token"}]}],
            rules=[{}],
        )
    )
    spec = stored["spec"]
    assert spec["defaultAction"] == model.JWTPolicy("shop", "p").default_action.value
    assert spec["rules"][0]["action"] == model.Rule().action.value
    assert spec["issuers"][0] == {
        "issuer": "https://idp.example",
        "fromHeaders": [{"name": "x-token", "prefix": model.HeaderLocation("x").prefix}],
        "forwardOriginalToken": issuer.forward_original_token,
        "clockSkewSeconds": issuer.clock_skew_seconds,
        "jwksCacheDurationSeconds": issuer.jwks_cache_duration_seconds,
        "jwksTimeoutSeconds": issuer.jwks_timeout_seconds,
    }


@pytest.mark.parametrize("field", ["fromHeaders", "algorithms"])
def test_no_schema_default_where_absence_means_something(field: str) -> None:
    # Absent fromHeaders means Authorization/"Bearer " only when no other location is
    # given; absent algorithms means every supported one, including future ones.
    node = node_at("spec", "issuers", "[]", field)
    assert "default" not in node and "minItems" not in node
    assert "no schema default" in " ".join(node["description"].split())


# --- the schema and the model say the same things ---------------------------------


def _enum(*steps: str) -> list[str]:
    return list(node_at(*steps)["enum"])


def test_enums_are_the_models() -> None:
    assert _enum("spec", "issuers", "[]", "algorithms", "[]") == list(model.SUPPORTED_ALGORITHMS)
    actions = [a.value for a in model.Action]
    assert _enum("spec", "rules", "[]", "action") == actions
    assert _enum("spec", "defaultAction") == actions


@pytest.mark.parametrize(
    ("field", "low", "high", "default"),
    [
        ("clockSkewSeconds", 0, parse.MAX_CLOCK_SKEW_SECONDS, model.DEFAULT_CLOCK_SKEW_SECONDS),
        ("maxLifetimeSeconds", 1, 10 * 365 * 86_400, None),
        (
            "jwksCacheDurationSeconds",
            parse.MIN_JWKS_CACHE_SECONDS,
            parse.MAX_JWKS_CACHE_SECONDS,
            model.DEFAULT_JWKS_CACHE_SECONDS,
        ),
        ("jwksTimeoutSeconds", 1, 60, model.DEFAULT_JWKS_TIMEOUT_SECONDS),
    ],
)
def test_integer_bounds_are_the_parsers(
    field: str, low: int, high: int, default: int | None
) -> None:
    node = node_at("spec", "issuers", "[]", field)
    assert (node["type"], node["minimum"], node["maximum"], node.get("default")) == (
        "integer",
        low,
        high,
        default,
    )


@pytest.mark.parametrize(
    "steps",
    [
        ("spec", "issuers", "[]", "outputPayloadToHeader"),
        ("spec", "issuers", "[]", "outputClaimToHeaders", "[]", "header"),
    ],
    ids=["payload", "claim"],
)
def test_reserved_header_list_is_the_parsers(steps: Steps) -> None:
    (rule,) = node_at(*steps)["x-kubernetes-validations"]
    listed = re.search(r"in \[(.*?)\]", rule["rule"], re.S)
    assert listed is not None
    assert set(re.findall(r"'([^']*)'", listed[1])) == fields.RESERVED_HEADERS


# --- drift: a field in the parser, the model or the CRD but not in the others ------


def _schema_fields(prefix: str) -> set[str]:
    """Every property path under `prefix`, as spec.issuers[].fromHeaders[].name."""
    out = set()
    for steps, _ in walk_schema(SCHEMA):
        if len(steps) > 1 and steps[0] == prefix and steps[-1] not in ("[]", "{}"):
            out.add(schema_path(steps))
    return out


def _document_fields(value: Any, node: dict[str, Any], path: str) -> set[str]:
    out = set()
    if isinstance(value, dict) and "properties" in node:
        for key, item in value.items():
            sub = f"{path}.{key}"
            out.add(sub)
            out |= _document_fields(item, node["properties"].get(key, {}), sub)
    elif isinstance(value, list) and "items" in node:
        for item in value:
            out |= _document_fields(item, node["items"], f"{path}[]")
    return out


def test_maximal_policy_passes_both() -> None:
    assert crd_problems(MAXIMAL) == []
    assert parser_problems(MAXIMAL) == []


@pytest.mark.parametrize("part", ["spec", "status"])
def test_maximal_policy_sets_every_crd_field(part: str) -> None:
    fields = _document_fields(MAXIMAL[part], SCHEMA["properties"][part], part)
    assert fields == _schema_fields(part)


def test_parser_reads_exactly_the_crd_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every field the parser knows goes through fields.Object.get, asked for whether or not
    # the document has it; recording those calls while it reads MAXIMAL (which has
    # every kind of object) lists the fields it accepts. A field added to the parser
    # and not to the CRD, or the other way round, fails here.
    asked: set[str] = set()
    real_get = fields.Object.get

    def spy(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        asked.add(re.sub(r"\[\d+\]", "[]", f"{self.path}.{key}" if self.path else key))
        return real_get(self, key, *args, **kwargs)

    monkeypatch.setattr(fields.Object, "get", spy)
    parse.parse_policy(copy.deepcopy(MAXIMAL))
    assert {f for f in asked if f.startswith("spec.")} == _schema_fields("spec")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


MODEL_OBJECTS = {
    model.Issuer: "spec.issuers[]",
    model.HeaderLocation: "spec.issuers[].fromHeaders[]",
    model.ClaimToHeader: "spec.issuers[].outputClaimToHeaders[]",
    model.Rule: "spec.rules[]",
    model.RequiredClaim: "spec.rules[].requiredClaims[]",
}
#: JWTPolicy fields that do not come from a spec field of the same name.
POLICY_FIELDS = {
    "match_labels": "spec.selector.matchLabels",
    "namespace": None,  # metadata
    "name": None,
    "creation_timestamp": None,
    "generation": None,
    "uid": None,
}


def test_every_model_field_is_in_the_crd() -> None:
    expected = set()
    for cls, where in MODEL_OBJECTS.items():
        expected |= {f"{where}.{_camel(f)}" for f in cls.__dataclass_fields__}
    for f in model.JWTPolicy.__dataclass_fields__:
        path = POLICY_FIELDS.get(f, f"spec.{_camel(f)}")
        if path:
            expected.add(path)
    assert expected - _schema_fields("spec") == set()


def test_python_has_the_whitespace_the_crd_path_pattern_spells_out() -> None:
    # The path pattern lists Python's whitespace for RE2; this fails if a future
    # Unicode version adds some, so the pattern can be updated with it.
    spaces = {chr(cp) for cp in range(sys.maxunicode + 1) if chr(cp).isspace()}
    pattern = re2.compile(node_at("spec", "rules", "[]", "paths", "[]")["pattern"])
    assert [hex(ord(c)) for c in sorted(spaces) if pattern.search(f"/a{c}b")] == []
