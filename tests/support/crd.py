"""The JWTPolicy CRD's status schema as a checker, for the status the operator writes.

The structural schema becomes JSON Schema as the API server applies it
(unknown fields refused, `pattern` run with RE2 as in Go), and list-map keys
(`x-kubernetes-list-type: map`) must be unique, which the API server enforces
and JSON Schema cannot say.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import re2
import yaml

CRD_PATH = (
    Path(__file__).resolve().parents[2] / "manifests" / "crds" / "jwtpolicies.lastguard.dev.yaml"
)


def _crd_version() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    version: dict[str, Any] = crd["spec"]["versions"][0]
    return version


STATUS_SCHEMA: dict[str, Any] = _crd_version()["schema"]["openAPIV3Schema"]["properties"]["status"]


def _re2_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if validator.is_type(instance, "string") and not re2.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _json_schema(node: dict[str, Any]) -> dict[str, Any]:
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


# jsonschema checks "date-time" only with an optional package; this is the RFC 3339 rule.
_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not re2.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value):
        raise ValueError(f"{value!r} is not an RFC 3339 date-time")
    datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _re2_pattern}
)
_VALIDATOR = _Validator(_json_schema(STATUS_SCHEMA), format_checker=_FORMATS)


def _list_map_problems(node: dict[str, Any], value: Any, path: str) -> Iterator[str]:
    if isinstance(value, dict):
        for name, sub in node.get("properties", {}).items():
            if name in value:
                yield from _list_map_problems(sub, value[name], f"{path}.{name}")
    elif isinstance(value, list) and "items" in node:
        if node.get("x-kubernetes-list-type") == "map":
            keys = node.get("x-kubernetes-list-map-keys", [])
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
            if len(seen) != len(set(seen)):
                yield f"{path}: duplicate list-map keys {keys}"
        for i, item in enumerate(value):
            yield from _list_map_problems(node["items"], item, f"{path}[{i}]")


def status_problems(status: Any) -> list[str]:
    """Everything the API server would refuse in this status (empty: it is accepted)."""
    problems = [
        f"status{''.join(f'[{p}]' if isinstance(p, int) else f'.{p}' for p in e.absolute_path)}: "
        f"{e.message}"
        for e in _VALIDATOR.iter_errors(status)
    ]
    problems.extend(_list_map_problems(STATUS_SCHEMA, status, "status"))
    return problems
