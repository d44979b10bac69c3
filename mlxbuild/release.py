"""Release a manifest's version: build (or reuse) every target, lock it, bundle it.

    doit release manifests/qwen.yaml        (a doit command plugin, like `build`)
    mlxbuild release manifests/qwen.yaml    (the same from anywhere)

After a successful build of every target, each manifest's version directory
``artifacts/<name>/<version>/`` gets

- ``release.lock.json`` (:mod:`mlxbuild.lock`), written the first time only: from
  then on the version is immutable, and later builds are checked against it;
- the checkpoint's licence file, when its folder has one;
- ``README.md``, the model card (:mod:`mlxbuild.model_card`);

and ``artifacts/<name>/<name>-<version>.tar.gz`` is written from them
(:mod:`mlxbuild.bundle`), byte for byte the same on every release of that version.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from mlxbuild.doit_plugin import DEFAULT_MANIFEST, Build, manifest_args
from mlxbuild.errors import BuildError, MlxbuildError
from mlxbuild.fingerprint import sha256_file
from mlxbuild.lock import LOCK_FORMAT, read_lock, target_inputs, write_lock

# Layer-by-layer tables can be thousands of rows; the lock keeps their summary.
_RECORD_FIELDS = ("backend", "scheme", "dtype", "quantization", "files", "sha256", "size",
                  "verification", "constant_methods", "delegation", "tokenizer", "preprocessor", "etrecord",
                  "runtime_requirements", "quality")
# Where a record may carry a measured speed (written by benchmarking tools).
SPEED_FIELDS = ("speed", "benchmark", "performance")


class Release(Build):
    """Release manifests: `doit release manifests/qwen.yaml` builds every target, then writes
    the version's lock, model card and bundle."""

    name = "release"
    doc_purpose = "build every target, then lock the version and write its bundle (.tar.gz)"
    doc_usage = "[-n N] [-v 0|1|2] MANIFEST.yaml [MANIFEST.yaml ...]"
    doc_description = None

    def execute(self, params, args):
        status = super().execute(params, args)
        if status:
            return status
        from mlxbuild.settings import roots

        paths = list(dict.fromkeys(list(params.get("manifests") or []) + manifest_args(args)))
        try:
            for bundle in release_manifests(paths or [DEFAULT_MANIFEST], roots(),
                                            measure_speed=bool(params.get("measure_speed"))):
                print(f"released {bundle['name']} {bundle['version']}: {bundle['path']} "
                      f"({bundle['size']} bytes, sha256 {bundle['sha256']})")
        except MlxbuildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        return 0


def release_manifests(paths, roots, measure_speed: bool = False) -> list[dict]:
    """Lock and bundle each manifest's version; every target must be built already (with
    ``measure_speed`` as the build had it: it is part of the quality steps' keys)."""
    from mlxbuild.build import plan_manifests
    from mlxbuild.manifest import load_manifest

    plan = plan_manifests(paths, roots, measure_speed=measure_speed)  # refuses inputs that differ from an existing lock
    return [release_one(load_manifest(path), plan, [plan.steps[n] for n in plan.groups[path]])
            for path in paths]


def release_one(manifest, plan, packages) -> dict:
    from mlxbuild import bundle, model_card

    out_dir = Path(packages[0].params.out_dir)
    lock = read_lock(out_dir)
    if lock is not None and sorted(lock["targets"]) != sorted(manifest.target_names):
        raise BuildError(f"{manifest.name} {manifest.version} is released with targets "
                         f"{', '.join(sorted(lock['targets']))}; the manifest now has "
                         f"{', '.join(sorted(manifest.target_names))}: bump `version` to release them")
    if lock is None:
        lock = make_lock(manifest, plan, packages, out_dir)
        check_files(out_dir, lock)
        write_lock(out_dir, lock)
        lock = read_lock(out_dir)  # render from what the file holds (sorted keys), as later releases do
    else:
        check_files(out_dir, lock)
    card = out_dir / "README.md"
    tmp = card.with_name(f".{card.name}.partial")
    tmp.write_text(model_card.render(lock))
    os.replace(tmp, card)  # a reader never sees half a card
    return bundle.write_bundle(out_dir, lock)


