"""The repository layout keeps Python working from its root.

Tools run as `python -m pip` / `python -m pytest` from the repository root put
the root first on sys.path, so a top-level *regular* package named like a
standard-library module (say `operator/__init__.py`) would replace that module
for the interpreter itself. Component folders are mapped onto `lastguard.*`
names by setup.py instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_top_level_package_shadows_the_standard_library() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert not packages & set(sys.stdlib_module_names), packages & set(sys.stdlib_module_names)


def test_operator_folder_is_not_a_regular_package() -> None:
    assert (ROOT / "operator").is_dir()
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_python_dash_m_from_the_root_still_finds_the_standard_library() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "json.tool", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    probe = "import operator, lastguard.operator.index; print(operator.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "site-packages" not in out.stdout and str(ROOT) not in out.stdout


def test_installed_import_names_are_ours() -> None:
    import lastguard.operator.main
    import lastguard.proto
    import lastguard.sidecar

    for module in (lastguard.sidecar, lastguard.proto, lastguard.operator.main):
        assert module.__name__.startswith("lastguard.")


def test_the_kubernetes_seam_loads_neither_kopf_nor_the_client() -> None:
    # kube is the seam; only cluster_api, its implementation, may pull these in.
    probe = (
        "import sys\n"
        "from lastguard.operator import ca_publisher, controller, kube, leader\n"
        "print(sorted(m for m in ('kopf', 'kubernetes') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_operators_entry_module_loads_without_grpc() -> None:
    # main imports the distribution server (grpc, generated protos) only when it starts.
    probe = "import sys\nimport lastguard.operator.main\nprint('grpc' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"
