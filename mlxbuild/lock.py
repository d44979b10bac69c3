"""Release locks: a released version is immutable.

`mlxbuild release` writes ``artifacts/<name>/<version>/release.lock.json``: for every
target, the inputs its package key hashes (the metadata record's inputs and step
keys), the settings behind those keys, and the published files' sha256 and size.

From then on, planning that version checks every target against the lock before
any work starts (:func:`check_plan`): a target whose inputs changed is refused with
one line naming what changed and asking for a version bump; a target equal to the
lock is a no-op, or, if its files were deleted, is rebuilt, and publishing checks
the new bytes against the lock (:func:`check_rebuilt`).

Imports nothing heavy: planning a no-op build runs this.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlxbuild.errors import BuildError

LOCK_NAME = "release.lock.json"
LOCK_FORMAT = 1

# Record fields that are step keys: they change whenever anything upstream does,
# so they are named only when no plainer field explains a change.
_KEYS = "keys"


def lock_path(out_dir: Path) -> Path:
    return Path(out_dir) / LOCK_NAME


def read_lock(out_dir: Path) -> dict | None:
    """The lock of a released version, or None when the version was never released."""
    path = lock_path(out_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BuildError(f"{path}: cannot read the release lock: {e}") from None
    try:
        lock = json.loads(text)
    except ValueError as e:
        raise BuildError(f"{path}: not a valid release lock (JSON error: {e})") from None
    if not isinstance(lock, dict) or not isinstance(lock.get("targets"), dict):
        raise BuildError(f"{path}: not a valid release lock (no 'targets' table)")
    return lock


def write_lock(out_dir: Path, lock: dict) -> Path:
    """Write atomically (a scratch file renamed into place)."""
    path = lock_path(out_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(dumps(lock))
    os.replace(tmp, path)
    return path


def dumps(lock: dict) -> str:
    # Sorted keys and a trailing newline: the same lock is always the same bytes.
    return json.dumps(lock, indent=1, sort_keys=True, default=str) + "\n"


# --------------------------------------------------------------------------- what a target is made of


def settings(plan, package) -> dict:
    """The manifest settings behind a package step's upstream keys, in the words a user
    edits them (the record holds only their keys)."""
    steps = {}
    todo = list(package.deps)
    while todo:
        step = plan.steps[todo.pop()]
        steps.setdefault(step.kind, step.params.plain())
        todo.extend(step.deps)
    export, lower = steps.get("export", {}), steps.get("lower", {})
    verify, reference = steps.get("verify", {}), steps.get("reference", {})
    return {
        "export": {k: export.get(k) for k in ("flavour", "max_context_length", "max_prefill_chunk", "task")},
        "lowering": {k: lower.get(k) for k in ("options", "constant_methods")},
        "verification": {"tolerance": verify.get("tolerance"),
                         **{k: reference.get(k) for k in ("prompt", "decode_steps", "seed")}},
    }


def target_inputs(plan, package) -> dict:
    """What the lock keeps of a planned package step to compare later builds with."""
    return {"package_key": package.key, "stem": package.params.stem,
            "inputs": package.params.record, "settings": settings(plan, package)}


# --------------------------------------------------------------------------- planning-time check


def check_plan(plan) -> None:
    """Refuse, before any work, to build a released version from different inputs."""
    problems = []
    for manifest_path, package_names in plan.groups.items():
        packages = [plan.steps[n] for n in package_names]
        by_dir: dict[str, list] = {}
        for step in packages:
            by_dir.setdefault(step.params.out_dir, []).append(step)
        for out_dir, steps in by_dir.items():
            lock = read_lock(Path(out_dir))
            if lock is None:
                continue
            changes = []
            locked = lock["targets"]
            for step in steps:
                target = step.params.record["target"]
                entry = locked.get(target)
                if entry is None:
                    changes.append(f"target {target} added")
                elif entry.get("package_key") != step.key:
                    fields = diff_fields({"inputs": entry.get("inputs", {}), "settings": entry.get("settings", {})},
                                         {"inputs": step.params.record, "settings": settings(plan, step)})
                    changes.append(f"target {target}: {fields}")
            if changes:
                rec = steps[0].params.record
                problems.append(
                    f"{manifest_path}: {rec['name']} {rec['version']} is released ({lock_path(Path(out_dir))}) "
                    f"and its inputs changed: {'; '.join(changes)}; bump `version` in the manifest to build them")
    if problems:
        raise BuildError(" | ".join(problems))


def diff_fields(old: dict, new: dict) -> str:
    """`field (old -> new), ...` over the leaves that differ; step keys only when nothing
    else explains the change (then it is code or tools the record does not name)."""
    changed = [(p, a, b) for p, a, b in _leaf_diff(old, new) if _KEYS not in p.split(".")[:2]]
    if not changed:
        changed = [(p, a, b) for p, a, b in _leaf_diff(old, new)]
    if not changed:
        return "package key differs (inputs not recorded in the lock)"
    return ", ".join(f"{_label(p)} ({_short(a)} -> {_short(b)})" for p, a, b in changed)


def _label(path: str) -> str:
    # "inputs.quantization.linear.group_size" -> "quantization.linear.group_size"
    head, _, rest = path.partition(".")
    label = rest if head in ("inputs", "settings") and rest else path
    if label.startswith("code."):
        return f"{label} (mlxbuild's code of the {label[5:]} step)"
    if label.startswith("keys."):
        return f"{label} (the code or tools of the {label[5:]} step)"
    return label


def _leaf_diff(a, b, path: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            yield from _leaf_diff(a.get(k, _MISSING), b.get(k, _MISSING), f"{path}.{k}" if path else str(k))
    elif a != b:
        yield path, a, b


class _Missing:
    def __repr__(self):
        return "absent"


_MISSING = _Missing()


def _short(v) -> str:
    if v is _MISSING:
        return "absent"
    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12]
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------- publish-time check


def check_rebuilt(out_dir: Path, stem: str, label: str, files: dict) -> None:
    """A released target whose files were deleted is rebuilt from the same inputs: its
    bytes must be the locked ones, or nothing is published."""
    lock = read_lock(Path(out_dir))
    if lock is None:
        return
    entry = next((e for e in lock["targets"].values() if e.get("stem") == stem), None)
    if entry is None:
        raise BuildError(f"{label}: {lock_path(Path(out_dir))} has no target {stem}; "
                         "bump the version to add targets to a released model")
    for name in sorted(set(files) | set(entry["files"])):
        got, want = files.get(name), entry["files"].get(name)
        if got != want:
            what = ("missing from the rebuild" if got is None else "not in the lock" if want is None
                    else f"sha256 {got['sha256'][:12]} size {got['size']} != locked {want['sha256'][:12]} "
                         f"size {want['size']}")
            raise BuildError(f"{label}: rebuilt {name} does not match the release lock ({what}): the build "
                             "did not reproduce the released bytes; nothing published")
