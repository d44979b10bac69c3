"""Content-addressed store of step outputs: one directory per (kind, key).

An entry appears by renaming a finished temporary directory into place, so a
crashed or interrupted step never leaves a half-written entry, and two
processes racing on the same key both succeed with one copy kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

COMPLETE = ".complete"


class Cache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / key

    def has(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / COMPLETE).exists()

    @contextlib.contextmanager
    def writing(self, kind: str, key: str):
        """Yield a scratch directory that becomes the entry if the block succeeds."""
        final = self.path(kind, key)
        scratch_root = self.root / "tmp"
        scratch_root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=scratch_root))
        try:
            yield scratch
            (scratch / COMPLETE).touch()
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(scratch, final)
            except OSError:
                if not self.has(kind, key):
                    raise
                # Another process finished the same entry first: keep theirs.
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def remove(self, kind: str, key: str) -> None:
        shutil.rmtree(self.path(kind, key), ignore_errors=True)

    def scratch_dir(self) -> Path:
        """A temporary directory on the cache's filesystem (for atomic renames elsewhere)."""
        root = self.root / "tmp"
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=root))
