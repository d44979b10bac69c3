"""End-to-end behaviour of `doit build`: artifacts, caching, sharing, verification, doit verbs.

One cold build of manifests/qwen.yaml runs once for the module (the `cold` fixture,
~1 min); every other test works on a copy of its working directory (`warm`), so it
starts from a warm cache and cannot disturb the others. Builds run as subprocesses,
exactly as a user runs them, against a copy of the source frozen at session start
(see `frozen_source` in conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import mlxbuild
from buildlog import KINDS, STEP_LINE, doit_command

from mlxbuild.plan import VERIFY_DECODE_STEPS, VERIFY_PROMPT

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "manifests/qwen.yaml"
NAME, VERSION = "qwen3-tiny", "0.1.0"
TARGETS = ("mlx-4w", "xnnpack-8da4w", "portable-fp32")
# One weights step feeds three schemes; every target gets its own lower/verify/package.
COLD_STEPS = {"weights": 1, "tokenizer": 1, "quantize": 3, "export": 3, "reference": 3,
              "lower": 3, "verify": 3, "baseline": 1, "quality": 3, "package": 3}
ALL_STEPS = sum(COLD_STEPS.values())

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Result:
    args: list
    rc: int
    out: str
    err: str
    seconds: float

    def steps(self, marker: str) -> list[tuple[str, str]]:
        """(kind, label) of the step lines with `marker`: '.' started, 'ok' finished, '--' up to date."""
        want = {".": ".  ", "ok": "ok ", "--": "-- "}[marker]
        found = []
        for line in self.out.splitlines():
            m = STEP_LINE.match(line)
            if m and m.group(1) == want:
                found.append((m.group(2), m.group(3)))
        return found

    @property
    def ran(self) -> list[tuple[str, str]]:
        return self.steps(".")

    def ran_kinds(self) -> Counter:
        return Counter(kind for kind, _ in self.ran)

    def labels(self, kind: str, marker: str = ".") -> set[str]:
        return {label for k, label in self.steps(marker) if k == kind}

    def __str__(self) -> str:  # shown when an assertion about this run fails
        tail = lambda s: "\n".join(s.strip().splitlines()[-40:])  # noqa: E731
        return (f"$ {' '.join(map(str, self.args))}  (exit {self.rc}, {self.seconds:.1f} s)\n"
                f"--- stdout ---\n{tail(self.out)}\n--- stderr ---\n{tail(self.err)}")


class Workspace:
    """A working directory with manifests/, its cache and its artifacts, all inside `root`."""

    def __init__(self, root: Path, make_env):
        self.root = Path(root)
        self.cache = self.root / "cache"
        self.artifacts = self.root / "artifacts"
        self._make_env = make_env

    def env(self, **overrides) -> dict:
        return self._make_env(**{"MLXBUILD_CACHE": self.cache,
                                 "MLXBUILD_ARTIFACTS": self.artifacts, **overrides})

    def run(self, args: list[str], timeout: float = 600, **env) -> Result:
        start = time.monotonic()
        p = subprocess.run(args, cwd=self.root, env=self.env(**env), capture_output=True,
                           text=True, timeout=timeout)
        return Result(args, p.returncode, p.stdout, p.stderr, time.monotonic() - start)

    def doit(self, *args: str, **env) -> Result:
        return self.run(doit_command() + list(args), **env)

    def build(self, *args: str, **env) -> Result:
        return self.doit("build", *(args or (MANIFEST,)), **env)

    def clone(self, dest: Path) -> "Workspace":
        shutil.copytree(self.root, dest, symlinks=True)
        return Workspace(dest, self._make_env)

    # -- what a build leaves behind
    def out_dir(self, name: str = NAME, version: str = VERSION, artifacts: Path | None = None) -> Path:
        return (artifacts or self.artifacts) / name / version

    def pte(self, target: str, name: str = NAME, **kw) -> Path:
        return self.out_dir(name, **kw) / f"{name}-{target}.pte"

    def record_path(self, target: str, name: str = NAME, **kw) -> Path:
        return self.out_dir(name, **kw) / f"{name}-{target}.json"

    def record(self, target: str, name: str = NAME, **kw) -> dict:
        return json.loads(self.record_path(target, name, **kw).read_text())

    def entry(self, kind: str, key: str) -> Path:
        return self.cache / kind / key[:2] / key

    def entries(self, kind: str) -> list[Path]:
        return sorted(p for p in (self.cache / kind).glob("*/*") if p.is_dir())

    def remove_entries(self, *kinds: str) -> None:
        for kind in kinds:
            shutil.rmtree(self.cache / kind, ignore_errors=True)

    def scratch_left(self) -> list[Path]:
        tmp = self.cache / "tmp"
        return sorted(tmp.iterdir()) if tmp.exists() else []


def fingerprint(paths) -> dict:
    """Bytes and mtime of each file: 'untouched' means both are the same afterwards."""
    return {str(p): (sha256(p), os.stat(p).st_mtime_ns) for p in paths}


def artifact_files(ws: Workspace, targets=TARGETS, **kw) -> list[Path]:
    return [f for t in targets for f in (ws.pte(t, **kw), ws.record_path(t, **kw))]


def without(record: dict, *fields: str) -> dict:
    return {k: v for k, v in record.items() if k not in fields}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cold(tmp_path_factory, subprocess_env):
    """The default manifest built once from nothing: (workspace, result)."""
    root = tmp_path_factory.mktemp("cold")
    (root / "manifests").mkdir()
    shutil.copy(REPO / MANIFEST, root / MANIFEST)
    ws = Workspace(root, subprocess_env)
    result = ws.build()
    assert result.rc == 0, result
    return ws, result


@pytest.fixture
def warm(cold, tmp_path) -> Workspace:
    """A private copy of the cold build's working directory (manifests, cache, artifacts)."""
    return cold[0].clone(tmp_path / "ws")


