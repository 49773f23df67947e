"""Which rule applies to a request: path normalisation and first-match rules. Pure.

Rules are matched on a normalised path, the way an application is likely to
read it, so an `Allow` on `/healthz` cannot be stretched to `/healthz/../admin`
and an `Authenticate` on `/admin/*` cannot be dodged with `/%61dmin` or
`//admin`: the query and fragment are cut off, percent-encodings are decoded
(including encoded slashes and backslashes, which become `/`), backslashes
become `/`, repeated slashes merge and dot segments are resolved (RFC 3986
5.2.4). Envoy should normalise too (see manifests/envoy); this is the second
line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from lastguard.sidecar.policy import model


def normalize_path(raw: str) -> str:
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if "%" in path:
        # Decode until stable so double encoding (%252e) cannot hide a dot segment.
        for _ in range(3):
            decoded = unquote(path, errors="replace")
            if decoded == path:
                break
            path = decoded
    path = path.replace("\\", "/")
    if not path.startswith("/"):
        path = "/" + path
    if "//" not in path and "/." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")
    for segment in segments[1:]:
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    trailing = "/" if segments[-1] in ("", ".", "..") and out else ""
    return "/" + "/".join(out) + trailing


@dataclass(frozen=True, slots=True)
class CompiledRule:
    rule: model.Rule
    exact: frozenset[str]
    prefixes: tuple[str, ...]
    methods: frozenset[str]  # empty: any method

    @property
    def action(self) -> model.Action:
        return self.rule.action

    def matches(self, method: str, path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        if not self.exact and not self.prefixes:
            return True
        return path in self.exact or path.startswith(self.prefixes)


def compile_rule(rule: model.Rule) -> CompiledRule:
    return CompiledRule(
        rule=rule,
        exact=frozenset(p for p in rule.paths if not p.endswith("*")),
        prefixes=tuple(p[:-1] for p in rule.paths if p.endswith("*")),
        methods=frozenset(rule.methods),
    )


@dataclass(frozen=True, slots=True)
class RuleTable:
    rules: tuple[CompiledRule, ...]
    default: model.Rule

    def find(self, method: str, raw_path: str) -> model.Rule:
        """The first rule matching the request, else the policy's default rule."""
        path = normalize_path(raw_path)
        for rule in self.rules:
            if rule.matches(method, path):
                return rule.rule
        return self.default


def compile_rules(rules: Iterable[model.Rule], default_action: model.Action) -> RuleTable:
    return RuleTable(
        rules=tuple(compile_rule(r) for r in rules), default=model.Rule(action=default_action)
    )
