"""`doit build --shard I/N`: N deterministic shares of the targets for a CI matrix, every
target in exactly one, targets sharing a quantized model in the same one."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from buildlog import TINY_SOURCE, doit_command
from mlxbuild.build import plan_manifests
from mlxbuild.selection import TargetFilter, parse_shard
from mlxbuild.settings import Roots
from mlxbuild.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
MATRIX = f"""\
name: matrix
version: 0.1.0
model:
{TINY_SOURCE}  dtype: fp32
export: {{max_context_length: 32}}
quantization:
  4w: {{linear: {{bits: 4, group_size: 32}}}}
  8w: {{linear: {{bits: 8, group_size: 32}}}}
  8da4w: {{linear: {{bits: 4, group_size: 32, activations: int8_dynamic}}}}
targets:
  - {{name: mlx-4w, backend: mlx, quantization: 4w}}
  - {{name: mlx-4w-bf16, backend: mlx, quantization: 4w, dtype: bf16}}
  - {{name: coreml-4w, backend: coreml, quantization: 4w}}
  - {{name: mlx-8w, backend: mlx, quantization: 8w}}
  - {{name: vulkan-8w, backend: vulkan, quantization: 8w}}
  - {{name: xnnpack-8da4w, backend: xnnpack, quantization: 8da4w}}
  - {{name: mlx-fp32, backend: mlx}}
  - {{name: portable-fp32, backend: portable}}
"""


def _paths(tmp_path: Path) -> list[str]:
    (tmp_path / "matrix.yaml").write_text(MATRIX)
    return [str(tmp_path / "matrix.yaml"), str(REPO / "manifests" / "qwen.yaml"),
            str(REPO / "manifests" / "qwen-mixed.yaml")]


def _planned(paths, tmp_path, shard=None) -> tuple[set[str], set[str]]:
    """(targets, quantize step keys) of the plan of one share."""
    plan = plan_manifests(paths, Roots(cache=tmp_path / "c", artifacts=tmp_path / "a"), TargetFilter(shard=shard))
    return ({s.label for s in plan.steps.values() if s.kind == "package"},
            {s.key for s in plan.steps.values() if s.kind == "quantize"})


def test_every_target_is_in_exactly_one_share(tmp_path):
    paths = _paths(tmp_path)
    everything, _ = _planned(paths, tmp_path)
    assert len(everything) == 13
    for n in (1, 2, 3, 5, 13, 20):
        parts = [_planned(paths, tmp_path, (i, n))[0] for i in range(1, n + 1)]
        assert set().union(*parts) == everything, n
        assert sum(len(p) for p in parts) == len(everything), n  # no target twice
        sizes = sorted(len(p) for p in parts)
        assert sizes[-1] - sizes[0] <= 3, (n, sizes)  # balanced up to one group
    # the same share every time (a matrix job must get the same targets on a rerun)
    assert _planned(paths, tmp_path, (2, 3)) == _planned(paths, tmp_path, (2, 3))


def test_targets_sharing_a_quantized_model_stay_together(tmp_path):
    paths = _paths(tmp_path)
    shares = [_planned(paths, tmp_path, (i, 4)) for i in range(1, 5)]
    for i, (targets, quantize) in enumerate(shares):
        for j, (_, other) in enumerate(shares):
            if i != j:
                assert not quantize & other, "a quantize step planned in two shares"
    where = {t: i for i, (targets, _) in enumerate(shares) for t in targets}
    for a, b in (("mlx-4w", "coreml-4w"), ("mlx-8w", "vulkan-8w"), ("mlx-fp32", "portable-fp32")):
        assert where[f"matrix/{a}"] == where[f"matrix/{b}"], (a, b, where)
    assert where["matrix/mlx-4w"] != where["matrix/mlx-8w"]  # the two largest groups: apart


def test_bad_shards_are_usage_errors(tmp_path, subprocess_env):
    for bad in ("0/3", "4/3", "2", "a/b", "1/0"):
        with pytest.raises(UsageError, match="expected I/N with 1 <= I <= N"):
            parse_shard(bad)
    (tmp_path / "m.yaml").write_text(MATRIX)
    env = subprocess_env(MLXBUILD_CACHE=tmp_path / "cache", MLXBUILD_ARTIFACTS=tmp_path / "artifacts")
    p = subprocess.run([*doit_command(), "build", "--shard", "3/2", "m.yaml"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--shard '3/2': expected I/N" in p.stderr, p.stderr
    # more jobs than targets: the extra job builds nothing, successfully
    p = subprocess.run([*doit_command(), "build", "--shard", "9/9", "m.yaml"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not (tmp_path / "artifacts" / "matrix").exists()


def test_the_sharded_workflow_example_runs_only_commands_the_cli_accepts():
    """docs/examples/github-actions-shards.yml (shown in docs/ci.md): N shard jobs with
    --shard I/N over the matrix, then one release job."""
    import yaml
    from test_ci import parse_doit, shell_commands

    from mlxbuild import cli

    path = REPO / "docs" / "examples" / "github-actions-shards.yml"
    workflow = yaml.safe_load(path.read_text())
    shards = workflow["jobs"]["shard"]["strategy"]["matrix"]["shard"]
    seen = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            for argv in (c for c in shell_commands(step.get("run", "")) if c[0] in ("doit", "mlxbuild")):
                args = argv[1:] if argv[0] == "doit" else cli.main(argv[1:], parse_only=True)
                if isinstance(args, list):
                    params, _ = parse_doit(args)
                    if args[0] == "build":
                        assert params["shard"] == f"EXPR/{len(shards)}", params["shard"]
                    seen.append(args[0])
                else:
                    seen.append(args.cmd)
    assert {"build", "release", "report", "check-bundle"} <= set(seen), seen
    assert shards == list(range(1, len(shards) + 1))
    assert workflow["jobs"]["release"]["needs"] == "shard"
    assert path.read_text().strip() in (REPO / "docs" / "ci.md").read_text()
