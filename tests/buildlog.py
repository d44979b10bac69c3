"""What the end-to-end tests share about running `doit build` as a user does."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mlxbuild.steps import StepKind

KINDS = tuple(k.value for k in StepKind)
# The reporter's step lines: '.  ' started, 'ok ' finished (with its time), '-- ' up to date.
STEP_LINE = re.compile(r"^(\.  |ok |-- )(" + "|".join(KINDS) + r") (.+?)(?: \(\d+(?:\.\d+)? s\))?$")


# A one-layer Qwen3 with synthetic weights: `model.source` of the small end-to-end manifests.
TINY_SOURCE = """\
  source:
    synthetic:
      architecture: qwen3
      seed: 0
      config: {vocab_size: 128, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
               num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16, bos_token_id: 1, eos_token_id: 2}
"""


def doit_command() -> list[str]:
    script = Path(sys.executable).with_name("doit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "doit"]


def write_manifest(root: Path, manifest: Path, targets) -> Path:
    """A copy of a shipped ``manifest`` under ``root/manifests`` keeping only ``targets``
    (and the schemes they use): the family tests build a few targets of a manifest."""
    import yaml

    data = yaml.safe_load(Path(manifest).read_text())
    data["targets"] = [t for t in data["targets"] if t["name"] in targets]
    used = {t["quantization"] for t in data["targets"]}
    data["quantization"] = {k: v for k, v in data["quantization"].items() if k in used}
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    path = root / "manifests" / Path(manifest).name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def build(root: Path, env, manifest: Path):
    """`doit build manifest` in ``root`` with its own cache and artifacts, as a user runs it."""
    import subprocess

    env = env(MLXBUILD_CACHE=root / "cache", MLXBUILD_ARTIFACTS=root / "artifacts")
    return subprocess.run(doit_command() + ["build", str(manifest)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1200)


def artifact(root: Path, name: str, version: str, target: str) -> tuple[Path, dict]:
    """A built target's ``.pte`` and its record."""
    import json

    out = root / "artifacts" / name / version
    return out / f"{name}-{target}.pte", json.loads((out / f"{name}-{target}.json").read_text())


def eager_model(root: Path, record: dict):
    """transformers' model from a build's weights, quantized like the record's target."""
    from mlxbuild.cache import Cache
    from mlxbuild.families.hf import load_model
    from mlxbuild.stages import quantize

    cache = Cache(root / "cache")
    model = load_model(cache.path("weights", record["keys"]["weights"]), record["dtype"])
    quantize.load_into(model, cache.path("quantize", record["keys"]["quantize"]))
    return model


def run_json(capsys, *args) -> tuple[int, dict | None, str]:
    """`mlxbuild run ... --json` in-process: (exit code, the result, stderr)."""
    import json

    from mlxbuild import cli

    rc = cli.main(["run", *map(str, args), "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err


def validate_with_target(tmp_path: Path, manifest: Path, target: dict) -> tuple[int, str, Path]:
    """``manifest`` with ``target`` as its only target, validated by the CLI: (exit code, the
    last line of its stderr, the file it read)."""
    import subprocess

    import yaml

    data = yaml.safe_load(manifest.read_text())
    data["targets"] = [target]
    path = tmp_path / manifest.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    p = subprocess.run([sys.executable, "-m", "mlxbuild.cli", "validate", str(path)], capture_output=True, text=True)
    return p.returncode, p.stderr.strip().splitlines()[-1], path
