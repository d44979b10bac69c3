"""Model sources on checkpoints the tests write themselves: the real loading code, end to end.

- ``path:``  a tiny Qwen3 saved by transformers, as one ``model.safetensors`` and
  sharded (several shards + ``model.safetensors.index.json``); both build a
  portable target whose logits match the checkpoint's own HF forward.
- ``hf:``    the same files laid out as a Hugging Face hub cache (blobs, snapshots
  of symlinks, refs/main), resolved offline with ``HF_HUB_OFFLINE=1``.
- ``module:`` a factory in a module written to tmp, with its own static KV cache.

Every build runs in one ``doit build --continue`` (one process start, one set of
imports); each test checks its own artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

DOIT = Path(sys.executable).parent / "doit"

TINY_QWEN3 = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)
EXPORT = {"max_context_length": 32}
PROMPT = 8  # the verification-style prefill these tests feed
PORTABLE = [{"name": "portable-fp32", "backend": "portable"}]
HUB_REPO = "tiny-org/tiny-qwen3"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHARD_SIZE = "100KB"  # the tiny model is ~360 KB: four shards

MODULE_NAME = "mlxbuild_test_tinylm"
MODULE_KWARGS = {"vocab_size": 96, "dim": 32, "max_context": EXPORT["max_context_length"]}
MODULE_SOURCE = '''
import torch
from torch import nn


class TinyLM(nn.Module):
    """One attention block with its own static KV cache; lm head tied to the embedding."""

    def __init__(self, vocab_size, dim, max_context):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("k_cache", torch.zeros(1, max_context, dim), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, max_context, dim), persistent=False)
        self.scale = dim ** -0.5

    def forward(self, input_ids, cache_position):
        x = self.embed(input_ids)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        self.k_cache.index_copy_(1, cache_position, k)
        self.v_cache.index_copy_(1, cache_position, v)
        scores = (q @ self.k_cache.transpose(1, 2)) * self.scale
        visible = torch.arange(self.k_cache.shape[1])[None, :] <= cache_position[:, None]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        x = x + self.proj(scores.softmax(-1) @ self.v_cache)
        return self.head(self.norm(x))


def make(vocab_size=64, dim=32, max_context=32):
    return TinyLM(vocab_size, dim, max_context)
'''


# --------------------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tiny_qwen3(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**TINY_QWEN3)).eval()


def write_manifest(path: Path, name: str, source: dict, targets=PORTABLE) -> Path:
    manifest = {"name": name, "version": "0.1.0", "model": {"source": source, "dtype": "fp32"},
                "export": EXPORT, "targets": targets}
    path.write_text(json.dumps(manifest, indent=1))  # JSON is YAML
    return path


def hub_env(hub: Path) -> dict:
    return {"HF_HOME": str(hub.parent / "hf-home"), "HF_HUB_CACHE": str(hub),
            "HF_HUB_OFFLINE": "1"}


def make_hub_cache(hub: Path, repo: str, commit: str, files: Path) -> Path:
    """``files`` laid out the way huggingface_hub caches a download; return the snapshot."""
    storage = hub / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(files.iterdir()):
        blob = storage / "blobs" / sha256(f)
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def plan_in_subprocess(manifest: Path, cache: Path, env: dict) -> dict:
    """Plan ``manifest`` in a fresh interpreter with ``env`` (huggingface_hub reads HF_* at import)."""
    code = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from mlxbuild.build import plan_manifests
        from mlxbuild.errors import MlxbuildError
        from mlxbuild.settings import Roots
        try:
            plan = plan_manifests([sys.argv[1]], Roots(Path(sys.argv[2]), Path(sys.argv[2]) / "a"))
        except MlxbuildError as e:
            print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        else:
            weights = next(s for s in plan.steps.values() if s.kind == "weights")
            record = next(s for s in plan.steps.values() if s.kind == "package").params.record
            print(json.dumps({"weights_key": weights.key, "load": weights.params.load,
                              "checkpoint": record["checkpoint_sha256"], "source": record["source"]}))
    """)
    out = subprocess.run([sys.executable, "-c", code, str(manifest), str(cache)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan_weights(manifest: Path, cache: Path):
    """(weights key, record) of a one-target manifest, planned in this process."""
    from mlxbuild.build import plan_manifests
    from mlxbuild.settings import Roots

    plan = plan_manifests([str(manifest)], Roots(cache, cache / "artifacts"))
    weights = next(s for s in plan.steps.values() if s.kind == "weights")
    package = next(s for s in plan.steps.values() if s.kind == "package")
    return weights.key, package.params.record


def run_pte(pte: Path, tokens: torch.Tensor, prompt: int) -> np.ndarray:
    """Prefill ``prompt`` tokens, decode the rest one at a time; every logit row, stacked."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(pte)).load_method("forward")
    rows = [method.execute([tokens[:, :prompt], torch.arange(prompt)])[0][0]]
    for pos in range(prompt, tokens.shape[1]):
        rows.append(method.execute([tokens[:, pos:pos + 1], torch.tensor([pos])])[0][0])
    return torch.cat(rows).float().numpy()


def assert_logits_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * scale)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def sample_tokens(vocab: int, n: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Checkpoints, hub cache, test module and manifests, all under one tmp dir."""
    root = tmp_path_factory.mktemp("sources")
    model = tiny_qwen3(seed=0)
    model.save_pretrained(root / "ckpt")
    model.save_pretrained(root / "ckpt-sharded", max_shard_size=SHARD_SIZE)
    # Other weights than ckpt/, so the hf build loads through the snapshot's symlinks
    # instead of sharing the path build's weights step.
    tiny_qwen3(seed=1).save_pretrained(root / "ckpt-hub")
    make_hub_cache(root / "hub", HUB_REPO, HUB_COMMIT, root / "ckpt-hub")
    (root / "modules").mkdir()
    (root / "modules" / f"{MODULE_NAME}.py").write_text(MODULE_SOURCE)
    manifests = root / "manifests"
    manifests.mkdir()
    # Relative to the manifest's directory.
    write_manifest(manifests / "single.yaml", "tiny-single", {"path": "../ckpt"})
    write_manifest(manifests / "sharded.yaml", "tiny-sharded", {"path": "../ckpt-sharded"})
    write_manifest(manifests / "hub.yaml", "tiny-hub", {"hf": HUB_REPO})
    write_manifest(manifests / "module.yaml", "tiny-module",
                   {"module": f"{MODULE_NAME}:make", "kwargs": MODULE_KWARGS})
    return root


@pytest.fixture(scope="module")
def built(work, subprocess_env) -> dict:
    """One `doit build --continue` of every manifest: its exit code, output and artifacts."""
    names = ["single", "sharded", "hub", "module"]
    env = subprocess_env(**hub_env(work / "hub"), MLXBUILD_CACHE=work / "cache",
                         MLXBUILD_ARTIFACTS=work / "artifacts")
    env["PYTHONPATH"] += os.pathsep + str(work / "modules")  # the module source's factory
    cmd = [str(DOIT), "build", "--continue", *(f"manifests/{n}.yaml" for n in names)]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    return {"returncode": proc.returncode, "log": proc.stdout + proc.stderr,
            "artifacts": work / "artifacts"}


def artifact(built: dict, name: str, target: str = "portable-fp32") -> tuple[dict, Path]:
    out = built["artifacts"] / name / "0.1.0"
    record = out / f"{name}-{target}.json"
    if not record.exists():
        pytest.fail(f"{name}/{target} was not built:\n{built['log'][-4000:]}")
    return json.loads(record.read_text()), out / f"{name}-{target}.pte"


# --------------------------------------------------------------------------- path


def test_sharded_checkpoint_really_is_sharded(work):
    shards = sorted((work / "ckpt-sharded").glob("model-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((work / "ckpt-sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert not (work / "ckpt-sharded" / "model.safetensors").exists()


@pytest.mark.parametrize("name,folder", [("tiny-single", "ckpt"), ("tiny-sharded", "ckpt-sharded")])
def test_path_source_builds_verifies_and_records_checkpoint(built, work, name, folder):
    record, pte = artifact(built, name)
    assert pte.stat().st_size == record["size"]
    assert record["verification"]["passed"] and record["verification"]["executed"]
    assert record["source"] == {"path": str((work / folder).resolve())}
    files = sorted((work / folder).iterdir())
    assert record["checkpoint_sha256"] == {p.name: sha256(p) for p in files}
    expected = {"config.json", "generation_config.json"} | (
        {"model.safetensors"} if folder == "ckpt" else
        {"model.safetensors.index.json"} | {p.name for p in files if p.name.startswith("model-")})
    assert set(record["checkpoint_sha256"]) == expected


@pytest.mark.parametrize("name,folder", [("tiny-single", "ckpt"), ("tiny-sharded", "ckpt-sharded"),
                                         ("tiny-hub", "ckpt-hub")])
def test_pte_logits_match_checkpoint_forward(built, work, name, folder):
    from transformers import AutoModelForCausalLM

    _, pte = artifact(built, name)
    tokens = sample_tokens(TINY_QWEN3["vocab_size"])
    got = run_pte(pte, tokens, prompt=PROMPT)
    hf = AutoModelForCausalLM.from_pretrained(work / folder, dtype=torch.float32).eval()
    with torch.no_grad():  # one causal forward over the whole sequence, no cache
        ref = hf(tokens).logits[0].float().numpy()
    assert_logits_close(got, ref)


@pytest.mark.parametrize("name,folder", [("tiny-single", "ckpt"), ("tiny-sharded", "ckpt-sharded")])
def test_a_local_checkpoint_is_referenced_not_copied(built, work, name, folder):
    """The weights entry holds the checkpoint's own files as hard links (the same inode):
    no model was loaded and saved again to make it, and the disk holds the weights once."""
    record, _ = artifact(built, name)
    entry = next(p for p in (work / "cache" / "weights").glob("*/*") if p.name == record["keys"]["weights"])
    shards = sorted(p.name for p in (work / folder).glob("*.safetensors"))
    assert shards and sorted(p.name for p in entry.glob("*.safetensors")) == shards
    for name_ in shards + ["config.json"]:
        assert (entry / name_).stat().st_ino == (work / folder / name_).stat().st_ino, name_


def test_sharded_and_single_give_identical_pte(built):
    single, single_pte = artifact(built, "tiny-single")
    sharded, sharded_pte = artifact(built, "tiny-sharded")
    # Different files, so different keys all the way down ...
    assert single["keys"]["weights"] != sharded["keys"]["weights"]
    # ... but the weights step re-saves the same tensors, and everything after it is
    # deterministic: the artifacts are the same bytes.
    assert single_pte.read_bytes() == sharded_pte.read_bytes()
    assert single["sha256"] == sharded["sha256"]


def test_changing_one_shard_changes_the_weights_key(work, tmp_path):
    manifests = work / "manifests"
    key, record = plan_weights(manifests / "sharded.yaml", tmp_path / "cache")

    # Same bytes in another folder: same key (the identity is content, not location).
    shutil.copytree(work / "ckpt-sharded", tmp_path / "copy")
    copy = write_manifest(tmp_path / "copy.yaml", "tiny-sharded", {"path": "copy"})
    assert plan_weights(copy, tmp_path / "cache")[0] == key

    # One weight perturbed and re-saved the same way: exactly one shard changes.
    model = tiny_qwen3(seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 0.5
    model.save_pretrained(tmp_path / "copy", max_shard_size=SHARD_SIZE)
    new_key, new_record = plan_weights(copy, tmp_path / "cache")
    old, new = record["checkpoint_sha256"], new_record["checkpoint_sha256"]
    changed = sorted(f for f in old if old[f] != new[f])
    assert set(old) == set(new) and len(changed) == 1 and changed[0].startswith("model-")
    assert new_key != key


def test_path_source_errors(work, tmp_path):
    from mlxbuild.errors import ManifestError

    # Named at the manifest's field (file:line:col), as validation errors are.
    missing = write_manifest(tmp_path / "missing.yaml", "tiny", {"path": "nope"})
    with pytest.raises(ManifestError, match=r"missing\.yaml:\d+:\d+: model\.source\.path: .*nope is not a directory"):
        plan_weights(missing, tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    shutil.copy(work / "ckpt" / "config.json", tmp_path / "empty")
    empty = write_manifest(tmp_path / "empty.yaml", "tiny", {"path": "empty"})
    with pytest.raises(ManifestError, match=r"empty\.yaml:\d+:\d+: model\.source\.path: .*no \*\.safetensors"):
        plan_weights(empty, tmp_path / "cache")


# --------------------------------------------------------------------------- hf


def test_hf_source_resolves_offline_snapshot(work, tmp_path, subprocess_env):
    snapshot = work / "hub" / f"models--{HUB_REPO.replace('/', '--')}" / "snapshots" / HUB_COMMIT
    expected = {p.name: sha256(p) for p in (work / "ckpt-hub").iterdir()}
    pinned = write_manifest(tmp_path / "pinned.yaml", "tiny-hub",
                            {"hf": HUB_REPO, "revision": HUB_COMMIT})
    for manifest, revision in ((work / "manifests" / "hub.yaml", None), (pinned, HUB_COMMIT)):
        planned = plan_in_subprocess(manifest, tmp_path / "cache",
                                     subprocess_env(**hub_env(work / "hub")))
        assert "error" not in planned, planned
        assert Path(planned["load"]["path"]) == snapshot  # refs/main -> the commit's snapshot
        assert planned["source"] == {"hf": HUB_REPO, "revision": revision}
        # Files are hashed through the symlinks (blob contents), named as in the snapshot.
        assert planned["checkpoint"] == expected


@pytest.mark.parametrize("source", [{"hf": "tiny-org/not-cached"},
                                    {"hf": HUB_REPO, "revision": "f" * 40}])
def test_hf_source_not_in_offline_cache_is_a_clear_error(work, tmp_path, subprocess_env, source):
    manifest = write_manifest(tmp_path / "m.yaml", "tiny", source)
    env = subprocess_env(**hub_env(work / "hub"), MLXBUILD_CACHE=tmp_path / "cache")
    planned = plan_in_subprocess(manifest, tmp_path / "cache", env)
    assert planned.get("error") == "ManifestError", planned  # at the manifest's field
    assert "m.yaml:" in planned["message"] and "model.source.hf: " in planned["message"], planned
    assert f"hf:{source['hf']}@{source.get('revision') or 'main'}" in planned["message"]
    assert "HF_HUB_OFFLINE" in planned["message"]

    # What a user sees: one line from `doit build`, before any step runs.
    proc = subprocess.run([str(DOIT), "build", str(manifest)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert "error: " in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr


def test_hf_source_builds(built, work):
    record, pte = artifact(built, "tiny-hub")
    assert record["verification"]["passed"]
    assert record["source"] == {"hf": HUB_REPO, "revision": None}
    assert record["checkpoint_sha256"] == {p.name: sha256(p) for p in (work / "ckpt-hub").iterdir()}
    single = artifact(built, "tiny-single")[0]
    assert record["keys"]["weights"] != single["keys"]["weights"]  # loaded from the snapshot


# --------------------------------------------------------------------------- module


def test_module_source_builds_and_verifies(built, work):
    record, pte = artifact(built, "tiny-module")
    verification = record["verification"]
    assert verification["passed"] and verification["executed"]
    assert record["source"] == {"module": f"{MODULE_NAME}:make", "kwargs": MODULE_KWARGS}
    code = work / "modules" / f"{MODULE_NAME}.py"
    assert record["checkpoint_sha256"] == {code.name: sha256(code)}
    assert record["constant_methods"]["get_vocab_size"] == MODULE_KWARGS["vocab_size"]


def test_module_pte_matches_the_module(built, work, monkeypatch):
    _, pte = artifact(built, "tiny-module")
    monkeypatch.delitem(sys.modules, MODULE_NAME, raising=False)
    monkeypatch.syspath_prepend(str(work / "modules"))
    module = __import__(MODULE_NAME)
    torch.manual_seed(0)  # the weights step seeds before calling the factory
    model = module.make(**MODULE_KWARGS).eval()
    tokens = sample_tokens(MODULE_KWARGS["vocab_size"])
    prompt = PROMPT
    with torch.no_grad():
        rows = [model(tokens[:, :prompt], torch.arange(prompt))[0]]
        rows += [model(tokens[:, p:p + 1], torch.tensor([p]))[0] for p in range(prompt, tokens.shape[1])]
    assert_logits_close(run_pte(pte, tokens, prompt), torch.cat(rows).numpy())


def test_module_source_identity_is_its_code(work, tmp_path, monkeypatch):
    shutil.copytree(work / "modules", tmp_path / "modules")
    monkeypatch.delitem(sys.modules, MODULE_NAME, raising=False)  # find_spec would return it
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    manifest = write_manifest(tmp_path / "m.yaml", "tiny-module",
                              {"module": f"{MODULE_NAME}:make", "kwargs": MODULE_KWARGS})
    key, _ = plan_weights(manifest, tmp_path / "cache")
    code = tmp_path / "modules" / f"{MODULE_NAME}.py"
    code.write_text(code.read_text() + "\n# edited\n")
    assert plan_weights(manifest, tmp_path / "cache")[0] != key
    other = write_manifest(tmp_path / "k.yaml", "tiny-module",
                           {"module": f"{MODULE_NAME}:make", "kwargs": {**MODULE_KWARGS, "dim": 16}})
    assert plan_weights(other, tmp_path / "cache")[0] != key


def test_module_source_missing_module(tmp_path):
    from mlxbuild.errors import BuildError

    manifest = write_manifest(tmp_path / "m.yaml", "tiny", {"module": "no_such_module_xyz:make"})
    with pytest.raises(BuildError, match="cannot find module 'no_such_module_xyz'"):
        plan_weights(manifest, tmp_path / "cache")