# --------------------------------------------------------------------------- 1. end to end


def test_cold_build_runs_every_step_once(cold):
    ws, result = cold
    assert result.rc == 0, result
    assert result.ran_kinds() == Counter(COLD_STEPS), result
    assert not result.steps("--"), result
    # Every step that started also finished.
    assert sorted(result.steps("ok")) == sorted(result.ran), result
    for kind in ("lower", "verify", "package"):
        assert result.labels(kind) == {f"{NAME}/{t}" for t in TARGETS}, result
    published = sorted(p.name for p in ws.out_dir().iterdir())
    assert published == sorted([f"{NAME}-{t}{ext}" for t in TARGETS for ext in (".json", ".pte", ".etrecord")]
                               + [f"{NAME}-{t}.bpte" for t in TARGETS if not t.startswith("mlx")]
                               + ["tokenizer.json", "tokenizer_config.json"])
    assert not ws.scratch_left()


EXPECTED = {
    "mlx-4w": {"backend": "mlx", "scheme": "4w", "delegate": "MLXBackend", "tolerance": 1e-3,
               "quantization": {"linear": {"format": "affine", "bits": 4, "group_size": 32,
                                           "activations": "none"},
                                "embedding": {"format": "affine", "bits": 4, "group_size": 32,
                                              "activations": "none"}}},
    "xnnpack-8da4w": {"backend": "xnnpack", "scheme": "8da4w", "delegate": "XnnpackBackend",
                      "tolerance": 5e-2,
                      "quantization": {"linear": {"format": "affine", "bits": 4, "group_size": 32,
                                                  "activations": "int8_dynamic"},
                                       "embedding": {"format": "affine", "bits": 8,
                                                     "group_size": "per_channel",
                                                     "activations": "none"}}},
    "portable-fp32": {"backend": "portable", "scheme": "none", "delegate": None, "tolerance": 1e-4,
                      "quantization": {"linear": None, "embedding": None}},
}

