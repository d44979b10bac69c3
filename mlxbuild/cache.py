"""Content-addressed store of step outputs: one directory per (kind, key).

An entry appears by renaming a finished temporary directory into place, so a
crashed or interrupted step never leaves a half-written entry, and two
processes racing on the same key both succeed with one copy kept.

Every entry records the sha256 and size of each file it holds, in its completion marker
(written last): ``read`` checks them and raises ``CorruptEntry`` naming the file, so a
flipped byte or a truncated file is rebuilt, never published (``mlxbuild.tasks``).

With a remote tier (``mlxbuild.remote``), a missing entry can be fetched from a
bucket that other machines push their finished entries to. Only ``fetch``,
``push`` and ``remote_has`` touch the network; ``has`` stays a local stat.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from mlxbuild.errors import MlxbuildError
from mlxbuild.fingerprint import sha256_file

COMPLETE = ".complete"
OWNER = ".owner"  # beside a scratch directory: locked by the process using it
LEGACY_SCRATCH_AGE = 3600


class CorruptEntry(MlxbuildError):
    """A cache entry's files do not match the sizes and sha256 it recorded."""

    def __init__(self, kind: str, key: str, file: str, problem: str):
        self.kind, self.key, self.file, self.problem = kind, key, file, problem
        super().__init__(f"cache entry {kind}/{key[:12]} is corrupt: {file}: {problem}")

    def __reduce__(self):
        return (type(self), (self.kind, self.key, self.file, self.problem))


def inventory(root: Path) -> dict[str, dict]:
    """``{relative path: {"sha256", "size"}}`` of every file below ``root`` but the marker."""
    files = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and p.name != COMPLETE:
            files[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return files


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
    def lock(self, kind: str, key: str, on_wait=None):
        """Hold the one-builder lock of (kind, key) across processes: an ``fcntl`` lock on a
        file under ``locks/``, released by the kernel when its holder dies. ``on_wait()`` is
        called once if another process holds it."""
        folder = self.root / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"{kind}-{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    @contextlib.contextmanager
    def scratch(self, prefix: str = ""):
        """A scratch directory on the cache's filesystem, owned by this process through a
        locked ``<dir>.owner`` file beside it: ``clean_scratch`` removes only directories
        whose owner is gone (a killed build's), never a running one's."""
        root = self.scratch_root()
        fd, owner = tempfile.mkstemp(prefix=prefix, suffix=OWNER, dir=root)
        fcntl.flock(fd, fcntl.LOCK_EX)
        scratch = Path(owner[: -len(OWNER)])
        try:
            scratch.mkdir()
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(owner)
            os.close(fd)

    def clean_scratch(self) -> list[str]:
        """Remove scratch directories whose owning process is gone; return their names."""
        root = self.root / "tmp"
        removed = []
        if not root.is_dir():
            return removed
        for owner in root.glob(f"*{OWNER}"):
            try:
                fd = os.open(owner, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # its owner is alive
            scratch = Path(str(owner)[: -len(OWNER)])
            shutil.rmtree(scratch, ignore_errors=True)
            with contextlib.suppress(OSError):
                owner.unlink()
            os.close(fd)
            removed.append(scratch.name)
        for path in root.iterdir():
            # Left by an mlxbuild that had no owner files: removed once an hour old.
            if (path.is_dir() and not Path(f"{path}{OWNER}").exists()
                    and time.time() - path.stat().st_mtime > LEGACY_SCRATCH_AGE):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed

    @contextlib.contextmanager
    def writing(self, kind: str, key: str):
        """Yield a scratch directory that becomes the entry if the block succeeds."""
        final = self.path(kind, key)
        with self.scratch(prefix=f"{kind}-") as scratch:
            yield scratch
            # The marker is the entry's inventory, written last: an entry without it is not one.
            (scratch / COMPLETE).write_text(json.dumps({"format": 1, "files": inventory(scratch)}))
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(scratch, final)
            except OSError:
                if not self.has(kind, key):
                    raise
                # Another process finished the same entry first: keep theirs.

    def files(self, kind: str, key: str) -> dict[str, dict]:
        """The entry's recorded inventory (CorruptEntry when the marker is unreadable)."""
        marker = self.path(kind, key) / COMPLETE
        try:
            files = json.loads(marker.read_text())["files"]
        except FileNotFoundError:
            raise CorruptEntry(kind, key, COMPLETE, "missing (the entry is incomplete)") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise CorruptEntry(kind, key, COMPLETE, "no file inventory (written by an older "
                               "mlxbuild, or damaged)") from None
        return files

    def read(self, kind: str, key: str) -> Path:
        """The entry's directory, after checking every file against its inventory. Marks the
        entry used now (its marker's mtime: what `mlxbuild cache gc` ages entries by)."""
        root = self.path(kind, key)
        files = self.files(kind, key)
        with contextlib.suppress(OSError):
            os.utime(root / COMPLETE)
        for rel, want in files.items():
            path = root / rel
            try:
                size = path.stat().st_size
            except OSError:
                raise CorruptEntry(kind, key, rel, "missing") from None
            if size != want["size"]:
                raise CorruptEntry(kind, key, rel, f"{size} bytes, recorded {want['size']}")
            if sha256_file(path) != want["sha256"]:
                raise CorruptEntry(kind, key, rel, "sha256 differs from the recorded one")
        return root

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

