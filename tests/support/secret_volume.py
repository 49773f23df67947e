"""A folder updated the way the kubelet updates a mounted Secret (its "atomic writer").

Each file is a symlink `tls.crt -> ..data/tls.crt`; `..data` is a symlink to a
timestamped folder. An update writes a new timestamped folder, points
`..data_tmp` at it and renames `..data_tmp` over `..data`: every file changes
at once, to a new inode. This is what cert-manager's Secret looks like inside
the operator's pod when it rotates the webhook certificate.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

DATA = "..data"


class SecretVolume:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._versions = itertools.count(1)

    def path(self, name: str) -> Path:
        return self.folder / name

    def write(self, files: dict[str, bytes]) -> None:
        """Replaces the volume's contents with `files`, atomically."""
        version = f"..2026_01_01_00_00_{next(self._versions):02d}.000000001"
        target = self.folder / version
        target.mkdir()
        for name, data in files.items():
            (target / name).write_bytes(data)
        old = os.readlink(self.folder / DATA) if (self.folder / DATA).is_symlink() else None
        tmp = self.folder / f"{DATA}_tmp"
        tmp.symlink_to(version)
        os.replace(tmp, self.folder / DATA)
        for name in files:
            link = self.folder / name
            if not link.is_symlink():
                link.symlink_to(f"{DATA}/{name}")
        if old is not None:
            shutil.rmtree(self.folder / old)