CONSTANT_METHODS = {"get_max_seq_len": 128, "get_max_context_len": 128, "get_prefill_chunk_size": 128,
                    "use_kv_cache": True, "enable_dynamic_shape": True, "get_vocab_size": 512,
                    "get_bos_id": 1, "get_eos_ids": [2]}


@pytest.mark.parametrize("target", TARGETS)
def test_cold_build_record(cold, target):
    ws, _ = cold
    want = EXPECTED[target]
    pte, rec = ws.pte(target), ws.record(target)
    data = pte.read_bytes()

    # The record describes exactly the bytes next to it.
    assert rec["sha256"] == hashlib.sha256(data).hexdigest()
    assert rec["size"] == len(data) > 0
    assert rec["files"][pte.name] == {"sha256": rec["sha256"], "size": len(data)}
    # Beside it: the tokenizer (shared by the version's targets), the ETRecord and, for the
    # targets ExecuTorch's runtime verifies here, the self-testing bundled program.
    extra = {"tokenizer.json", "tokenizer_config.json", pte.with_suffix(".etrecord").name}
    if want["backend"] in ("xnnpack", "portable"):
        extra.add(pte.with_suffix(".bpte").name)
    assert set(rec["files"]) == {pte.name} | extra
    assert rec["tokenizer"] == {"files": ["tokenizer.json", "tokenizer_config.json"]}
    for name, info in rec["files"].items():
        assert hashlib.sha256((pte.parent / name).read_bytes()).hexdigest() == info["sha256"], name

    assert (rec["name"], rec["version"], rec["target"]) == (NAME, VERSION, target)
    assert (rec["backend"], rec["scheme"], rec["dtype"]) == (want["backend"], want["scheme"], "fp32")
    assert rec["quantization"] == want["quantization"]
    assert rec["source"]["synthetic"]["architecture"] == "qwen3"

    versions = rec["tool_versions"]
    for tool in ("torch", "executorch", "torchao", "transformers"):
        assert versions[tool] == metadata.version(tool), tool
    assert versions["mlxbuild"] == mlxbuild.__version__, versions
    # Our code is recorded per step, as the code hash each key covers.
    assert set(rec["code"]) == {"weights", "tokenizer", "quantize", "export", "reference", "lower", "verify",
                                "baseline", "quality", "package"}
    assert all(re.fullmatch(r"[0-9a-f]{16}", h) for h in rec["code"].values()), rec["code"]

    # Content keys of every step that made it, each a complete cache entry.
    assert set(rec["keys"]) == {"weights", "tokenizer", "quantize", "export", "lower", "verify", "quality"}
    for kind, key in rec["keys"].items():
        assert HEX64.match(key), (kind, key)
        assert (ws.entry(kind, key) / ".complete").exists(), kind
    assert HEX64.match(rec["package_key"])

    # The program: one `forward(tokens, positions) -> logits` and the LLM runner's metadata.
    assert list(rec["methods"]) == ["forward"]
    forward = rec["methods"]["forward"]
    assert (forward["num_inputs"], forward["num_outputs"]) == (2, 1)
    assert forward["outputs"][0]["dtype"] == "float32"
    assert forward["outputs"][0]["sizes"][-1] == 512
    assert rec["constant_methods"] == CONSTANT_METHODS

    # Delegation: what the lowering reports and what the serialized program contains agree.
    summary = rec["delegation"]["forward"]
    in_program = {d["backend_id"] for d in forward["delegates"]}
    if want["delegate"]:
        assert summary["delegates"] and set(summary["delegates"]) == {want["delegate"]}, summary
        assert summary["delegated_ops"], summary
        assert in_program == {want["delegate"]}
    else:
        assert summary["delegates"] == [] and summary["delegated_ops"] == {}, summary
        assert summary["portable_ops"], summary
        assert in_program == set()

    check = rec["verification"]
    assert check["passed"] is True, check
    if target == "mlx-4w" and not check["executed"]:
        # No MLX runtime on this host: the structural check.
        assert check["delegates"] == ["MLXBackend"], check
        assert "structural" in check["check"], check
    else:
        assert check["executed"] is True, check
        assert check["positions"] == VERIFY_PROMPT + VERIFY_DECODE_STEPS
        assert check["tolerance"]["max_rel_error"] == pytest.approx(want["tolerance"])
        assert 0.0 <= check["max_abs_error"] and 0.0 <= check["max_rel_error"] <= want["tolerance"]
        assert 0.0 <= check["top1_agreement"] <= 1.0
        assert check["top1_agreement_decisive"] >= check["tolerance"]["min_top1_agreement"]


