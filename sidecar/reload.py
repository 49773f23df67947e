"""Loads policies from a file and reloads them when the file changes.

Polls the file's identity (inode, size, mtime) every `interval` seconds, which
also catches Kubernetes ConfigMap updates (an atomic symlink swap), and
re-parses only when it changed and the content differs. An unreadable or
invalid file is logged with every problem and the current policy stays.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

from lastguard.sidecar.errors import PolicyError
from lastguard.sidecar.policy.parse import parse_documents
from lastguard.sidecar.store import PolicyStore

log = logging.getLogger("lastguard.policy")


class PolicyFile:
    def __init__(self, path: Path, store: PolicyStore, default_namespace: str = "default"):
        self.path = path
        self.store = store
        self.default_namespace = default_namespace
        self._stat: tuple[int, int, int] | None = None
        self._digest: bytes | None = None

    def load(self) -> bool:
        """Loads the file if it changed. True when a new policy set was applied."""
        try:
            st = os.stat(self.path)
            identity = (st.st_ino, st.st_size, st.st_mtime_ns)
            if identity == self._stat:
                return False
            self._stat = identity
            data = self.path.read_bytes()
        except OSError as exc:
            log.error(
                "cannot read policy file; keeping current policy",
                extra={"fields": {"file": str(self.path), "error": exc.strerror}},
            )
            return False
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return False
        try:
            text = data.decode("utf-8")
            policies = parse_documents(text, self.default_namespace)
            self.store.apply(policies)
        except (PolicyError, UnicodeDecodeError) as exc:
            problems = exc.problems if isinstance(exc, PolicyError) else ["file is not UTF-8"]
            log.error(
                "invalid policy file; keeping current policy",
                extra={"fields": {"file": str(self.path), "problems": problems}},
            )
            return False
        self._digest = digest
        return True

    async def watch(self, interval: float = 1.0) -> None:
        """Reloads on change until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.load()
