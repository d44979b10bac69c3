"""`mlxbuild check [DIR ...]`: every published artifact against its record, and every
released version's files against its release lock, reading every byte (no remembered
hashes: this is the check a CI job or a release pipeline runs before it ships).

Exit 0 when everything matches, 4 on any mismatch (the verification-failure code), 2 when
there is nothing to check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlxbuild import artifacts
from mlxbuild.fingerprint import sha256_file
from mlxbuild.lock import LOCK_NAME

EXIT_MISMATCH = 4


def records(root: Path):
    for path in sorted(Path(root).rglob(f"*{artifacts.RECORD_SUFFIX}")):
        if path.name == LOCK_NAME:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "files" in record and "package_key" in record:
            yield path, record


def check_tree(root: Path) -> tuple[int, int, list[str]]:
    """(artifacts checked, locks checked, problems)."""
    problems, count, locks = [], 0, 0
    for path, record in records(root):
        count += 1
        problems += artifacts.mismatches(path.parent, record)
    for lock_file in sorted(Path(root).rglob(LOCK_NAME)):
        locks += 1
        try:
            lock = json.loads(lock_file.read_text())
            targets = lock["targets"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{lock_file}: not a readable release lock ({e})")
            continue
        for name, entry in sorted(targets.items()):
            for file, want in sorted((entry.get("files") or {}).items()):
                path = lock_file.parent / file
                if not path.exists():
                    problems.append(f"{path}: missing (released in {lock_file.name}, target {name})")
                elif sha256_file(path) != want["sha256"]:
                    problems.append(f"{path}: sha256 differs from {lock_file.name} (target {name})")
    return count, locks, problems


def main(paths: list[str]) -> int:
    from mlxbuild.settings import roots

    total, total_locks, bad = 0, 0, []
    for root in [Path(p) for p in paths] or [roots().artifacts]:
        if not root.is_dir():
            print(f"error: {root}: not a directory", file=sys.stderr)
            return 2
        count, locks, problems = check_tree(root)
        total, total_locks, bad = total + count, total_locks + locks, bad + problems
    for line in bad:
        print(f"mismatch: {line}", file=sys.stderr)
    if total == 0:
        print("error: no published artifacts found", file=sys.stderr)
        return 2
    print(f"checked {total} artifact(s) and {total_locks} release lock(s): "
          f"{len(bad)} mismatch(es)")
    return EXIT_MISMATCH if bad else 0