# --------------------------------------------------------------------------- 2. no-op rebuild


def test_noop_rebuild_runs_nothing(warm):
    before = fingerprint(artifact_files(warm))
    result = warm.build()
    assert result.rc == 0, result
    step_lines = [ln for ln in result.out.splitlines() if STEP_LINE.match(ln)]
    assert len(step_lines) == ALL_STEPS, result
    assert all(ln.startswith("-- ") for ln in step_lines), result
    assert fingerprint(artifact_files(warm)) == before


def test_noop_rebuild_does_not_import_torch(warm):
    code = ("import sys\n"
            "from doit.doit_cmd import DoitMain\n"  # what the `doit` script runs
            f"rc = DoitMain().run(['build', {MANIFEST!r}])\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'executorch', 'torchao'})\n"
            "assert not heavy, f'imported: {heavy}'\n"
            "sys.exit(rc)\n")
    result = warm.run([sys.executable, "-c", code])
    assert result.rc == 0, result
    assert not result.ran and len(result.steps("--")) == ALL_STEPS, result


# --------------------------------------------------------------------------- 3. one target changed


def test_changing_one_target_rebuilds_only_that_target(warm):
    others = [t for t in TARGETS if t != "mlx-4w"]
    untouched = fingerprint(artifact_files(warm, others))
    old_mlx = warm.record("mlx-4w")

    manifest = warm.root / MANIFEST
    text = manifest.read_text()
    new = text.replace("  4w:\n    linear: {bits: 4, group_size: 32}\n    embedding: {bits: 4, group_size: 32}",
                       "  4w:\n    linear: {bits: 4, group_size: 64}\n    embedding: {bits: 4, group_size: 64}")
    assert new != text, "the manifest's 4w scheme changed shape; update this test"
    manifest.write_text(new)

    result = warm.build()
    assert result.rc == 0, result
    # The 4w scheme feeds only the mlx target: its chain re-runs, nothing else does.
    assert result.ran_kinds() == Counter(quantize=1, export=1, reference=1, lower=1, verify=1,
                                         quality=1, package=1), result
    assert result.labels("quantize") == {f"{NAME} 4w"}, result
    assert result.labels("reference") == {f"{NAME} 4w"}, result
    assert {label.split("/")[0] for label in result.labels("export")} == {f"{NAME} 4w"}, result
    for kind in ("lower", "verify", "package"):
        assert result.labels(kind) == {f"{NAME}/mlx-4w"}, result
    assert len(result.steps("--")) == ALL_STEPS - 7, result

    assert fingerprint(artifact_files(warm, others)) == untouched
    rec = warm.record("mlx-4w")
    assert rec["quantization"]["linear"]["group_size"] == 64
    assert rec["sha256"] == sha256(warm.pte("mlx-4w")) != old_mlx["sha256"]
    assert rec["keys"]["weights"] == old_mlx["keys"]["weights"]
    assert rec["keys"]["quantize"] != old_mlx["keys"]["quantize"]
    assert rec["verification"]["passed"] is True


# --------------------------------------------------------------------------- 4. shared across manifests


