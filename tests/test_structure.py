"""The build's structure, as the cache keys depend on it.

- Import direction: families import no backend and no stage; the backends and the MLX
  runtime import nothing of mlxbuild (and the runtime nothing of the backends); the
  dispatch tables import nothing of ours at module level; no module imports in a circle.
- Key precision: a copy of our packages is edited one file at a time and
  `mlxbuild plan --json` is run on it (a subprocess, as a user runs it); exactly the
  steps whose code changed get new keys.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlxbuild import fingerprint as fp

REPO = Path(__file__).resolve().parent.parent
PACKAGES = fp.OUR_PACKAGES


def _files(prefix: str) -> list[Path]:
    top, _, rest = prefix.partition(".")
    root = fp._package_root(top).joinpath(*rest.split(".")) if rest else fp._package_root(top)
    return sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]


def _imported(files) -> dict[str, set[str]]:
    return {fp.module_name(f): {fp.module_name(t) for t in fp.imports_of(f)} for f in files}


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_families_import_no_backend_and_no_stage():
    bad = {m: sorted(t for t in targets if _under(t, "backends", "mlx_runtime", "mlxbuild.stages"))
           for m, targets in _imported(_files("mlxbuild.families")).items()}
    assert not {m: t for m, t in bad.items() if t}, bad


def test_backends_and_runtime_stand_alone():
    for package, forbidden in (("backends", ("mlxbuild",)), ("mlx_runtime", ("mlxbuild", "backends"))):
        bad = {m: sorted(t for t in targets if _under(t, *forbidden))
               for m, targets in _imported(_files(package)).items()}
        assert not {m: t for m, t in bad.items() if t}, (package, bad)
        # Not even by a dynamic import: the package's text never names mlxbuild's modules.
        for f in _files(package):
            tree = ast.parse(f.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
                    arg = node.args[0]
                    if isinstance(arg, ast.Constant):
                        assert not _under(arg.value, *forbidden), (f, arg.value)


def test_dispatch_tables_import_nothing_of_ours_at_module_level():
    for table in fp.DISPATCH_TABLES:
        f = fp._module_file(table)
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(_under(n, *PACKAGES) for n in names), (table, names)


def test_no_import_circles():
    files = [f for p in PACKAGES for f in _files(p)]
    graph = {f: fp.imports_of(f) for f in files}
    state: dict[Path, int] = {}
    circles = []

    def visit(f: Path, path: list[Path]) -> None:
        state[f] = 1
        path.append(f)
        for g in graph.get(f, ()):
            if state.get(g) == 1:
                circles.append(" -> ".join(fp.module_name(x) for x in path[path.index(g):] + [g]))
            elif g in graph and not state.get(g):
                visit(g, path)
        path.pop()
        state[f] = 2

    for f in files:
        if not state.get(f):
            visit(f, [])
    assert not circles, circles


def test_planning_imports_neither_torch_nor_a_flavour_nor_a_runtime():
    code = ("import sys; from mlxbuild.build import plan_manifests; from mlxbuild.settings import roots; "
            f"plan_manifests([{str(REPO / 'manifests' / 'qwen.yaml')!r}], roots()); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'executorch') "
            "or m.startswith('backends.flavours.') or m.startswith('mlx_runtime')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


# --------------------------------------------------------------------------- key precision


@pytest.fixture
def source_copy(tmp_path):
    root = tmp_path / "src"
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _plan(source: Path, tmp_path: Path, manifest: str) -> dict[str, str]:
    env = {"PYTHONPATH": str(source), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "MLXBUILD_CACHE": str(tmp_path / "cache"), "MLXBUILD_ARTIFACTS": str(tmp_path / "artifacts")}
    out = subprocess.run([sys.executable, "-m", "mlxbuild.cli", "plan", "--json", str(REPO / "manifests" / manifest)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    # Shared steps are named by a prefix of their key (weights:<k>, export:4w.mlx.<k>): the
    # name without it says which step it is.
    return {re.sub(r"[.:][0-9a-f]{10}$", "", row["task"]): row["key"] for row in json.loads(out.stdout)}


def _changed_by(source: Path, tmp_path: Path, edited: str, manifest: str = "qwen.yaml") -> set[str]:
    before = _plan(source, tmp_path, manifest)
    with open(source / edited, "a") as f:
        f.write("\n# an edit that changes no behaviour\n")
    after = _plan(source, tmp_path, manifest)
    assert set(before) == set(after)
    return {name for name in before if before[name] != after[name]}


def test_keys_cover_exactly_the_code_of_each_step(source_copy, tmp_path):
    steps = set(_plan(source_copy, tmp_path, "qwen.yaml"))
    targets = {s.split("/", 1)[1] for s in steps if s.startswith("verify:")}
    assert {"mlx-4w", "xnnpack-8da4w", "portable-fp32"} <= targets

    def of(backend: str, *kinds: str) -> set[str]:
        return {s for s in steps for t in targets if t.startswith(backend + "-") and
                any(s == f"{k}:qwen3-tiny/{t}" for k in kinds)}

    # A node handler of the MLX runtime runs only when an MLX artifact is verified.
    # (and the quality step, which runs the artifact through the same runtime)
    assert _changed_by(source_copy, tmp_path, "mlx_runtime/nodes/conv.py") == of("mlx", "verify", "quality", "package")
    # The XNNPACK backend lowers and verifies XNNPACK targets, nothing else.
    assert _changed_by(source_copy, tmp_path, "backends/xnnpack.py") == of("xnnpack", "lower", "verify", "quality",
                                                                            "package")
    # Whisper is not in a Qwen manifest's steps at all.
    assert _changed_by(source_copy, tmp_path, "mlxbuild/families/whisper.py") == set()
    # The weights loader decides every byte downstream, but not the tokenizer's.
    tokenizer = {s for s in steps if s.startswith("tokenizer")}
    assert len(tokenizer) == 1
    assert _changed_by(source_copy, tmp_path, "mlxbuild/stages/weights.py") == steps - tokenizer
    # The tokenizer code is run by the tokenizer step, by the runner check (reference and
    # verify stages) and to encode the evaluation text (baseline, and the quality steps that
    # read it): weights, quantization, exports and lowerings stay as they are.
    assert _changed_by(source_copy, tmp_path, "mlxbuild/tokenizer.py") == tokenizer | {
        s for s in steps if s.startswith(("reference:", "verify:", "baseline:", "quality:", "package:"))}


def test_a_family_edit_reaches_its_manifests_from_export_on(source_copy, tmp_path):
    changed = _changed_by(source_copy, tmp_path, "mlxbuild/families/whisper.py", "whisper.yaml")
    kinds = {name.split(":", 1)[0] for name in changed}
    assert kinds == {"export", "reference", "lower", "verify", "package"}, changed


def test_a_release_lock_names_the_step_whose_code_changed():
    from mlxbuild.lock import diff_fields

    old = {"inputs": {"code": {"lower": "a" * 16, "verify": "b" * 16}, "keys": {"lower": "1" * 64}}}
    new = {"inputs": {"code": {"lower": "c" * 16, "verify": "b" * 16}, "keys": {"lower": "2" * 64}}}
    said = diff_fields(old, new)
    assert said.startswith("code.lower (mlxbuild's code of the lower step)"), said
    assert "verify" not in said and "keys" not in said
