#!/usr/bin/env python3
"""Generate lastguard's Python gRPC/protobuf code from the .proto sources.

Sources live under ``proto/src/`` (the protoc include root), in files named
``lastguard/proto/<...>.proto`` so that generated modules import each other as
``lastguard.proto.<...>``. The generated ``*_pb2.py``, ``*_pb2.pyi`` and
``*_pb2_grpc.py`` files are written to ``proto/<...>`` (the ``lastguard/proto/``
prefix is stripped, because the folder ``proto/`` *is* the installed package
``lastguard.proto``), together with an ``__init__.py`` in every package folder
and ``proto/py.typed``.

Usage::

    python scripts/genproto.py          # regenerate proto/ in place
    python scripts/genproto.py --check  # exit 1 if proto/ differs from a fresh run

Output is a pure function of the .proto sources and the installed grpcio-tools
version, so re-running produces byte-identical files.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_PKG_DIR = REPO / "proto"  # source folder of the installed package lastguard.proto
SRC_ROOT = PROTO_PKG_DIR / "src"  # protoc include root; not a Python package
IMPORT_PREFIX = Path("lastguard") / "proto"  # path prefix every .proto file carries

ROOT_INIT = (
    '"""Generated gRPC/protobuf code for lastguard\'s contracts; regenerate with `make proto`."""\n'
)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
MANAGED_NAMES = ("__init__.py", "py.typed")


def _is_managed(rel: Path) -> bool:
    """Whether a path under proto/ is owned (created/overwritten/deleted) by this script."""
    if rel.parts[0] == "src" or "__pycache__" in rel.parts:
        return False
    return rel.name in MANAGED_NAMES or rel.name.endswith(GENERATED_SUFFIXES)


def _proto_sources() -> list[Path]:
    sources = sorted(p for p in (SRC_ROOT / IMPORT_PREFIX).rglob("*.proto") if p.is_file())
    if not sources:
        raise SystemExit(f"genproto: no .proto files under {SRC_ROOT / IMPORT_PREFIX}")
    return sources


def _run_protoc(sources: list[Path], out_dir: Path) -> None:
    from grpc_tools import protoc

    wkt_include = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={SRC_ROOT}",
        f"--proto_path={wkt_include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(SRC_ROOT)) for p in sources),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"genproto: protoc failed with exit code {rc}")


def generate(dest: Path) -> None:
    """Write the complete set of managed files for proto/ into the empty folder ``dest``."""
    sources = _proto_sources()
    with tempfile.TemporaryDirectory(prefix="lastguard-protoc-") as tmp:
        raw = Path(tmp)
        _run_protoc(sources, raw)
        generated_root = raw / IMPORT_PREFIX
        for produced in sorted(generated_root.rglob("*")):
            if not produced.is_file():
                continue
            rel = produced.relative_to(generated_root)
            if not rel.name.endswith(GENERATED_SUFFIXES):
                raise SystemExit(f"genproto: unexpected protoc output {rel}")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(produced, target)
        stray = [p for p in raw.rglob("*") if p.is_file() and generated_root not in p.parents]
        if stray:
            raise SystemExit(f"genproto: protoc wrote outside {IMPORT_PREFIX}: {stray}")

    # Every folder holding generated code, and each of its ancestors up to proto/,
    # must be a regular package so setuptools' find_packages picks it up.
    package_dirs = {dest}
    for module in dest.rglob("*.py"):
        package_dirs.update(p for p in module.parents if p == dest or dest in p.parents)
    for pkg in sorted(package_dirs):
        (pkg / "__init__.py").write_text(ROOT_INIT if pkg == dest else "", encoding="utf-8")
    (dest / "py.typed").write_text("", encoding="utf-8")


def _managed_files(root: Path) -> set[Path]:
    if not root.is_dir():
        return set()
    return {
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and _is_managed(p.relative_to(root))
    }


def _diff(expected_root: Path, actual_root: Path) -> list[str]:
    expected = _managed_files(expected_root)
    actual = _managed_files(actual_root)
    problems = [f"missing: proto/{p}" for p in sorted(expected - actual)]
    problems += [f"stale (no longer generated): proto/{p}" for p in sorted(actual - expected)]
    problems += [
        f"differs: proto/{p}"
        for p in sorted(expected & actual)
        if not filecmp.cmp(expected_root / p, actual_root / p, shallow=False)
    ]
    return problems


def _sync(expected_root: Path, actual_root: Path) -> None:
    for rel in sorted(_managed_files(actual_root) - _managed_files(expected_root)):
        (actual_root / rel).unlink()
    for rel in sorted(_managed_files(expected_root)):
        target = actual_root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (target.is_file() and filecmp.cmp(expected_root / rel, target, shallow=False)):
            shutil.copyfile(expected_root / rel, target)
    # Drop folders left empty by removed protos (never touching the sources).
    for folder in sorted(actual_root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        rel = folder.relative_to(actual_root)
        if folder.is_dir() and rel.parts[0] != "src" and not any(folder.iterdir()):
            folder.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the generated code under proto/ is out of date",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lastguard-genproto-") as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if args.check:
            problems = _diff(fresh, PROTO_PKG_DIR)
            if problems:
                print(
                    "genproto: generated code under proto/ is out of date "
                    "(run `python scripts/genproto.py` / `make proto`):",
                    file=sys.stderr,
                )
                for line in problems:
                    print(f"  {line}", file=sys.stderr)
                return 1
            print("genproto: proto/ is up to date")
            return 0
        _sync(fresh, PROTO_PKG_DIR)
    print(f"genproto: wrote {len(_managed_files(PROTO_PKG_DIR))} files under proto/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
