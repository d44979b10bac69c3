"""Release bundles: one reproducible ``.tar.gz`` per version, and its end-to-end check.

A bundle ``artifacts/<name>/<name>-<version>.tar.gz`` holds one folder
``<name>-<version>/`` with every artifact the lock names (``.pte``/``.ptd``), the
lock, the model card ``README.md``, the checkpoint's licence file when there is
one, and ``SHA256SUMS`` over all of them (``sha256sum -c SHA256SUMS`` works in
the extracted folder). Entries are sorted, with fixed mtimes, owners and modes,
and gzip's header carries no time or name: the same version is the same bytes.

``mlxbuild check-bundle B.tar.gz`` (:func:`check_bundle`) checks the checksums,
the lock against the contents (every file listed, sizes, sha256, nothing extra),
that every artifact deserializes, and runs each where this host has a runtime.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from mlxbuild.fingerprint import sha256_file
from mlxbuild.lock import LOCK_NAME

CARD = "README.md"
SUMS = "SHA256SUMS"
# 1980-01-01: a fixed time (zip's epoch; some tools mistrust 1970) for every entry.
FIXED_MTIME = 315532800
SUFFIX = ".tar.gz"


def bundle_path(out_dir: Path, lock: dict) -> Path:
    return Path(out_dir).parent / f"{lock['name']}-{lock['version']}{SUFFIX}"


def member_names(lock: dict) -> list[str]:
    """Every file of the bundle but SHA256SUMS, as named inside its folder."""
    names = {f for entry in lock["targets"].values() for f in entry["files"]}
    names |= {LOCK_NAME, CARD}
    lic = lock.get("license") or {}
    if lic.get("file"):
        names.add(lic["file"])
    return sorted(names)


def write_bundle(out_dir: Path, lock: dict) -> dict:
    """Write the bundle atomically from the version directory; return its path, size, sha256."""
    out_dir = Path(out_dir)
    top = f"{lock['name']}-{lock['version']}"
    names = member_names(lock)
    sums = "".join(f"{sha256_file(out_dir / n)}  {n}\n" for n in names).encode()
    path = bundle_path(out_dir, lock)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            tar.addfile(_info(top, tarfile.DIRTYPE, 0, 0o755))
            for name in sorted(names + [SUMS]):
                if name == SUMS:
                    tar.addfile(_info(f"{top}/{name}", tarfile.REGTYPE, len(sums)), io.BytesIO(sums))
                    continue
                src = out_dir / name
                with open(src, "rb") as f:
                    tar.addfile(_info(f"{top}/{name}", tarfile.REGTYPE, src.stat().st_size), f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"name": lock["name"], "version": lock["version"], "path": str(path),
            "size": path.stat().st_size, "sha256": sha256_file(path)}


def _info(name: str, kind: bytes, size: int, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, size, mode, FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# --------------------------------------------------------------------------- checking a bundle


def check_bundle(bundle: str | os.PathLike, run: bool = True) -> tuple[list[str], list[str]]:
    """Return (problems, notes): one line each. No problems means the bundle is sound."""
    bundle = Path(bundle)
    with tempfile.TemporaryDirectory(prefix="mlxbuild-bundle-") as tmp:
        try:
            top, files = _extract(bundle, Path(tmp))
        except (OSError, tarfile.TarError, EOFError, ValueError) as e:
            return [f"{bundle}: not a readable bundle: {e}"], []
        problems: list[str] = []
        notes: list[str] = []
        hashes = {name: sha256_file(p) for name, p in files.items()}
        problems += _check_sums(files, hashes)
        lock = _read_lock(files, problems)
        if lock is not None:
            want_top = f"{lock.get('name')}-{lock.get('version')}"
            if top != want_top:
                problems.append(f"{top}/: the bundle's folder should be {want_top}/ (from {LOCK_NAME})")
            problems += _check_lock(lock, files, hashes)
            p, n = _check_artifacts(lock, files, hashes, run)
            problems += p
            notes += n
        if not problems:
            notes.insert(0, f"{len(files)} files; {SUMS} and {LOCK_NAME} match the contents")
        return problems, notes


def _extract(bundle: Path, dest: Path) -> tuple[str, dict[str, Path]]:
    """Regular files only, all inside one folder: {name inside the folder: extracted path}."""
    files: dict[str, Path] = {}
    tops = set()
    with tarfile.open(bundle, mode="r:gz") as tar:
        for m in tar:
            parts = PurePosixPath(m.name).parts
            if not parts or m.name.startswith("/") or ".." in parts:
                raise ValueError(f"unsafe entry {m.name!r}")
            tops.add(parts[0])
            if m.isdir():
                continue
            if not m.isfile() or len(parts) != 2:
                raise ValueError(f"unexpected entry {m.name!r} (only files inside one folder)")
            target = dest / parts[1]
            with tar.extractfile(m) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            files[parts[1]] = target
    if len(tops) != 1:
        raise ValueError(f"expected one top folder, found {sorted(tops) or 'none'}")
    return tops.pop(), files


def _check_sums(files: dict, hashes: dict) -> list[str]:
    if SUMS not in files:
        return [f"{SUMS}: missing"]
    listed: dict[str, str] = {}
    problems = []
    for i, line in enumerate(files[SUMS].read_text(errors="replace").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            problems.append(f"{SUMS}:{i}: malformed line {line[:60]!r}")
            continue
        listed[name.lstrip("*")] = digest
    for name, digest in sorted(listed.items()):
        if name not in files:
            problems.append(f"{name}: listed in {SUMS} but missing from the bundle")
        elif hashes[name] != digest:
            problems.append(f"{name}: sha256 {hashes[name][:12]} does not match {SUMS} ({digest[:12]})")
    problems += [f"{name}: not listed in {SUMS}" for name in sorted(set(files) - set(listed) - {SUMS})]
    return problems


def _read_lock(files: dict, problems: list) -> dict | None:
    if LOCK_NAME not in files:
        problems.append(f"{LOCK_NAME}: missing")
        return None
    try:
        lock = json.loads(files[LOCK_NAME].read_text())
        if not isinstance(lock.get("targets"), dict):
            raise ValueError("no 'targets' table")
    except (ValueError, AttributeError) as e:
        problems.append(f"{LOCK_NAME}: not a valid release lock: {e}")
        return None
    return lock


def _check_lock(lock: dict, files: dict, hashes: dict) -> list[str]:
    problems = []
    for target, entry in sorted(lock["targets"].items()):
        for name, want in sorted((entry.get("files") or {}).items()):
            if name not in files:
                problems.append(f"{name}: in {LOCK_NAME} (target {target}) but missing from the bundle")
                continue
            size = files[name].stat().st_size
            if size != want.get("size"):
                problems.append(f"{name}: size {size} does not match {LOCK_NAME} ({want.get('size')})")
            if hashes[name] != want.get("sha256"):
                problems.append(f"{name}: sha256 {hashes[name][:12]} does not match {LOCK_NAME} "
                                f"({str(want.get('sha256'))[:12]})")
    lic = lock.get("license") or {}
    if lic.get("file"):
        if lic["file"] not in files:
            problems.append(f"{lic['file']}: in {LOCK_NAME} (license) but missing from the bundle")
        elif hashes[lic["file"]] != lic.get("sha256"):
            problems.append(f"{lic['file']}: sha256 {hashes[lic['file']][:12]} does not match {LOCK_NAME} "
                            f"({str(lic.get('sha256'))[:12]})")
    for name in ("README.md",):
        if name not in files:
            problems.append(f"{name}: missing (the model card)")
    allowed = set(member_names(lock)) | {SUMS}
    problems += [f"{name}: not in {LOCK_NAME}" for name in sorted(set(files) - allowed)]
    return problems


def _check_preprocessor(path: Path, spec: dict, run: bool) -> str:
    """The audio preprocessor turns a waveform into features of the encoder's shape; a
    problem starts with 'error: '."""
    if not run:
        return f"{path.name}: not run (--no-run)"
    import numpy as np
    import torch

    from backends import et_runtime

    seconds = min(1.5 * spec["features"][2] * 160 / spec["sampling_rate"], spec["max_audio_s"])
    wave = (0.1 * np.random.default_rng(0).standard_normal(int(seconds * spec["sampling_rate"]))).astype(np.float32)
    try:
        with et_runtime.native_stderr_captured():
            out = et_runtime.load(path).run("forward", [torch.from_numpy(wave)])[0]
    except Exception as e:  # noqa: BLE001 - any runtime failure is the program's problem
        return f"error: {path.name}: fails to run: {type(e).__name__}: {str(e)[:200]}"
    mels, frames = spec["features"][1], spec["features"][2]
    # Audio longer than one chunk comes out as whole chunks of the encoder's frames.
    if list(out.shape[:2]) != [1, mels] or out.shape[2] % frames or not np.isfinite(np.asarray(out)).all():
        return f"error: {path.name}: features of shape {list(out.shape)}; the encoder takes [1, {mels}, {frames}] chunks"
    return f"{path.name}: turns {seconds:.2f} s of audio into {out.shape[2] // frames} chunks of [1, {mels}, {frames}] features"


def _program_methods(info: dict) -> list[str]:
    return sorted(m for m in info["methods"] if m not in (info.get("constant_methods") or {}))


def _check_etrecord(path: Path, info: dict) -> str:
    """'' when the ETRecord parses as the devtools Inspector reads it and records the
    program's methods."""
    from backends.et_runtime import etrecord_methods

    try:
        recorded = etrecord_methods(path)
    except Exception as e:  # noqa: BLE001 - a damaged zip or graph raises many kinds of error
        return f"{path.name}: does not parse as an ETRecord: {type(e).__name__}: {str(e)[:160]}"
    if recorded != _program_methods(info):
        return f"{path.name}: records methods {recorded}, the program has {_program_methods(info)}"
    return ""


