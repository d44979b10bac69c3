"""One model definition for every dtype: a target may override ``model.dtype``; the
weights are written once, each (scheme, dtype) is quantized, exported and referenced once
and shared by the targets that need it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from buildlog import TINY_SOURCE, doit_command
from mlxbuild.errors import ManifestError
from mlxbuild.manifest import parse_manifest

REPO = Path(__file__).resolve().parent.parent

MANIFEST = f"""\
name: mixed
version: 0.1.0
model:
{TINY_SOURCE}  dtype: bf16
export: {{max_context_length: 32}}
quantization:
  4w: {{linear: {{bits: 4, group_size: 32}}}}
targets:
  - {{name: mlx-4w, backend: mlx, quantization: 4w}}
  - {{name: mlx-4w-fp32, backend: mlx, quantization: 4w, dtype: fp32}}
  - {{name: portable-fp32, backend: portable, dtype: fp32}}
  - {{name: coreml-fp32, backend: coreml, dtype: fp32}}
"""


def _plan(tmp_path: Path, text: str) -> dict:
    from mlxbuild.fingerprint import FileHasher
    from mlxbuild.plan import Plan, plan_manifest

    path = tmp_path / "m.yaml"
    path.write_text(text)
    manifest = parse_manifest(text, str(path))
    plan = Plan()
    plan_manifest(manifest, plan, FileHasher(tmp_path / "hashes.json"), tmp_path / "artifacts")
    return plan.steps


def _deps(steps: dict, name: str, kind: str) -> str:
    """The one step of `kind` that `name` depends on, transitively."""
    seen, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n.startswith(f"{kind}:"):
            return n
        todo += [d for d in steps[n].deps if d not in seen]
        seen.update(steps[n].deps)
    raise AssertionError(f"{name} has no {kind} step")


def test_each_scheme_and_dtype_is_quantized_and_exported_once(tmp_path):
    steps = _plan(tmp_path, MANIFEST)
    kinds = lambda k: sorted(n for n in steps if n.startswith(f"{k}:"))  # noqa: E731
    assert len(kinds("weights")) == 1
    # (4w, bf16), (4w, fp32), (none, fp32): three quantizations, three references
    assert len(kinds("quantize")) == 3 and len(kinds("reference")) == 3
    q = {t: _deps(steps, f"verify:mixed/{t}", "quantize") for t in ("mlx-4w", "mlx-4w-fp32", "portable-fp32", "coreml-fp32")}
    assert q["portable-fp32"] == q["coreml-fp32"]  # shared by the two fp32 unquantized targets
    assert len({q["mlx-4w"], q["mlx-4w-fp32"], q["portable-fp32"]}) == 3
    assert steps[q["mlx-4w-fp32"]].params.dtype == "fp32" and steps[q["mlx-4w"]].params.dtype == "bf16"
    # Core ML and portable share the plain flavour's export of (none, fp32)
    assert _deps(steps, "lower:mixed/portable-fp32", "export") == _deps(steps, "lower:mixed/coreml-fp32", "export")
    # the records say each target's own dtype
    assert steps["package:mixed/mlx-4w"].params.record["dtype"] == "bf16"
    assert steps["package:mixed/portable-fp32"].params.record["dtype"] == "fp32"


def test_a_target_dtype_equal_to_the_models_changes_no_key(tmp_path):
    plain = _plan(tmp_path, MANIFEST.replace("  - {name: mlx-4w, backend: mlx, quantization: 4w}\n",
                                             "  - {name: mlx-4w, backend: mlx, quantization: 4w, dtype: bf16}\n"))
    again = _plan(tmp_path, MANIFEST)
    assert {n: s.key for n, s in plain.items()} == {n: s.key for n, s in again.items()}


def test_the_capability_table_applies_per_target(tmp_path):
    bad = MANIFEST.replace("{name: portable-fp32, backend: portable, dtype: fp32}",
                           "{name: xnnpack-bf16, backend: xnnpack, dtype: bf16}")
    with pytest.raises(ManifestError) as e:
        parse_manifest(bad, "m.yaml")
    assert str(e.value).startswith("m.yaml:17:44: targets[2].dtype: dtype 'bf16' is not supported by xnnpack")
    # the model's bf16 is fine for XNNPACK once the target says fp32
    parse_manifest(bad.replace("dtype: bf16}", "dtype: fp32}"), "m.yaml")


def test_mixed_dtypes_build_and_verify(tmp_path, subprocess_env):
    (tmp_path / "m.yaml").write_text(MANIFEST.replace("  - {name: coreml-fp32, backend: coreml, dtype: fp32}\n", ""))
    env = subprocess_env(MLXBUILD_CACHE=tmp_path / "cache", MLXBUILD_ARTIFACTS=tmp_path / "artifacts")
    p = subprocess.run([*doit_command(), "build", "-n", "2", "m.yaml"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "artifacts" / "mixed" / "0.1.0"
    records = {t: json.loads((out / f"mixed-{t}.json").read_text()) for t in ("mlx-4w", "mlx-4w-fp32", "portable-fp32")}
    assert {t: r["dtype"] for t, r in records.items()} == {"mlx-4w": "bf16", "mlx-4w-fp32": "fp32", "portable-fp32": "fp32"}
    for t, r in records.items():
        assert r["verification"]["passed"] and r["verification"]["executed"], (t, r["verification"])
    # fp32 programs of bf16 weights compute in fp32: far below bf16's error
    assert records["mlx-4w-fp32"]["verification"]["max_rel_error"] < 1e-5 < records["mlx-4w"]["verification"]["max_rel_error"]
    # the bf16 target is also measured against its reference computed in float32
    f32 = records["mlx-4w"]["verification"]["precise_reference"]
    assert 0 < f32["reference_rel_error"] < 0.05 and 0 < f32["artifact_rel_error"] < 0.1, f32
    assert "precise_reference" not in records["mlx-4w-fp32"]["verification"]
    assert p.stdout.count("ok weights ") == 1
