"""Maps lastguard's component folders onto installed `lastguard.*` package names.

Each top-level component folder (sidecar/, proto/, ...) is the source of one
subpackage of the `lastguard` namespace, so nothing installs a generic top-level
name such as `sidecar` or `operator`. Metadata lives in pyproject.toml.
"""

from setuptools import find_packages, setup

COMPONENTS = {
    "lastguard.sidecar": "sidecar",
    "lastguard.proto": "proto",
    "lastguard.operator": "operator",
}

packages: list[str] = []
package_dir: dict[str, str] = {}
for name, folder in COMPONENTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages.extend(f"{name}.{sub}" for sub in find_packages(folder))

setup(packages=packages, package_dir=package_dir, package_data={"": ["py.typed", "*.pyi"]})