def _check_artifacts(lock: dict, files: dict, hashes: dict, run: bool) -> tuple[list[str], list[str]]:
    from mlxbuild.pte_inspect import inspect_pte

    problems, notes = [], []
    preprocessors_checked: set[str] = set()
    for target, entry in sorted(lock["targets"].items()):
        shared = set((entry.get("preprocessor") or {}).get("files") or [])
        for name in sorted(shared - preprocessors_checked):
            if name.endswith(".pte") and name in files and hashes[name] == entry["files"].get(name, {}).get("sha256"):
                preprocessors_checked.add(name)
                problem = _check_preprocessor(files[name], entry["preprocessor"], run)
                (problems if problem.startswith("error:") else notes).append(problem.removeprefix("error: "))
        for name, want in sorted((entry.get("files") or {}).items()):
            if not name.endswith(".pte") or name not in files or name in shared:
                continue
            try:
                info = inspect_pte(files[name])
            except Exception as e:  # a damaged flatbuffer raises many kinds of error
                problems.append(f"{name}: does not deserialize: {e}")
                continue
            if hashes[name] != want.get("sha256"):
                continue  # never execute bytes the lock does not vouch for
            etrecord = name[:-4] + ".etrecord"
            if etrecord in files and hashes[etrecord] == (entry["files"].get(etrecord) or {}).get("sha256"):
                problem = _check_etrecord(files[etrecord], info)
                if problem:
                    problems.append(problem)
                else:
                    notes.append(f"{etrecord}: parses as the devtools Inspector reads it "
                                 f"(methods {', '.join(_program_methods(info))})")
            backend = entry.get("backend")
            tokenizer = _tokenizer_of(entry, files)
            if tokenizer is not None:
                from backends.et_runtime import native_stderr_captured
                from mlxbuild import tokenizer as tok

                # The C++ tokenizer logs its regex registration to fd 2.
                with native_stderr_captured():
                    found = tok.check(tokenizer, info.get("constant_methods") or {})
                problems += [f"{name}: tokenizer: {line}" for line in found]
                if found:
                    continue
            if not run:
                notes.append(f"{name}: deserializes; not run (--no-run)")
                continue
            ptds = [files[n] for n in sorted(entry["files"]) if n.endswith(".ptd") and n in files]
            try:
                how, result = run_artifact(files[name], backend, info, ptds)
            except _NoRuntime as e:
                notes.append(f"{name}: deserializes; not run ({e})")
                continue
            except Exception as e:  # noqa: BLE001 - any runtime failure is this artifact's problem
                problems.append(f"{name}: fails to run on {backend}: {type(e).__name__}: {str(e)[:200]}")
                continue
            if result:
                problems.append(f"{name}: ran on {how} but {result}")
                continue
            notes.append(f"{name}: deserializes and runs ({how})")
            bundled = (entry.get("verification") or {}).get("bundled_program")
            bpte = name[:-4] + ".bpte"
            if bundled and bpte in files and hashes[bpte] == (entry["files"].get(bpte) or {}).get("sha256"):
                from backends.et_runtime import run_bundled_program

                problem = run_bundled_program(files[bpte], bundled["method"], bundled["atol"], bundled["rtol"])
                if problem:
                    problems.append(f"{bpte}: its bundled test fails: {problem}")
                else:
                    notes.append(f"{bpte}: its {bundled['test_cases']} bundled test passes "
                                 f"(atol {bundled['atol']:.3g})")
            if tokenizer is not None and _llm_runner(backend) and "forward" in info["methods"]:
                try:
                    from backends.et_runtime import native_stderr_captured, text_llm_generate
                    from mlxbuild import tokenizer as tok

                    with native_stderr_captured():
                        prompt, _ = tok.runner_prompt(tokenizer, 8)
                        pieces = text_llm_generate(files[name], tokenizer, prompt, ptds[0] if ptds else None)
                    notes.append(f"{name}: TextLLMRunner with the bundle's tokenizer: {len(pieces)} "
                                 f"tokens after an 8-token prompt")
                except Exception as e:  # noqa: BLE001 - the runner's failure is this artifact's
                    problems.append(f"{name}: TextLLMRunner with the bundle's tokenizer fails: {e}")
    return problems, notes


