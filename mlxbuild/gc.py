"""`mlxbuild cache gc`: trim the local cache and the remote tier a fleet shares.

What is kept, whatever its age or the size limit: every entry a release lock, a published
record or a build report names (``--keep PATH``, repeatable: a lock, a record, a report's
JSON, or a folder searched for them; default the artifacts folder). Those name the step keys
each target was built from (a record's and a lock's ``keys``, a report's steps), so a
released version can always be republished, and a CI job can pin what its recent builds
used by keeping their reports.

Of the rest, an entry goes when it was last used more than ``--older-than`` days ago;
then, with ``--max-size``, the least recently used go until the tier fits. "Used" is local:
the entry's marker is touched whenever a step reads it (``Cache.read``). S3 keeps no access
times, so a remote entry's age is the time since it was uploaded.

Safe beside running builds: a local entry whose one-builder lock is held is skipped, and
one is removed by renaming it out of place first, so a reader sees it whole or not at all
(a build that needed it rebuilds it, as for any missing entry). A remote entry's marker is
deleted before its archive, so no reader finds a marker without its archive. ``--dry-run``
says what would go and removes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlxbuild.cache import COMPLETE
from mlxbuild.errors import UsageError

DAY = 86400.0
INCOMPLETE_GRACE = DAY  # a folder or an archive without its marker, older than this, is junk
KINDS = ("weights", "tokenizer", "preprocessor", "quantize", "export", "reference", "lower", "verify",
         "baseline", "quality")


@dataclass
class Entry:
    kind: str
    key: str
    size: int
    used: float  # epoch seconds
    names: list[str] = field(default_factory=list)  # remote: the objects that make it
    complete: bool = True


@dataclass
class Decision:
    remove: list[tuple[Entry, str]]  # (entry, why)
    keep: list[Entry]
    pinned: int


# --------------------------------------------------------------------------- what is referenced


def referenced(paths: list[Path]) -> tuple[set[tuple[str, str]], list[str]]:
    """(kind, key) pairs named by the locks, records and reports under ``paths``, and the
    files they came from."""
    pins: set[tuple[str, str]] = set()
    sources = []
    for path in paths:
        if not path.exists():
            raise UsageError(f"--keep {path}: no such file or folder")
        files = [path] if path.is_file() else sorted(path.rglob("*.json"))
        for f in files:
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                if path.is_file():
                    raise UsageError(f"--keep {f}: not a JSON lock, record or report") from None
                continue
            found = _keys_of(data)
            if found:
                pins |= found
                sources.append(str(f))
            elif path.is_file():
                raise UsageError(f"--keep {f}: names no step keys (not a release lock, a published "
                                 "record or a build report)")
    return pins, sources


def _keys_of(data) -> set[tuple[str, str]]:
    if not isinstance(data, dict):
        return set()
    found = set()
    if isinstance(data.get("keys"), dict):  # a published record
        found |= {(k, v) for k, v in data["keys"].items() if isinstance(v, str)}
    for target in (data.get("targets") or {}).values() if isinstance(data.get("targets"), dict) else ():
        keys = (target.get("inputs") or {}).get("keys") if isinstance(target, dict) else None
        if isinstance(keys, dict):  # a release lock
            found |= {(k, v) for k, v in keys.items() if isinstance(v, str)}
    report = str(data.get("format", "")).startswith("mlxbuild-build-report")
    for manifest in (data.get("manifests") or []) if report else []:
        for target in manifest.get("targets", []):  # a build report
            found |= {(s["step"], s["key"]) for s in target.get("steps", []) if s.get("key")}
    return found


# --------------------------------------------------------------------------- the decision


def decide(entries: list[Entry], pins: set[tuple[str, str]], older_than_days: float | None,
           max_size: int | None, now: float | None = None) -> Decision:
    now = time.time() if now is None else now
    remove, keep, pinned = [], [], 0
    for e in entries:
        if (e.kind, e.key) in pins:
            pinned += 1
            keep.append(e)
        elif not e.complete:
            (remove.append((e, "incomplete")) if now - e.used > INCOMPLETE_GRACE else keep.append(e))
        elif older_than_days is not None and now - e.used > older_than_days * DAY:
            remove.append((e, f"unused for {(now - e.used) / DAY:.0f} days"))
        else:
            keep.append(e)
    if max_size is not None:
        total = sum(e.size for e in keep)
        for e in sorted((e for e in keep if (e.kind, e.key) not in pins), key=lambda e: e.used):
            if total <= max_size:
                break
            keep.remove(e)
            remove.append((e, "over --max-size (least recently used)"))
            total -= e.size
    return Decision(remove, keep, pinned)


# --------------------------------------------------------------------------- the tiers


def local_entries(root: Path) -> list[Entry]:
    found = []
    for kind in KINDS:
        for folder in sorted((root / kind).glob("*/*")):
            if not folder.is_dir():
                continue
            marker = folder / COMPLETE
            complete = marker.exists()
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            used = (marker if complete else folder).stat().st_mtime
            found.append(Entry(kind, folder.name, size, used, complete=complete))
    return found


def remove_local(root: Path, entry: Entry) -> bool:
    """Remove one entry unless a build holds its lock; False when skipped."""
    from mlxbuild.cache import Cache

    cache = Cache(root)
    lock = root / "locks" / f"{entry.kind}-{entry.key}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644) if lock.parent.is_dir() else None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a build is making or repairing it now
        folder = cache.path(entry.kind, entry.key)
        gone = cache.scratch_root() / f"gc-{entry.kind}-{entry.key}-{os.getpid()}"
        try:
            os.rename(folder, gone)  # out of place at once: readers see it whole or not at all
        except FileNotFoundError:
            return True
        shutil.rmtree(gone, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # the two-letter fan-out folder, once empty
        return True
    finally:
        if fd is not None:
            os.close(fd)  # (the lock file stays: unlinking it could let two builders in)


def remote_entries(remote) -> list[Entry]:
    from mlxbuild.remote import MARKER

    grouped: dict[tuple[str, str], Entry] = {}
    for kind, key, name, size, modified in remote.objects():
        e = grouped.setdefault((kind, key), Entry(kind, key, 0, 0.0, complete=False))
        e.names.append(name)
        e.size += size
        if name == MARKER:
            e.complete, e.used = True, modified
        elif not e.complete:
            e.used = max(e.used, modified)
    return list(grouped.values())


# --------------------------------------------------------------------------- the command


def run(cache_root: Path, keep: list[Path], older_than_days: float | None, max_size: int | None,
        dry_run: bool, remote_url: str | None, local: bool = True, say=print) -> int:
    from mlxbuild.memory import shown
    from mlxbuild.remote import RemoteError, connect

    pins, sources = referenced(keep)
    say(f"keeping every entry named by {len(sources)} lock(s), record(s) or report(s) "
        f"({len(pins)} step keys)")
    tiers = []
    if local:
        tiers.append(("local cache " + str(cache_root), local_entries(cache_root) if cache_root.is_dir() else [],
                      lambda e: remove_local(cache_root, e)))
    if remote_url:
        remote = connect(remote_url)
        try:
            listed = remote_entries(remote)
        except RemoteError as e:
            raise UsageError(str(e)) from None
        tiers.append((f"remote cache {remote_url}", listed,
                      lambda e: remote.delete_entry(e.kind, e.key, e.names) or True))
    for title, entries, delete in tiers:
        d = decide(entries, pins, older_than_days, max_size)
        freed, skipped = 0, 0
        for entry, why in sorted(d.remove, key=lambda p: (p[0].kind, p[0].key)):
            line = f"  {entry.kind}/{entry.key[:12]}  {shown(entry.size)}  {why}"
            if dry_run:
                say("  would remove" + line[1:])
                freed += entry.size
                continue
            try:
                done = delete(entry)
            except RemoteError as e:
                raise UsageError(str(e)) from None
            if done:
                freed += entry.size
            else:
                skipped += 1
                say(f"  skipped {entry.kind}/{entry.key[:12]}: a build is using it")
        kept = sum(e.size for e in d.keep)
        verb = "would remove" if dry_run else "removed"
        say(f"{title}: {verb} {len(d.remove) - skipped} entries ({shown(freed)}); kept {len(d.keep) + skipped} "
            f"({shown(kept)}), {d.pinned} of them referenced")
        if max_size is not None and kept > max_size:
            say(f"  note: the referenced entries alone take {shown(kept)}, over --max-size {shown(max_size)}")
    return 0
