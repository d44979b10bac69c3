"""Where a manifest's weights come from, and their identity, without importing torch.

The identity of a source is what its cache keys hash: the synthetic recipe, or
the sha256 of every checkpoint file that loading reads.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from mlxbuild.errors import BuildError
from mlxbuild.fingerprint import FileHasher

# Files of a Hugging Face folder that change what we load.
CHECKPOINT_GLOBS = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json")


def checkpoint_files(folder: Path) -> list[Path]:
    files = sorted({p for g in CHECKPOINT_GLOBS for p in folder.glob(g) if p.is_file()})
    if not (folder / "config.json").exists():
        raise BuildError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    if not any(p.suffix == ".safetensors" for p in files):
        raise BuildError(f"{folder}: no *.safetensors weights")
    return files


def resolve_hf(repo_id: str, revision: str | None) -> Path:
    """The local snapshot folder of a hub model, downloading only what loading needs.

    huggingface_hub honours HF_HUB_OFFLINE and its cache; with no network and no
    cached copy this fails with a message that says so.
    """
    from huggingface_hub import snapshot_download

    from mlxbuild.tokenizer import FILES

    patterns = list(CHECKPOINT_GLOBS) + list(FILES)
    try:
        # Planning runs on every build, including no-ops: a snapshot already in the local
        # cache is used without asking the Hub. Pin `revision` to a commit to make the
        # choice explicit; a branch is followed only when it is not cached yet.
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # the hub raises many types; all mean "not available here"
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise BuildError(f"cannot get hf:{repo_id}@{revision or 'main'}{hint}: {type(e).__name__}: {e}") from None


def identify(source, manifest_dir: Path, hasher: FileHasher) -> dict:
    """Return {'identity': ..., 'checkpoint': {file: sha256}, 'load': how to load}."""
    if source.synthetic is not None:
        s = source.synthetic
        recipe = {"architecture": s.architecture, "config": s.config, "seed": s.seed,
                  **({"outliers": s.outliers.model_dump()} if s.outliers else {})}
        return {"identity": {"synthetic": recipe}, "checkpoint": {}, "load": {"synthetic": recipe}}
    if source.path is not None:
        folder = _resolve(manifest_dir, source.path)
        if not folder.is_dir():
            raise BuildError(f"model.source.path: {folder} is not a directory")
        files = {p.name: hasher.hash(p) for p in checkpoint_files(folder)}
        return {"identity": {"files": files}, "checkpoint": files, "load": {"path": str(folder)}}
    if source.hf is not None:
        folder = resolve_hf(source.hf, source.revision)
        files = {p.name: hasher.hash(p) for p in checkpoint_files(folder)}
        return {"identity": {"files": files}, "checkpoint": files,
                "load": {"path": str(folder), "hf": source.hf, "revision": source.revision}}
    if source.module is not None:
        module_name, _, attr = source.module.partition(":")
        spec = importlib.util.find_spec(module_name)
        if spec is None or not spec.origin:
            raise BuildError(f"model.source.module: cannot find module {module_name!r}")
        code = hasher.hash(Path(spec.origin))
        recipe = {"module": source.module, "kwargs": source.kwargs or {}}
        return {"identity": {**recipe, "code": code}, "checkpoint": {Path(spec.origin).name: code},
                "load": recipe}
    raise BuildError("model.source: no source given")


def located(manifest, manifest_dir: Path, hasher: FileHasher) -> dict:
    """``identify`` for a manifest, with a local checkpoint and the tokenizer checked
    (``mlxbuild.checkpoint_check``) before any step: a problem is one line at the
    manifest's field, naming the file."""
    from mlxbuild.checkpoint_check import CheckpointError, check_folder, check_tokenizer

    source = manifest.model.source
    field = ("model", "source", "path" if source.path is not None else "hf")
    try:
        src = identify(source, manifest_dir, hasher)
    except BuildError as e:
        if source.path is None and source.hf is None:
            raise
        raise manifest.error_at(field, str(e).removeprefix("model.source.path: ")) from None
    memo = _Checked(hasher)
    if "path" in src["load"] and not memo.seen(src["checkpoint"]):
        try:
            check_folder(Path(src["load"]["path"]))
        except CheckpointError as e:
            raise manifest.error_at(field, str(e)) from None
        memo.add(src["checkpoint"])
    tokenizer = manifest.tokenizer_path
    if tokenizer is not None:
        try:
            file = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
            digest = {"tokenizer": hasher.hash(file)} if file.is_file() else None
            if digest is None or not memo.seen(digest):
                check_tokenizer(tokenizer)
                memo.add(digest)
        except CheckpointError as e:
            raise manifest.error_at(("model", "tokenizer"), str(e)) from None
    return src