def _tokenizer_of(entry: dict, files: dict) -> Path | None:
    """The folder of the extracted bundle that holds the target's tokenizer; None when the
    target lists none. A listed file that is missing is the lock check's problem."""
    listed = (entry.get("tokenizer") or {}).get("files") or []
    present = [files[n] for n in listed if n in files]
    return present[0].parent if present and len(present) == len(listed) else None


def _llm_runner(backend: str) -> bool:
    import backends

    try:
        return bool(getattr(backends.backend(backend), "LLM_RUNNER", False))
    except ValueError:
        return False


class _NoRuntime(Exception):
    pass


def run_artifact(pte: Path, backend: str, info: dict, ptds: list[Path]) -> tuple[str, str]:
    """Run every method once on this host's runtime for `backend` (a short prefill for an
    LLM's forward, zeros of the declared shapes otherwise); return (runtime, problem or '')."""
    import backends
    from backends.et_runtime import native_stderr_captured

    try:
        runtime = backends.runtime_module_name(backend)
    except ValueError:
        raise _NoRuntime(f"no {backend} runtime in mlxbuild") from None
    if runtime is None:
        raise _NoRuntime(f"{backend} is checked structurally only on this host")
    if runtime == "mlx_runtime":
        try:
            import mlx.core  # noqa: F401
        except ImportError:
            raise _NoRuntime("mlx is not installed here") from None
    import importlib

    why = getattr(importlib.import_module(runtime), "unavailable", lambda: "")()
    if why:
        raise _NoRuntime(f"{backend} programs do not run here: {why}")
    inputs = {name: sample_inputs(m["inputs"]) for name, m in info["methods"].items()}
    with native_stderr_captured():
        program = backends.open_program(pte, backend, ptds)
        outputs = {name: program.run(name, args) for name, args in inputs.items()}
    how = "mlxbuild MLX runtime" if runtime == "mlx_runtime" else getattr(program, "runs_on", "executorch.runtime")
    for name, outs in outputs.items():
        for i, out in enumerate(outs):
            if hasattr(out, "is_floating_point") and out.is_floating_point() and not out.float().isfinite().all():
                return how, f"{name} output {i} has non-finite values"
    return how, ""