def test_second_manifest_reuses_lowered_programs(warm):
    other = warm.root / "manifests" / "other.yaml"
    text = (warm.root / MANIFEST).read_text()
    text = text.replace(f"name: {NAME}\n", "name: other-tiny\n").replace(
        f"version: {VERSION}\n", "version: 2.0.0\n")
    assert "name: other-tiny\n" in text and "version: 2.0.0\n" in text
    other.write_text(text)
    first = fingerprint(artifact_files(warm))

    result = warm.build("manifests/other.yaml")
    assert result.rc == 0, result
    # Same model, schemes and backends: every cache step (lowering and verification
    # included, they are keyed by content, not by manifest name) is shared; only the
    # new name/version gets published.
    assert result.ran_kinds() == Counter(package=3), result
    assert result.labels("package") == {f"other-tiny/{t}" for t in TARGETS}, result

    assert fingerprint(artifact_files(warm)) == first
    for t in TARGETS:
        mine, theirs = warm.record(t), warm.record(t, name="other-tiny", version="2.0.0")
        assert (theirs["name"], theirs["version"]) == ("other-tiny", "2.0.0")
        assert theirs["keys"] == mine["keys"]
        assert theirs["package_key"] != mine["package_key"]
        assert sha256(warm.pte(t, name="other-tiny", version="2.0.0")) == sha256(warm.pte(t))


# --------------------------------------------------------------------------- 5. reproducible


def test_evicted_lowering_is_not_rebuilt_while_its_consumers_are_done(warm):
    warm.remove_entries("lower")
    result = warm.build()
    assert result.rc == 0, result
    assert not result.ran, result


# slow: ~50 s (a second cold lowering); byte identity across builds stays in the default run through
# test_parallel_build_is_byte_identical and tests/test_ray.py's Ray-vs-local comparison.
@pytest.mark.slow
def test_relowering_from_cache_is_byte_identical_to_cold_build(warm, cold):
    cold_ws = cold[0]
    warm.remove_entries("lower", "verify")
    fresh = warm.root / "artifacts2"
    result = warm.build(MLXBUILD_ARTIFACTS=fresh)
    assert result.rc == 0, result
    # Lowered again from the cached exports: nothing upstream of `lower` ran.
    assert result.ran_kinds() == Counter(lower=3, verify=3, package=3), result
    for t in TARGETS:
        assert sha256(warm.pte(t, artifacts=fresh)) == sha256(cold_ws.pte(t)), t
        again, first = warm.record(t, artifacts=fresh), cold_ws.record(t)
        assert without(again, "verification") == without(first, "verification"), t
        assert again["verification"]["passed"] is True


# --------------------------------------------------------------------------- 6. parallel


def test_parallel_build_is_byte_identical(warm, cold):
    cold_ws = cold[0]
    # Two targets lose their export, lowering and verification (the third, XNNPACK, is
    # relowered serially above and takes half a minute on its own), so two worker
    # processes each run an export -> lower -> verify -> package chain side by side.
    again, kept = ("mlx-4w", "portable-fp32"), "xnnpack-8da4w"
    for t in again:
        keys = warm.record(t)["keys"]
        for kind in ("export", "lower", "verify"):
            shutil.rmtree(warm.entry(kind, keys[kind]))
        for path in artifact_files(warm, [t]):
            path.unlink()
    untouched = fingerprint(artifact_files(warm, [kept]))

    result = warm.build("-n", "2", MANIFEST)  # doit options go before the positional arguments
    assert result.rc == 0, result
    assert result.ran_kinds() == Counter(export=2, lower=2, verify=2, package=2), result
    assert result.labels("package") == {f"{NAME}/{t}" for t in again}, result
    for t in again:
        assert sha256(warm.pte(t)) == sha256(cold_ws.pte(t)), t
        assert without(warm.record(t), "verification") == without(cold_ws.record(t), "verification")
    assert fingerprint(artifact_files(warm, [kept])) == untouched
    assert not warm.scratch_left()
    noop = warm.build()
    assert noop.rc == 0 and not noop.ran, noop


