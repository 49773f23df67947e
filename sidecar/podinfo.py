"""Who this pod is, from a Kubernetes downward API volume: namespace, labels and name.

The volume this module reads (file names are the items' `path`s)::

    volumes:
    - name: podinfo
      downwardAPI:
        items:
        - {path: namespace, fieldRef: {fieldPath: metadata.namespace}}
        - {path: labels, fieldRef: {fieldPath: metadata.labels}}
        - {path: name, fieldRef: {fieldPath: metadata.name}}

The kubelet writes `namespace` and `name` as the bare value. It writes `labels`
as one `key="value"` line per label, sorted by key, with no newline after the
last one; each value is quoted the way Go's `%q` (strconv.Quote) does, so it
may hold escapes such as `\\"`, `\\n`, `\\x7f` or `\\u00e9` (label values the API
server accepts never need them, but annotations use the same format and a
hand-written file might). No labels at all is an empty file.

Parsing and validation (`parse_labels`, `workload_problems`) are pure; `read`
is the only I/O. Every problem is a `PodInfoError` that names the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lastguard.sidecar.errors import LastguardError
from lastguard.sidecar.policy.select import Workload

NAMESPACE_FILE = "namespace"
LABELS_FILE = "labels"
NAME_FILE = "name"

# Kubernetes' own syntax rules (k8s.io/apimachinery/pkg/util/validation), used with fullmatch.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_OCTAL = re.compile(r"[0-7]{3}")

#: Go's single-character escapes (strconv.Quote emits these; `\'` is invalid in "...").
_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
}


class PodInfoError(LastguardError):
    """The downward API volume is missing a file, or a file is not what the kubelet writes."""


@dataclass(frozen=True, slots=True)
class PodInfo:
    workload: Workload
    pod_name: str


def is_dns_label(value: str) -> bool:
    return len(value) <= 63 and _DNS_LABEL.fullmatch(value) is not None


def _label_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and not (len(prefix) <= 253 and _DNS_SUBDOMAIN.fullmatch(prefix)):
        return "the prefix must be a DNS subdomain"
    if not name or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return (
            "the name must be 1-63 characters: letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def _label_value_problem(value: str) -> str | None:
    if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
        return (
            "must be empty or 1-63 characters: letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def workload_problems(namespace: str, labels: Mapping[str, str]) -> list[str]:
    """Every way `namespace` and `labels` break Kubernetes' rules; empty when valid.

    Shared by the sidecar (its downward API files) and the operator (a Hello).
    """
    problems = []
    if not namespace:
        problems.append("namespace: is required")
    elif not is_dns_label(namespace):
        problems.append(f"namespace: {namespace!r} is not a DNS label")
    for key, value in sorted(labels.items()):
        key_problem = _label_key_problem(key)
        if key_problem is not None:
            problems.append(f"labels: key {key!r}: {key_problem}")
            continue
        value_problem = _label_value_problem(value)
        if value_problem is not None:
            problems.append(f"labels.{key}: value {value!r} {value_problem}")
    return problems


def unquote_go(quoted: str) -> str:
    """The string a Go double-quoted literal (strconv.Quote's output) stands for.

    Raises ValueError on anything strconv.Unquote would refuse.
    """
    if len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"':
        raise ValueError("is not a double-quoted string")
    body = quoted[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        char = body[i]
        if char == '"':
            raise ValueError("has an unescaped quote inside")
        if char != "\\":
            out += char.encode("utf-8")
            i += 1
            continue
        escape = body[i + 1 : i + 2]
        if escape in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[escape].encode()
            i += 2
        elif escape in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[escape]
            digits = body[i + 2 : i + 2 + width]
            if len(digits) != width or not _HEX.fullmatch(digits):
                raise ValueError(f"has a bad \\{escape} escape")
            code = int(digits, 16)
            if escape == "x":
                out.append(code)  # one raw byte; the whole must still be UTF-8
            elif code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise ValueError(f"has an invalid code point \\{escape}{digits}")
            else:
                out += chr(code).encode("utf-8")
            i += 2 + width
        elif _OCTAL.fullmatch(body[i + 1 : i + 4]) and int(body[i + 1 : i + 4], 8) <= 0xFF:
            out.append(int(body[i + 1 : i + 4], 8))
            i += 4
        else:
            if not escape:
                raise ValueError("has no closing quote (the last one is escaped)")
            raise ValueError(f"has an unknown escape \\{escape}")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("is not UTF-8 once unescaped") from exc


def parse_labels(text: str) -> dict[str, str]:
    """The labels in the kubelet's format (see the module docstring); raises PodInfoError."""
    labels: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # the kubelet writes none, but a trailing newline is harmless
        key, sep, quoted = line.partition("=")
        if not sep or not key:
            raise PodInfoError(f'{LABELS_FILE} line {number}: expected key="value"')
        try:
            value = unquote_go(quoted)
        except ValueError as exc:
            raise PodInfoError(f"{LABELS_FILE} line {number}: the value {exc}") from exc
        if key in labels:
            raise PodInfoError(f"{LABELS_FILE} line {number}: duplicate label {key!r}")
        labels[key] = value
    return labels


def from_texts(namespace: str, labels: str, name: str) -> PodInfo:
    """The pod's identity from the three files' contents. Pure."""
    # The kubelet writes bare values; a hand-made file may end in a newline.
    namespace, name = namespace.strip(), name.strip()
    parsed = parse_labels(labels)
    problems = workload_problems(namespace, parsed)
    if problems:
        raise PodInfoError("; ".join(problems))
    if not name:
        raise PodInfoError(f"{NAME_FILE}: the pod name is empty")
    return PodInfo(Workload.of(namespace, parsed), name)


def read(directory: Path) -> PodInfo:
    """Reads `namespace`, `labels` and `name` from a downward API volume."""
    texts = {}
    for file in (NAMESPACE_FILE, LABELS_FILE, NAME_FILE):
        path = directory / file
        try:
            texts[file] = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise PodInfoError(
                f"{path} is missing: mount a downward API volume with the item "
                f"{file} (see `lastguard sidecar --help`)"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise PodInfoError(f"cannot read {path}: {exc}") from exc
    try:
        return from_texts(texts[NAMESPACE_FILE], texts[LABELS_FILE], texts[NAME_FILE])
    except PodInfoError as exc:
        raise PodInfoError(f"{directory}: {exc}") from exc