def sample_inputs(specs: list[dict]) -> list:
    """Torch tensors for one call: a short prefill for an LLM's (tokens, positions), else
    zeros of each input's declared (upper-bound) shape."""
    import torch

    llm = (len(specs) == 2 and all(s.get("kind") == "Tensor" and s["dtype"] == "int64" for s in specs)
           and len(specs[0]["sizes"]) == 2 and len(specs[1]["sizes"]) == 1)
    if llm:
        t = min(4, specs[1]["sizes"][0])
        return [torch.zeros((1, t), dtype=torch.int64), torch.arange(t, dtype=torch.int64)]
    out = []
    for s in specs:
        dtype = getattr(torch, s.get("dtype", ""), None) if s.get("kind") == "Tensor" else None
        if not isinstance(dtype, torch.dtype):
            raise _NoRuntime(f"a method takes a {s.get('dtype') or s.get('kind')} input mlxbuild cannot make up")
        out.append(torch.zeros(s["sizes"], dtype=dtype))
    return out


def main(bundles: list[str], run: bool = True) -> int:
    """`mlxbuild check-bundle`: notes on stdout, one line per problem on stderr, exit 1 on any."""
    import sys

    from mlxbuild.progress import quiet_libraries

    quiet_libraries()
    status = 0
    for bundle in bundles:
        problems, notes = check_bundle(bundle, run=run)
        for line in problems:
            print(f"error: {bundle}: {line}", file=sys.stderr)
        if problems:
            status = 1
        else:
            for line in notes:
                print(f"ok: {bundle}: {line}")
    return status