# --------------------------------------------------------------------------- 7. verification bites


def reseal(entry: Path) -> None:
    """Record an entry's current files in its marker, as if a step had written them."""
    from mlxbuild.cache import COMPLETE, inventory

    (entry / COMPLETE).write_text(json.dumps({"format": 1, "files": inventory(entry)}))


def _corrupt_reference_logits(ws: Workspace, target: str) -> str:
    """Every scheme's reference logits are shifted, in every 7th vocabulary column, by the
    largest logit: far outside any tolerance, however the checkpoint's logits are scaled."""
    for entry in ws.entries("reference"):
        logits = np.load(entry / "logits.npy")
        logits[:, ::7] += np.abs(logits).max()
        np.save(entry / "logits.npy", logits)
        reseal(entry)  # wrong but consistent (a bug, not a damaged file: that is rebuilt)
    return r"verification failed: max abs error [0-9.e+-]+ \([0-9.e+-]+ of the largest logit, allowed [0-9.e+-]+\), top-1 agreement [0-9.]+%"


def _swap_lowered_program(ws: Workspace, target: str) -> str:
    """The cached mlx program is replaced by the portable one (no MLX delegate in it).
    The MLX runtime would still execute it (its kernels run on torch), so the failure
    comes from the numbers (fp32 program against 4-bit reference logits) or, were
    those close, from the structural check that follows them."""
    lowered = ws.entry("lower", ws.record(target)["keys"]["lower"]) / "model.pte"
    shutil.copyfile(ws.entry("lower", ws.record("portable-fp32")["keys"]["lower"]) / "model.pte", lowered)
    reseal(lowered.parent)
    return r"verification failed: (forward: MLX delegate missing|max abs error)"


@pytest.mark.parametrize("target, sabotage", [("xnnpack-8da4w", _corrupt_reference_logits),
                                              ("mlx-4w", _swap_lowered_program)],
                         ids=["numerical", "structural"])
def test_verification_failure_fails_the_build_and_keeps_the_published_artifact(warm, target, sabotage):
    expected = sabotage(warm, target)
    verify_key = warm.record(target)["keys"]["verify"]
    shutil.rmtree(warm.entry("verify", verify_key))
    # Make the published artifact one from an earlier build (another package key),
    # so this build has to verify and publish the target again.
    rec_path = warm.record_path(target)
    stale = warm.record(target)
    stale["package_key"] = "0" * 64
    rec_path.write_text(json.dumps(stale, indent=1))
    before = fingerprint(artifact_files(warm))

    result = warm.build()
    assert result.rc == 4, result  # a verification failure (see mlxbuild.report for the codes)
    output = result.out + result.err
    assert re.search(rf"{NAME}/{target}: {expected}", output), result
    assert result.ran_kinds() == Counter(verify=1), result  # no publish after the failure
    assert not warm.entry("verify", verify_key).exists()
    assert not warm.scratch_left()
    # Nothing already built is lost: the published files are exactly as they were.
    assert fingerprint(artifact_files(warm)) == before
    assert (warm.entry("lower", stale["keys"]["lower"]) / ".complete").exists()


# --------------------------------------------------------------------------- 8. bad manifest


@pytest.mark.parametrize("old, new, field, message", [
    ("backend: mlx", "backend: metal", "targets[0].backend", "'metal' is not allowed"),
    ("quantization: 8da4w", "quantization: 8da8w", "targets[1].quantization",
     "unknown quantization scheme '8da8w'"),
], ids=["unknown-backend", "unknown-scheme"])
def test_bad_manifest_is_one_line_error_and_creates_nothing(tmp_path, subprocess_env, old, new,
                                                            field, message):
    (tmp_path / "manifests").mkdir()
    text = (REPO / MANIFEST).read_text()
    assert text.count(old) == 1
    bad = tmp_path / "manifests" / "bad.yaml"
    bad.write_text(text.replace(old, new))
    line = next(i for i, ln in enumerate(bad.read_text().splitlines(), 1) if new in ln)

    ws = Workspace(tmp_path, subprocess_env)
    result = ws.build("manifests/bad.yaml")
    assert result.rc == 3, result  # a bad manifest
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result
    assert re.fullmatch(rf"(error: )?manifests/bad\.yaml:{line}:\d+: {re.escape(field)}: "
                        rf"{re.escape(message)}.*", lines[0]), result
    assert result.out.strip() == "", result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifests"]  # no cache, no artifacts, no db


