"""Turns JWTPolicy documents (YAML or already-decoded dicts) into the model.

Pure and strict: unknown fields, wrong types and impossible combinations are
errors, each reported with its field path (``spec.issuers[0].jwksUri: must be
an http(s) URL``). All problems of a document are collected, not just the first.
The CRD schema and its CEL rules express the same constraints for the API server;
this module is the reference both the sidecar and the operator run.

Reading typed fields and collecting problems is `lastguard.sidecar.policy.fields`;
this module knows what a JWTPolicy holds: issuers, rules and the document around them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import yaml

from lastguard.sidecar import keys
from lastguard.sidecar.errors import PolicyError
from lastguard.sidecar.policy import fields, model

_METHOD = re.compile(r"[A-Z]+")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_PATH = re.compile(r"/[^?#*\s]*\*?")

MAX_CLOCK_SKEW_SECONDS = 600
MIN_JWKS_CACHE_SECONDS = 30
MAX_JWKS_CACHE_SECONDS = 86_400


# --- issuers ----------------------------------------------------------------


def _header_location(raw: Any, path: str, problems: fields.Problems) -> model.HeaderLocation | None:
    obj = fields.as_object(raw, path, problems)
    if obj is None:
        return None
    name = obj.string("name", required=True)
    prefix = obj.get("prefix", str, "")
    obj.finish()
    if name is None:
        return None
    if not fields.HEADER_NAME.fullmatch(name):
        problems.add(f"{path}.name", "must be a valid HTTP header name")
        return None
    return model.HeaderLocation(name=name.lower(), prefix=prefix)


def _claim_to_header(raw: Any, path: str, problems: fields.Problems) -> model.ClaimToHeader | None:
    obj = fields.as_object(raw, path, problems)
    if obj is None:
        return None
    header = fields.header_name(obj.string("header", required=True), f"{path}.header", problems)
    claim = obj.string("claim", required=True)
    obj.finish()
    if header is None or claim is None:
        return None
    return model.ClaimToHeader(header=header, claim=claim)


def _inline_jwks(value: str, path: str, problems: fields.Problems) -> None:
    try:
        doc = json.loads(value)
    except (ValueError, RecursionError):
        problems.add(path, "must be a JWKS JSON document")
        return
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or not doc["keys"]:
        problems.add(path, 'must be a JWKS JSON object with a non-empty "keys" array')
        return
    keyset, skipped = keys.parse_jwks(doc)
    if not keyset.keys:
        problems.add(path, "has no usable key: " + "; ".join(skipped))


def _public_keys(obj: fields.Object) -> tuple[tuple[str, str], ...]:
    raw = obj.get("publicKeys", dict, {})
    out = []
    for kid, pem in sorted(raw.items()):
        path = f"{obj.path}.publicKeys.{kid}"
        if not isinstance(pem, str) or "-----BEGIN" not in pem:
            obj.problems.add(path, "must be a PEM public key or X.509 certificate")
            continue
        if len(pem) > fields.MAX_LENGTH["publicKeys"]:
            obj.problems.add(path, f"must be at most {fields.MAX_LENGTH['publicKeys']} characters")
            continue
        keyset, skipped = keys.parse_pem_keys([(str(kid), pem)])
        if not keyset.keys:
            obj.problems.add(path, "; ".join(skipped) or "is not a usable public key")
            continue
        out.append((str(kid), pem))
    return tuple(out)


def _issuer(raw: Any, path: str, problems: fields.Problems) -> model.Issuer | None:
    obj = fields.as_object(raw, path, problems)
    if obj is None:
        return None
    issuer = obj.string("issuer", required=True)
    jwks_uri = obj.string("jwksUri")
    jwks = obj.string("jwks")
    public_keys = _public_keys(obj)

    sources = [
        n for n, v in (("jwksUri", jwks_uri), ("jwks", jwks), ("publicKeys", public_keys)) if v
    ]
    if len(sources) > 1:
        problems.add(
            path, f"set only one of jwksUri, jwks, publicKeys (found {', '.join(sources)})"
        )
    if jwks_uri is not None and not fields.is_http_url(jwks_uri):
        problems.add(f"{path}.jwksUri", "must be an http(s) URL")
    if jwks is not None:
        _inline_jwks(jwks, f"{path}.jwks", problems)
    if not sources and issuer is not None and not fields.is_http_url(issuer):
        problems.add(
            f"{path}.issuer",
            "must be an http(s) URL when no jwksUri, jwks or publicKeys is set (OIDC discovery)",
        )

    audiences = obj.strings("audiences")
    algorithms = obj.strings("algorithms")
    for i, alg in enumerate(algorithms):
        if alg not in model.SUPPORTED_ALGORITHMS:
            hint = " (symmetric algorithms are not supported)" if alg.startswith("HS") else ""
            problems.add(
                f"{path}.algorithms[{i}]",
                f"unsupported algorithm {alg!r}{hint}; use one of "
                + ", ".join(model.SUPPORTED_ALGORITHMS),
            )

    from_headers = obj.items("fromHeaders", lambda r, p: _header_location(r, p, problems))
    from_params = obj.strings("fromParams")
    from_cookies = obj.strings("fromCookies")
    if not (from_headers or from_params or from_cookies):
        from_headers = [model.HeaderLocation("authorization", "Bearer ")]

    payload_header = fields.header_name(
        obj.string("outputPayloadToHeader"), f"{path}.outputPayloadToHeader", problems
    )
    claim_headers = obj.items("outputClaimToHeaders", lambda r, p: _claim_to_header(r, p, problems))
    token_headers = {loc.name for loc in from_headers}
    for i, out in enumerate(claim_headers):
        if out.header in token_headers:
            problems.add(
                f"{path}.outputClaimToHeaders[{i}].header",
                "must not be a header tokens are read from",
            )
    outputs = [c.header for c in claim_headers] + ([payload_header] if payload_header else [])
    if len(set(outputs)) != len(outputs):
        problems.add(f"{path}.outputClaimToHeaders", "each output header may be set only once")

    skew = obj.integer(
        "clockSkewSeconds", model.DEFAULT_CLOCK_SKEW_SECONDS, 0, MAX_CLOCK_SKEW_SECONDS
    )
    lifetime = obj.integer("maxLifetimeSeconds", None, 1, 10 * 365 * 86_400)
    cache = obj.integer(
        "jwksCacheDurationSeconds",
        model.DEFAULT_JWKS_CACHE_SECONDS,
        MIN_JWKS_CACHE_SECONDS,
        MAX_JWKS_CACHE_SECONDS,
    )
    timeout = obj.integer("jwksTimeoutSeconds", model.DEFAULT_JWKS_TIMEOUT_SECONDS, 1, 60)
    forward = obj.get("forwardOriginalToken", bool, False)
    obj.finish()
    if issuer is None:
        return None
    return model.Issuer(
        issuer=issuer,
        jwks_uri=jwks_uri,
        jwks=jwks,
        public_keys=public_keys,
        audiences=tuple(audiences),
        algorithms=tuple(algorithms) or model.SUPPORTED_ALGORITHMS,
        from_headers=tuple(from_headers),
        from_params=tuple(from_params),
        from_cookies=tuple(from_cookies),
        forward_original_token=forward,
        output_payload_to_header=payload_header,
        output_claim_to_headers=tuple(claim_headers),
        clock_skew_seconds=skew if skew is not None else model.DEFAULT_CLOCK_SKEW_SECONDS,
        max_lifetime_seconds=lifetime,
        jwks_cache_duration_seconds=cache or model.DEFAULT_JWKS_CACHE_SECONDS,
        jwks_timeout_seconds=timeout or model.DEFAULT_JWKS_TIMEOUT_SECONDS,
    )


# --- rules ------------------------------------------------------------------


def _action(value: str | None, path: str, problems: fields.Problems) -> model.Action | None:
    if value is None:
        return None
    try:
        return model.Action(value)
    except ValueError:
        problems.add(path, "must be one of " + ", ".join(a.value for a in model.Action))
        return None


def _path_pattern(raw: Any, path: str, problems: fields.Problems) -> str | None:
    value = fields.string_item(raw, path, problems, fields.MAX_LENGTH["paths"])
    if value is not None and not _PATH.fullmatch(value):
        problems.add(
            path, "must start with '/', contain no '?', '#' or spaces, and use '*' only at the end"
        )
        return None
    return value


def _method(raw: Any, path: str, problems: fields.Problems) -> str | None:
    value = fields.string_item(raw, path, problems)
    if value is not None and not (value.isascii() and _METHOD.fullmatch(value.upper())):
        problems.add(path, "must be an HTTP method name")
        return None
    return None if value is None else value.upper()


def _required_claim(raw: Any, path: str, problems: fields.Problems) -> model.RequiredClaim | None:
    obj = fields.as_object(raw, path, problems)
    if obj is None:
        return None
    claim = obj.string("claim", required=True)
    values = obj.strings("values")
    if not values:
        problems.add(f"{path}.values", "must list at least one value")
    obj.finish()
    if claim is None or not values:
        return None
    return model.RequiredClaim(claim=claim, values=tuple(values))


def _rule(raw: Any, path: str, problems: fields.Problems) -> model.Rule | None:
    obj = fields.as_object(raw, path, problems)
    if obj is None:
        return None
    paths = obj.items("paths", lambda r, p: _path_pattern(r, p, problems))
    methods = obj.items("methods", lambda r, p: _method(r, p, problems))
    action = _action(obj.string("action"), f"{path}.action", problems) or model.Action.AUTHENTICATE
    scopes = obj.strings("requiredScopes")
    claims = obj.items("requiredClaims", lambda r, p: _required_claim(r, p, problems))
    obj.finish()
    if (scopes or claims) and not action.reads_tokens:
        problems.add(
            path,
            "requiredScopes and requiredClaims need action Authenticate or Optional, "
            f"not {action.value}",
        )
    return model.Rule(
        paths=tuple(paths),
        methods=tuple(dict.fromkeys(methods)),
        action=action,
        required_scopes=tuple(scopes),
        required_claims=tuple(claims),
    )


# --- documents --------------------------------------------------------------


def _metadata(obj: fields.Object, default_namespace: str) -> tuple[str | None, str, dict[str, Any]]:
    meta = obj.get("metadata", dict, required=True) or {}
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS_SUBDOMAIN.fullmatch(name) or len(name) > 253:
        obj.problems.add("metadata.name", "must be a lower-case DNS subdomain name")
        name = None
    namespace = meta.get("namespace", default_namespace)
    if not isinstance(namespace, str) or not _DNS_SUBDOMAIN.fullmatch(namespace):
        obj.problems.add("metadata.namespace", "must be a lower-case DNS label")
        namespace = default_namespace
    return name, namespace, meta


def parse_policy(doc: Any, default_namespace: str = "default") -> model.JWTPolicy:
    """Validates one JWTPolicy object (as decoded from YAML/JSON) and builds the model.

    Raises PolicyError listing every problem with its field path.
    """
    problems = fields.Problems()
    root = fields.as_object(doc, "", problems)
    if root is None:
        raise PolicyError(["document must be a JWTPolicy object"])
    api_version = root.get("apiVersion", str, required=True)
    kind = root.get("kind", str, required=True)
    if api_version is not None and api_version != model.API_VERSION:
        problems.add("apiVersion", f"must be {model.API_VERSION}")
    if kind is not None and kind != model.KIND:
        problems.add("kind", f"must be {model.KIND}")
    name, namespace, meta = _metadata(root, default_namespace)
    root.get("status", dict)  # written by the operator; ignored here
    spec = root.obj("spec", required=True)
    root.finish()
    if spec is None:
        raise PolicyError(problems.items)

    selector = spec.obj("selector")
    match_labels: tuple[tuple[str, str], ...] | None = None
    if selector is not None:
        labels = selector.get("matchLabels", dict, {})
        bad = [k for k, v in labels.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            problems.add("spec.selector.matchLabels", "keys and values must be strings")
        elif any(len(v) > fields.MAX_LENGTH["matchLabels"] for v in labels.values()):
            problems.add("spec.selector.matchLabels", "label values must be at most 63 characters")
        match_labels = tuple(sorted((str(k), str(v)) for k, v in labels.items())) or None
        selector.finish()

    issuers = spec.items("issuers", lambda r, p: _issuer(r, p, problems))
    seen: dict[str, int] = {}
    for i, iss in enumerate(issuers):
        if iss.issuer in seen:
            problems.add(
                f"spec.issuers[{i}].issuer", f"duplicates spec.issuers[{seen[iss.issuer]}]"
            )
        seen.setdefault(iss.issuer, i)
    rules = spec.items("rules", lambda r, p: _rule(r, p, problems))
    default_action = (
        _action(spec.string("defaultAction"), "spec.defaultAction", problems)
        or model.Action.AUTHENTICATE
    )
    spec.finish()
    if not issuers and (default_action.reads_tokens or any(r.action.reads_tokens for r in rules)):
        problems.add(
            "spec.issuers",
            "at least one issuer is required when any action is Authenticate or Optional",
        )

    if problems.items:
        raise PolicyError(problems.items)
    assert name is not None
    generation = meta.get("generation")
    return model.JWTPolicy(
        namespace=namespace,
        name=name,
        match_labels=match_labels,
        issuers=tuple(issuers),
        rules=tuple(rules),
        default_action=default_action,
        creation_timestamp=_str_or_none(meta.get("creationTimestamp")),
        generation=generation if isinstance(generation, int) else None,
        uid=_str_or_none(meta.get("uid")),
    )


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def parse_documents(text: str, default_namespace: str = "default") -> list[model.JWTPolicy]:
    """Parses a YAML stream of JWTPolicy documents (empty documents are skipped).

    All-or-nothing: any invalid document fails the whole stream, so a bad file
    never partially replaces good policies. Errors are prefixed with the
    document's index and name.
    """
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise PolicyError([f"invalid YAML: {exc}"]) from exc
    return parse_all(docs, default_namespace)


def parse_all(docs: Iterable[Any], default_namespace: str = "default") -> list[model.JWTPolicy]:
    """Parses many policy objects; all-or-nothing, with per-document error prefixes."""
    policies: list[model.JWTPolicy] = []
    problems: list[str] = []
    keys: set[str] = set()
    for i, doc in enumerate(docs):
        label = _doc_label(i, doc)
        try:
            policy = parse_policy(doc, default_namespace)
        except PolicyError as exc:
            problems.extend(f"{label}: {p}" for p in exc.problems)
            continue
        if policy.key in keys:
            problems.append(f"{label}: duplicate policy {policy.key}")
        keys.add(policy.key)
        policies.append(policy)
    if problems:
        raise PolicyError(problems)
    return policies


def _doc_label(index: int, doc: Any) -> str:
    name = doc.get("metadata", {}).get("name") if isinstance(doc, dict) else None
    if isinstance(name, str):
        return f"document {index} ({name})"
    return f"document {index}"
