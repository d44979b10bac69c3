"""Publish a verified target under artifacts/<name>/<version>/ with its metadata record.

Files are staged on the cache's filesystem and renamed into place, the .pte
first and the metadata record last: the record is what marks an artifact as
complete, so an interrupted build leaves either the old artifact or the new
one, never a partial file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlxbuild.steps import PackageParams

import json
import os
import shutil
from pathlib import Path

from mlxbuild import lock
from mlxbuild.fingerprint import sha256_file

RECORD_SUFFIX = ".json"


def record_path(out_dir: Path, stem: str) -> Path:
    return Path(out_dir) / f"{stem}{RECORD_SUFFIX}"


def is_published(out_dir: Path, stem: str, package_key: str, hasher=None) -> bool:
    """The no-op build's check: the record names this key and every file it lists is there
    with the recorded size and sha256 (through ``hasher``, a FileHasher that remembers
    hashes by size, mtime and inode, so unchanged files are not read again)."""
    rec = record_path(out_dir, stem)
    try:
        meta = json.loads(rec.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("package_key") != package_key:
        return False
    return not mismatches(Path(out_dir), meta, hasher)


def mismatches(out_dir: Path, record: dict, hasher=None) -> list[str]:
    """One line per file of ``record`` that is missing or differs from it."""
    problems = []
    for name, info in (record.get("files") or {}).items():
        path = Path(out_dir) / name
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{path}: missing")
            continue
        if size != info["size"]:
            problems.append(f"{path}: {size} bytes, its record says {info['size']}")
            continue
        digest = hasher.hash(path) if hasher is not None else sha256_file(path)
        if digest != info["sha256"]:
            problems.append(f"{path}: sha256 {digest[:12]} differs from its record's {info['sha256'][:12]}")
    if hasher is not None:
        hasher.save()
    return problems


def unpublish(out_dir: Path, stem: str) -> list[str]:
    """Remove one published artifact: its record first, so nothing is left looking complete."""
    rec = record_path(out_dir, stem)
    try:
        files = list(json.loads(rec.read_text()).get("files", {}))
    except (OSError, ValueError):
        files = [f"{stem}.pte"]
    rec.unlink(missing_ok=True)
    # The tokenizer and preprocessor files are shared by the version's targets: keep those
    # another lists.
    shared = set()
    for other in Path(out_dir).glob(f"*{RECORD_SUFFIX}"):
        try:
            shared |= set(json.loads(other.read_text()).get("files") or {})
        except (OSError, ValueError, AttributeError):
            continue
    for name in files:
        if name not in shared:
            (Path(out_dir) / name).unlink(missing_ok=True)
    return [n for n in files if n not in shared]


def publish(params: PackageParams, cache, package_key: str) -> dict:
    from mlxbuild.cache import CorruptEntry
    from mlxbuild.pte_inspect import inspect_pte
    from mlxbuild.steps import LowerResult, VerifyResult

    lowered = cache.read("lower", params.lower)
    verified = VerifyResult.read(cache.read("verify", params.verify))
    program_sha = cache.files("lower", params.lower)["model.pte"]["sha256"]
    if verified.artifact_sha256 != program_sha:
        # The lowered program was rebuilt since it was verified: verify these bytes first.
        raise CorruptEntry("verify", params.verify, "verify.json",
                           f"verified {str(verified.artifact_sha256)[:12]}, but the lowered "
                           f"program is {program_sha[:12]}")
    lower_info = LowerResult.read(lowered)
    out_dir, stem = Path(params.out_dir), params.stem
    sources = [(lowered / "model.pte", f"{stem}.pte")]
    sources += [(lowered / name, f"{stem}-{name}" if name != "model.ptd" else f"{stem}.ptd")
                for name in lower_info.ptd]
    if lower_info.etrecord:
        sources.append((lowered / lower_info.etrecord, f"{stem}.etrecord"))
    if (verified.model_extra.get("bundled_program") or {}).get("test_cases"):
        # The self-testing program verification wrote and ran (mlxbuild.stages.verify).
        sources.append((cache.read("verify", params.verify) / "model.bpte", f"{stem}.bpte"))
    if params.tokenizer:
        # Shared by the manifest's targets, under the names a runner looks for in a folder.
        tok_dir = cache.read("tokenizer", params.tokenizer)
        sources += [(tok_dir / name, name) for name in params.record["tokenizer"]["files"]]
    if params.preprocessor:
        pre_dir = cache.read("preprocessor", params.preprocessor)
        sources += [(pre_dir / name, name) for name in params.record["preprocessor"]["files"]]

    files = {dest: {"sha256": sha256_file(src), "size": src.stat().st_size} for src, dest in sources}
    _say_if_tampered(out_dir, stem)
    # A released target rebuilt after its files were deleted must come out as the same bytes.
    lock.check_rebuilt(out_dir, stem, f"{params.record['name']}/{params.record['target']}", files)
    pte_info = inspect_pte(lowered / "model.pte")
    from backends.requirements import runtime_requirements

    record = {
        **params.record,
        "package_key": package_key,
        "files": files,
        "sha256": files[f"{stem}.pte"]["sha256"],
        "size": files[f"{stem}.pte"]["size"],
        "methods": pte_info["methods"],
        "constant_methods": pte_info["constant_methods"],
        "delegation": lower_info.delegation,
        # Read from the program: what a runtime must link, import or register to load it.
        "runtime_requirements": runtime_requirements(pte_info["methods"],
                                                     [d for _, d in sources[1:] if d.endswith(".ptd")]),
        "verification": verified.model_dump(mode="json"),
        # For the devtools Inspector: the file beside the .pte, or why it could not be written.
        "etrecord": {"file": f"{stem}.etrecord"} if lower_info.etrecord else
        {"skipped": lower_info.etrecord_problem} if lower_info.etrecord_problem else None,
    }
    if params.quality:
        # The artifact against the unquantized model (mlxbuild.stages.quality), and what the
        # build host measured of its speed when asked.
        from mlxbuild.steps import QualityResult

        measured = QualityResult.read(cache.read("quality", params.quality)).model_dump(mode="json")
        record["speed"] = measured.pop("speed", None)
        record["quality"] = measured
    elif params.record.get("quality_skipped"):
        record["quality"] = {"measured": False, "reason": params.record["quality_skipped"]}
    if params.preprocessor:
        # What the preprocessor step checked its program against (mlxbuild.stages.preprocessor).
        check = json.loads((cache.read("preprocessor", params.preprocessor) / "preprocessor.json").read_text())
        record["preprocessor"] = {**record["preprocessor"], **check}
    if params.quantize:
        quantized = cache.read("quantize", params.quantize)
        record["layer_quantization"] = {
            "summary": json.loads((quantized / "summary.json").read_text()),
            "layers": json.loads((quantized / "layers.json").read_text())}
    out_dir.mkdir(parents=True, exist_ok=True)
    with cache.scratch(prefix="publish-") as staging:
        for src, dest in sources:
            shutil.copyfile(src, staging / dest)
        (staging / (stem + RECORD_SUFFIX)).write_text(json.dumps(record, indent=1, default=str))
        # Drop the old record first so a crash between renames can't pair it with new bytes.
        record_path(out_dir, stem).unlink(missing_ok=True)
        for _, dest in sources:
            _move(staging / dest, out_dir / dest)
        _move(staging / (stem + RECORD_SUFFIX), record_path(out_dir, stem))
    return record


def _say_if_tampered(out_dir: Path, stem: str) -> None:
    """A published artifact that no longer matches its record is replaced: say so."""
    import sys

    try:
        old = json.loads(record_path(out_dir, stem).read_text())
    except (OSError, ValueError):
        return
    for line in mismatches(out_dir, old):
        print(f"warning: {line}; republishing it from the cache", file=sys.stderr, flush=True)


def _move(src: Path, dest: Path) -> None:
    try:
        os.replace(src, dest)
    except OSError:
        # Different filesystems: copy beside the destination under a hidden name, then rename.
        tmp = dest.with_name(f".{dest.name}.partial")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except OSError as e:
            tmp.unlink(missing_ok=True)  # a full disk leaves no debris
            raise OSError(e.errno, e.strerror, str(dest)) from None  # named by where it goes
        except BaseException:
            tmp.unlink(missing_ok=True)  # nor does an interrupt
            raise