# --------------------------------------------------------------------------- 9. doit verbs


@pytest.fixture
def verbs(warm) -> Workspace:
    """The warm workspace, with a pyproject that makes plain doit verbs read manifests."""
    (warm.root / "pyproject.toml").write_text('[tool.doit]\nloader = "mlxbuild"\n')
    return warm


def test_doit_list(verbs):
    result = verbs.doit("list", MANIFEST)
    assert result.rc == 0, result
    assert re.search(rf"^{re.escape(MANIFEST)}\s+build every target of {re.escape(MANIFEST)}$",
                     result.out, re.M), result

    # `--all` lists subtasks of the named tasks, and the manifest's group task has none
    # (its steps are task_dep): every step shows when no task is named, which selects
    # the default manifest.
    result = verbs.doit("list", "--all")
    assert result.rc == 0, result
    names = {ln.split()[0] for ln in result.out.splitlines() if ln.strip()}
    for kind in ("lower", "verify", "package"):
        assert {f"{kind}:{NAME}/{t}" for t in TARGETS} <= names, result
    assert MANIFEST in names
    assert sum(1 for n in names if ":" in n) == ALL_STEPS, result


def test_doit_info_on_a_step(verbs):
    result = verbs.doit("info", f"lower:{NAME}/xnnpack-8da4w")
    assert result.rc == 0, result
    assert re.search(r"status\s*:\s*up-to-date", result.out), result
    assert re.search(r"^ - export:8da4w\.", result.out, re.M), result


def test_doit_info_on_a_built_manifest_says_up_to_date(verbs):
    result = verbs.doit("info", MANIFEST)
    assert result.rc == 0, result
    assert re.search(r"status\s*:\s*up-to-date", result.out), result


def test_doit_forget_keeps_content_keyed_state(verbs):
    result = verbs.doit("forget", MANIFEST)
    assert result.rc == 0, result
    assert f"forgetting {MANIFEST}" in result.out, result
    # Up-to-dateness is the cache and the published records, not doit's database.
    result = verbs.build()
    assert result.rc == 0 and not result.ran, result


def test_doit_clean_with_deps_removes_the_manifest_outputs(verbs):
    keys = {t: verbs.record(t)["keys"] for t in TARGETS}
    result = verbs.doit("clean", "-c", MANIFEST)
    assert result.rc == 0, result
    for path in artifact_files(verbs):
        assert not path.exists(), path
    for t, step_keys in keys.items():
        for kind, key in step_keys.items():
            assert not verbs.entry(kind, key).exists(), (t, kind)
    result = verbs.doit("list", MANIFEST)  # still loads after cleaning
    assert result.rc == 0, result


def test_doit_clean_removes_the_manifest_artifacts(verbs):
    keys = {t: verbs.record(t)["keys"] for t in TARGETS}
    result = verbs.doit("clean", MANIFEST)
    assert result.rc == 0, result
    for path in artifact_files(verbs):
        assert not path.exists(), path
    # The shared cache stays: republishing runs only the package steps.
    for t, step_keys in keys.items():
        for kind, key in step_keys.items():
            assert verbs.entry(kind, key).exists(), (t, kind)
    result = verbs.build()
    assert result.rc == 0, result
    assert sorted(kind for kind, _ in result.ran) == ["package"] * len(TARGETS), result
