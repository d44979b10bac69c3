"""Content-addressed store of step outputs: one directory per (kind, key).

An entry appears by renaming a finished temporary directory into place, so a
crashed or interrupted step never leaves a half-written entry, and two
processes racing on the same key both succeed with one copy kept.

With a remote tier (``mlxbuild.remote``), a missing entry can be fetched from a
bucket that other machines push their finished entries to. Only ``fetch``,
``push`` and ``remote_has`` touch the network; ``has`` stays a local stat.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

COMPLETE = ".complete"


class _Miss(Exception):
    pass


class Cache:
    def __init__(self, root: Path, remote=None):
        self.root = Path(root)
        self.remote = remote  # a mlxbuild.remote.RemoteCache, or None

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

    def remote_has(self, kind: str, key: str) -> bool:
        """Whether the remote tier announces a complete entry (False without one)."""
        return self.remote is not None and self.remote.has(kind, key)

    def fetch(self, kind: str, key: str):
        """Make the entry from the remote tier: a Transfer on success, None if it has none.

        The archive is unpacked into a scratch directory that becomes the entry only
        once its hash and contents were checked, exactly like a local build.
        """
        if not self.remote_has(kind, key):
            return None
        try:
            with self.writing(kind, key) as out:
                got = self.remote.fetch(kind, key, out, self.scratch_root())
                if got is None:
                    raise _Miss
        except _Miss:
            return None
        return got

    def push(self, kind: str, key: str):
        """Upload a local entry to the remote tier: a Transfer if it was uploaded, else None."""
        if self.remote is None or not self.has(kind, key):
            return None
        return self.remote.push(kind, key, self.path(kind, key), self.scratch_root())

    def scratch_root(self) -> Path:
        root = self.root / "tmp"
        root.mkdir(parents=True, exist_ok=True)
        return root

    def remove(self, kind: str, key: str) -> None:
        shutil.rmtree(self.path(kind, key), ignore_errors=True)

    def scratch_dir(self) -> Path:
        """A temporary directory on the cache's filesystem (for atomic renames elsewhere)."""
        root = self.root / "tmp"
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=root))
