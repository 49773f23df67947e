"""Reading the pod's identity from a downward API volume, as the kubelet writes it.

The kubelet writes `metadata.labels` as `key="value"` lines sorted by key, no
final newline, each value quoted like Go's %q (k8s.io/kubernetes/pkg/fieldpath.FormatMap).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lastguard.sidecar import podinfo
from lastguard.sidecar.podinfo import PodInfoError
from lastguard.sidecar.policy.select import Workload


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        pytest.param("", {}, id="no-labels-empty-file"),
        pytest.param('app="web"', {"app": "web"}, id="one"),
        pytest.param(
            'app="web"\npod-template-hash="7d9f8c6b5"\ntier="frontend"',
            {"app": "web", "pod-template-hash": "7d9f8c6b5", "tier": "frontend"},
            id="several-no-final-newline",
        ),
        pytest.param('app="web"\n', {"app": "web"}, id="trailing-newline-tolerated"),
        pytest.param(
            'app.kubernetes.io/name="orders"\nexample.com/team="a_b.c-d"',
            {"app.kubernetes.io/name": "orders", "example.com/team": "a_b.c-d"},
            id="prefixed-keys",
        ),
        pytest.param('canary=""', {"canary": ""}, id="empty-value"),
        pytest.param('a="x=y"', {"a": "x=y"}, id="equals-in-value"),
    ],
)
def test_labels_as_the_kubelet_writes_them(text: str, labels: dict[str, str]) -> None:
    assert podinfo.parse_labels(text) == labels


@pytest.mark.parametrize(
    ("quoted", "value"),
    [
        pytest.param(r'"a\"b"', 'a"b', id="quote"),
        pytest.param(r'"a\\b"', "a\\b", id="backslash"),
        pytest.param(r'"tab\there\nnl"', "tab\there\nnl", id="control-escapes"),
        pytest.param(r'"\a\b\f\r\v"', "\a\b\f\r\v", id="all-single-letter-escapes"),
        pytest.param(r'"\x7f"', "\x7f", id="hex-byte"),
        pytest.param(r'"\xc3\xa9"', "é", id="hex-bytes-forming-utf8"),
        pytest.param(r'"\u00e9\U0001F600"', "é😀", id="unicode-escapes"),
        pytest.param(r'"\101"', "A", id="octal"),
        pytest.param('"é"', "é", id="printable-unicode-kept-raw"),
    ],
)
def test_go_quoted_values(quoted: str, value: str) -> None:
    assert podinfo.unquote_go(quoted) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "app=web", "labels line 1: the value is not a double-quoted string", id="unquoted"
        ),
        pytest.param('app="web', "not a double-quoted string", id="unterminated"),
        pytest.param('app="we"b"', "unescaped quote", id="inner-quote"),
        pytest.param('app="web\\"', "has no closing quote", id="escaped-final-quote"),
        pytest.param(r'app="\q"', r"unknown escape \q", id="unknown-escape"),
        pytest.param(r"app='\''", "not a double-quoted string", id="single-quoted"),
        pytest.param(r'app="\x4"', r"bad \x escape", id="short-hex"),
        pytest.param(r'app="\ud800"', "invalid code point", id="surrogate"),
        pytest.param(r'app="\xff"', "not UTF-8", id="invalid-utf8"),
        pytest.param(r'app="\400"', r"unknown escape \4", id="octal-over-255"),
        pytest.param('="web"', "labels line 1: expected key=", id="no-key"),
        pytest.param('a="1"\njust text', "labels line 2: expected key=", id="no-equals"),
        pytest.param('a="1"\na="2"', "duplicate label 'a'", id="duplicate"),
    ],
)
def test_garbled_labels(text: str, message: str) -> None:
    with pytest.raises(PodInfoError) as caught:
        podinfo.parse_labels(text)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("namespace", "labels", "problem"),
    [
        pytest.param("", {}, "namespace: is required", id="no-namespace"),
        pytest.param("Shop", {}, "not a DNS label", id="uppercase-namespace"),
        pytest.param("a" * 64, {}, "not a DNS label", id="namespace-too-long"),
        pytest.param("shop.prod", {}, "not a DNS label", id="namespace-with-dot"),
        pytest.param("shop", {"-app": "x"}, "key '-app'", id="key-starts-with-dash"),
        pytest.param("shop", {"a/b/c": "x"}, "key 'a/b/c'", id="two-slashes"),
        pytest.param(
            "shop", {"Example.com/x": "y"}, "prefix must be a DNS subdomain", id="bad-prefix"
        ),
        pytest.param("shop", {"k" * 64: "v"}, "the name must be 1-63", id="key-too-long"),
        pytest.param("shop", {"app": "v" * 64}, "labels.app: value", id="value-too-long"),
        pytest.param("shop", {"app": "a b"}, "labels.app: value 'a b'", id="space-in-value"),
    ],
)
def test_workload_problems(namespace: str, labels: dict[str, str], problem: str) -> None:
    problems = podinfo.workload_problems(namespace, labels)
    assert any(problem in p for p in problems), problems


def test_a_valid_workload_has_no_problems() -> None:
    labels = {"app": "web", "app.kubernetes.io/part-of": "shop", "canary": ""}
    assert podinfo.workload_problems("shop-prod", labels) == []


def _volume(folder: Path, files: dict[str, str]) -> Path:
    # Like the kubelet: files are symlinks into a timestamped ..data folder.
    data = folder / "..2024_01_01_00_00_00.000000001"
    data.mkdir(parents=True)
    for name, text in files.items():
        (data / name).write_text(text)
    (folder / "..data").symlink_to(data.name)
    for name in files:
        (folder / name).symlink_to(Path("..data") / name)
    return folder


KUBELET_FILES = {"namespace": "shop", "labels": 'app="web"\ntier="frontend"', "name": "web-7d9f-x2"}


def test_read_a_downward_api_volume(tmp_path: Path) -> None:
    info = podinfo.read(_volume(tmp_path, KUBELET_FILES))
    assert info.workload == Workload.of("shop", {"app": "web", "tier": "frontend"})
    assert info.pod_name == "web-7d9f-x2"


def test_hand_written_files_with_newlines_are_accepted(tmp_path: Path) -> None:
    files = {"namespace": "shop\n", "labels": 'app="web"\n', "name": "web-1\n"}
    info = podinfo.read(_volume(tmp_path, files))
    assert info.workload == Workload("shop", (("app", "web"),))
    assert info.pod_name == "web-1"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        pytest.param(
            {k: v for k, v in KUBELET_FILES.items() if k != "labels"},
            "labels is missing: mount a downward API volume with the item labels",
            id="labels-missing",
        ),
        pytest.param(
            {k: v for k, v in KUBELET_FILES.items() if k != "namespace"},
            "namespace is missing",
            id="namespace-missing",
        ),
        pytest.param(
            {k: v for k, v in KUBELET_FILES.items() if k != "name"},
            "name is missing",
            id="name-missing",
        ),
        pytest.param(
            {**KUBELET_FILES, "namespace": ""}, "namespace: is required", id="namespace-empty"
        ),
        pytest.param({**KUBELET_FILES, "name": "\n"}, "the pod name is empty", id="name-empty"),
        pytest.param({**KUBELET_FILES, "labels": "app=web"}, "labels line 1", id="labels-garbled"),
        pytest.param(
            {**KUBELET_FILES, "labels": 'app="a b"'},
            "labels.app: value 'a b'",
            id="label-value-invalid",
        ),
    ],
)
def test_unusable_volumes(tmp_path: Path, files: dict[str, str], message: str) -> None:
    with pytest.raises(PodInfoError) as caught:
        podinfo.read(_volume(tmp_path, files))
    assert message in str(caught.value)
    assert str(tmp_path) in str(caught.value)


def test_not_utf8(tmp_path: Path) -> None:
    folder = _volume(tmp_path, KUBELET_FILES)
    (folder / "..data" / "labels").write_bytes(b'app="\xff"')
    with pytest.raises(PodInfoError, match="cannot read"):
        podinfo.read(folder)