def tokenizer_of(manifest, src: dict, hasher: FileHasher) -> dict | None:
    """The tokenizer that travels with the artifacts, as the tokenizer step's params and the
    identity its key hashes: the manifest's ``model.tokenizer`` (a file, with the tokenizer
    files beside it, or a folder), else the checkpoint folder's tokenizer files, else a
    synthetic model's generated tokenizer; None for a module without one."""
    from mlxbuild import tokenizer

    path = manifest.tokenizer_path
    folder = None
    if path is not None:
        folder = path if path.is_dir() else path.parent
        files = {p.name: p for p in tokenizer.files_in(folder)}
        if not path.is_dir():
            # The file named is the tokenizer, whatever its name; its companions come along.
            files = {n: p for n, p in files.items() if n not in tokenizer.LOADABLE}
            files["tokenizer.model" if path.suffix == ".model" else "tokenizer.json"] = path
    elif "path" in src["load"]:
        files = {p.name: p for p in tokenizer.files_in(Path(src["load"]["path"]))}
    elif "synthetic" in src["load"]:
        spec = tokenizer.synthetic_spec(src["load"]["synthetic"]["config"])
        return None if spec is None else {"params": {"synthetic": spec}, "identity": {"synthetic": spec}}
    else:
        return None
    if not files:
        return None
    return {"params": {"files": {n: str(p) for n, p in sorted(files.items())}},
            "identity": {"files": {n: hasher.hash(p) for n, p in sorted(files.items())}}}


def preprocessor_of(src: dict, hasher: FileHasher) -> dict | None:
    """A speech model's audio preprocessor (``mlxbuild.families.audio``), as the preprocessor
    step's params and the identity its key hashes (the shipped config by its content); None
    for a model without one."""
    import json

    from mlxbuild import families
    from mlxbuild.families import audio

    load = src["load"]
    if "synthetic" in load:
        syn = load["synthetic"]
        spec = audio.spec(families.model_type_of(syn["architecture"]), syn.get("config") or {})
    elif "path" in load:
        folder = Path(load["path"])
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
        spec = audio.spec(config.get("model_type"), config, folder)
    else:
        return None
    if spec is None:
        return None
    identity = {**spec, "config_file": hasher.hash(Path(spec["config_file"])) if spec["config_file"] else None}
    return {"params": spec, "identity": identity}


class _Checked:
    """Checkpoints (by their files' hashes) already found well-formed, noted in the hasher's
    state: a no-op build does not read their headers again."""

    def __init__(self, hasher: FileHasher):
        self.hasher = hasher

    @staticmethod
    def _key(files: dict) -> str:
        from mlxbuild.fingerprint import stable_hash

        return "checked:" + stable_hash("checked", files)

    def seen(self, files: dict) -> bool:
        return self.hasher.noted(self._key(files))

    def add(self, files: dict) -> None:
        self.hasher.note(self._key(files))


def _resolve(base: Path, path: str) -> Path:
    p = Path(os.path.expanduser(path))
    return (p if p.is_absolute() else base / p).resolve()