def make_lock(manifest, plan, packages, out_dir: Path) -> dict:
    targets = {}
    tools = {}
    for step in packages:
        record = _published_record(out_dir, step)
        entry = target_inputs(plan, step)
        entry.update({k: record.get(k) for k in _RECORD_FIELDS})
        layers = record.get("layer_quantization") or {}
        entry["layer_quantization"] = layers.get("summary")
        entry["speed"] = next((record[k] for k in SPEED_FIELDS if record.get(k)), None)
        entry["methods"] = {name: {io: [{k: v.get(k) for k in ("kind", "dtype", "sizes", "shape_dynamism")}
                                        for v in m.get(io, [])] for io in ("inputs", "outputs")}
                            for name, m in (record.get("methods") or {}).items()}
        targets[record["target"]] = entry
        tools = record.get("tool_versions") or tools
    return {
        "format": LOCK_FORMAT,
        "name": manifest.name,
        "version": manifest.version,
        "manifest_file": manifest.source_file.name if manifest.source_file else None,
        "manifest": manifest.model_dump(mode="json"),
        "tool_versions": tools,
        "license": _license(manifest, out_dir),
        "targets": targets,
    }


def _published_record(out_dir: Path, step) -> dict:
    from mlxbuild.artifacts import record_path

    path = record_path(out_dir, step.params.stem)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        raise BuildError(f"{step.label}: not built ({path} missing); run `doit build` first") from None
    if record.get("package_key") != step.key:
        raise BuildError(f"{step.label}: the published artifact is not the one this manifest builds; "
                         "run `doit build` first")
    return record


def check_files(out_dir: Path, lock: dict) -> None:
    """Every file the lock names is in the version directory with its locked bytes."""
    for target, entry in sorted(lock["targets"].items()):
        for name, want in sorted(entry["files"].items()):
            path = out_dir / name
            if not path.is_file():
                raise BuildError(f"{lock['name']}/{target}: {path} is missing; run `doit build` first")
            got = {"sha256": sha256_file(path), "size": path.stat().st_size}
            if got != want:
                raise BuildError(f"{lock['name']}/{target}: {path} does not match the release lock "
                                 f"(sha256 {got['sha256'][:12]} != locked {want['sha256'][:12]})")
    lic = lock.get("license") or {}
    if lic.get("file"):
        path = out_dir / lic["file"]
        if not path.is_file() or sha256_file(path) != lic["sha256"]:
            raise BuildError(f"{lock['name']}: {path} is missing or differs from the release lock")


# --------------------------------------------------------------------------- the checkpoint's licence


LICENSE_GLOBS = ("LICENSE*", "LICENCE*", "license*", "licence*")


def _license(manifest, out_dir: Path) -> dict | None:
    """The licence of a path/hf checkpoint: a LICENSE* file (copied beside the artifacts)
    and/or `license:` in its README.md front matter."""
    folder = checkpoint_folder(manifest)
    if folder is None:
        return None
    found: dict = {}
    files = sorted({p for g in LICENSE_GLOBS for p in folder.glob(g) if p.is_file()})
    if files:
        src = files[0]
        shutil.copyfile(src, out_dir / src.name)
        found.update(file=src.name, sha256=sha256_file(src), size=src.stat().st_size)
        first = next((ln.strip() for ln in src.read_text(errors="replace").splitlines() if ln.strip()), "")
        found["title"] = first[:120]
    name = front_matter_license(folder / "README.md")
    if name:
        found["name"] = name
    return found or None


def checkpoint_folder(manifest) -> Path | None:
    source = manifest.model.source
    if source.path is not None:
        return manifest.source_path
    if source.hf is not None:
        from mlxbuild.sources import resolve_hf

        return resolve_hf(source.hf, source.revision)
    return None


def front_matter_license(readme: Path) -> str | None:
    """`license` (and `license_name`) from a Hugging Face model card's YAML front matter."""
    import yaml

    try:
        text = readme.read_text(errors="replace")
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    head, sep, _ = text[3:].partition("\n---")
    if not sep:
        return None
    try:
        meta = yaml.safe_load(head)
    except yaml.YAMLError:
        return None
    if not isinstance(meta, dict) or not meta.get("license"):
        return None
    lic = meta["license"]
    lic = ", ".join(map(str, lic)) if isinstance(lic, list) else str(lic)
    if meta.get("license_name"):
        lic += f" ({meta['license_name']})"
    return lic
