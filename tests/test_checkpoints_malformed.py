"""Malformed local checkpoints and tokenizers, generated here: each is one line at the
manifest's field naming the bad file, exit 3 from `doit build`, and nothing written."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from buildlog import doit_command

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
              tie_word_embeddings=True)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = tmp_path_factory.mktemp("ckpt") / "good"
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**CONFIG)).save_pretrained(folder, max_shard_size="40KB")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    assert len(list(folder.glob("*.safetensors"))) > 1  # sharded, with an index
    return folder


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_header(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _first_shard(f: Path) -> Path:
    return sorted(f.glob("*.safetensors"))[0]


def _shard_with(f: Path, fragment: str) -> Path:
    return next(p for p in sorted(f.glob("*.safetensors")) if any(fragment in k for k in _header(p)[0]))


def _edit_config(f: Path, **changes) -> Path:
    cfg = json.loads((f / "config.json").read_text())
    cfg.update(changes)
    (f / "config.json").write_text(json.dumps(cfg))
    return f / "config.json"


def _retype(f: Path, dtype=None, shape=None) -> Path:
    p = _first_shard(f)
    header, body = _header(p)
    name = next(k for k in header if k != "__metadata__")
    if dtype:
        header[name]["dtype"] = dtype
    if shape:
        header[name]["shape"] = shape
    _write_header(p, header, body)
    return p


def _index(f: Path) -> Path:
    return next(f.glob("*.safetensors.index.json"))


def _set(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# name: (mutate(folder) -> the file the error must name, a fragment of the message)
CASES = {
    "config-not-json": (lambda f: _set(f / "config.json", b'{"model_type": "qwen3", '), "not valid JSON"),
    "config-array": (lambda f: _set(f / "config.json", b"[1, 2]"), "expected a JSON object"),
    "config-no-model-type": (lambda f: _set(f / "config.json", b'{"hidden_size": 32}'), "no model_type"),
    "config-binary": (lambda f: _set(f / "config.json", bytes(range(128, 256))), "not UTF-8"),
    "config-missing": (lambda f: ((f / "config.json").unlink(), f)[1], "no config.json"),
    "generation-config-not-json": (lambda f: _set(f / "generation_config.json", b"{"), "not valid JSON"),
    "tokenizer-config-not-json": (lambda f: _set(f / "tokenizer_config.json", b"nope"), "not valid JSON"),
    "shard-truncated-half": (lambda f: _set(_first_shard(f), _first_shard(f).read_bytes()[: _first_shard(f).stat().st_size // 2]),
                             "truncated"),
    "shard-truncated-one-byte": (lambda f: _set(_first_shard(f), _first_shard(f).read_bytes()[:-1]), "truncated"),
    "shard-trailing-bytes": (lambda f: _set(_first_shard(f), _first_shard(f).read_bytes() + b"\0" * 7),
                             "trailing bytes"),
    "shard-huge-header-length": (lambda f: _set(_first_shard(f), struct.pack("<Q", 1 << 40) + _first_shard(f).read_bytes()[8:]),
                                 "does not fit the file"),
    "shard-too-short": (lambda f: _set(_first_shard(f), b"\1\2\3"), "too short"),
    "shard-empty": (lambda f: _set(_first_shard(f), b""), "too short"),
    "shard-header-garbage": (lambda f: _set(_first_shard(f), _first_shard(f).read_bytes()[:8] + b"\xff" * 16
                                           + _first_shard(f).read_bytes()[24:]), "header is not valid JSON"),
    "shard-header-list": (lambda f: _set(_first_shard(f), struct.pack("<Q", 2) + b"[]"), "not a table of tensors"),
    "shard-unknown-dtype": (lambda f: _retype(f, dtype="F7"), "unknown dtype"),
    "shard-shape-vs-bytes": (lambda f: _retype(f, shape=[3, 5]), "does not fill bytes"),
    "shard-negative-dim": (lambda f: _retype(f, shape=[-1]), "malformed shape"),
    "no-safetensors": (lambda f: ([p.unlink() for p in f.glob("*.safetensors")], _index(f).unlink(), f)[-1],
                       "no *.safetensors"),
    "config-vocab-mismatch": (lambda f: (_edit_config(f, vocab_size=65), _shard_with(f, "embed_tokens"))[1],
                              "says vocab_size 65"),
    "config-hidden-mismatch": (lambda f: (_edit_config(f, hidden_size=48), _shard_with(f, "embed_tokens"))[1],
                               "hidden size 48"),
    "config-layers-mismatch": (lambda f: _edit_config(f, num_hidden_layers=3), "the weights have 2 layers"),
    "index-missing-shard": (lambda f: (lambda i: _set(i, json.dumps({"weight_map": {"x": "model-9-of-9.safetensors"}}).encode()))(_index(f)),
                            "names 'model-9-of-9.safetensors'"),
    "index-not-json": (lambda f: _set(_index(f), b"{{"), "not valid JSON"),
    "index-no-weight-map": (lambda f: _set(_index(f), b'{"metadata": {}}'), "no weight_map"),
    "tokenizer-not-json": (lambda f: _set(f / "tokenizer.json", b"{broken"), "does not load as a tokenizer"),
    "tokenizer-not-a-tokenizer": (lambda f: _set(f / "tokenizer.json", b'{"hello": 1}'), "does not load as a tokenizer"),
    "path-is-a-file": (lambda f: (shutil.rmtree(f), _set(f, b"x"), f)[-1], "is not a directory"),
    "path-missing": (lambda f: (shutil.rmtree(f), f)[-1], "is not a directory"),
}


def _manifest(path: Path, source: str, tokenizer: str | None = None) -> Path:
    model = {"source": {"path": source}, "dtype": "fp32"}
    if tokenizer:
        model["tokenizer"] = tokenizer
    path.write_text(json.dumps({"name": "bad", "version": "0.1.0", "model": model,
                                "export": {"max_context_length": 32},
                                "targets": [{"name": "p", "backend": "portable", "quantization": "none"}]},
                               indent=1))
    return path


def _plan(manifest: Path, cache: Path):
    from mlxbuild.build import plan_manifests
    from mlxbuild.settings import Roots

    return plan_manifests([str(manifest)], Roots(cache, cache / "artifacts"))


def test_the_good_checkpoint_plans(good, tmp_path):
    plan = _plan(_manifest(tmp_path / "m.yaml", str(good), str(good / "tokenizer.json")), tmp_path / "cache")
    assert any(s.kind == "weights" for s in plan.steps.values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_checkpoint_is_one_line_at_the_manifest(good, tmp_path, case):
    from mlxbuild.errors import ManifestError

    folder = tmp_path / "ckpt"
    shutil.copytree(good, folder)
    mutate, fragment = CASES[case]
    bad_file = mutate(folder)
    manifest = _manifest(tmp_path / "m.yaml", "ckpt")
    with pytest.raises(ManifestError) as info:
        _plan(manifest, tmp_path / "cache")
    message = str(info.value)
    line = next(i for i, ln in enumerate(manifest.read_text().splitlines(), 1) if '"path"' in ln)
    assert "\n" not in message and message.startswith(f"{manifest}:{line}:"), message
    assert "model.source.path: " in message and str(bad_file) in message and fragment in message, message


TOKENIZER_CASES = {
    "missing": (lambda d: d / "nope.json", "not found"),
    "garbage": (lambda d: _set(d / "tok.json", b"\x00\x01garbage"), "does not load as a tokenizer"),
    "empty": (lambda d: _set(d / "tok.json", b""), "does not load as a tokenizer"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_CASES))
def test_a_bad_manifest_tokenizer_is_one_line_at_its_field(good, tmp_path, case):
    from mlxbuild.errors import ManifestError

    make, fragment = TOKENIZER_CASES[case]
    tok = make(tmp_path)
    manifest = _manifest(tmp_path / "m.yaml", str(good), tok.name)
    with pytest.raises(ManifestError, match=r"m\.yaml:\d+:\d+: model\.tokenizer: ") as info:
        _plan(manifest, tmp_path / "cache")
    assert str(tok) in str(info.value) and fragment in str(info.value), info.value


def test_doit_build_exits_3_and_writes_nothing(good, tmp_path, subprocess_env):
    folder = tmp_path / "ckpt"
    shutil.copytree(good, folder)
    shard = _first_shard(folder)
    shard.write_bytes(shard.read_bytes()[:-100])
    _manifest(tmp_path / "m.yaml", "ckpt")
    env = subprocess_env(MLXBUILD_CACHE=tmp_path / "cache", MLXBUILD_ARTIFACTS=tmp_path / "artifacts")
    p = subprocess.run([*doit_command(), "build", "m.yaml"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 3, p
    [line] = p.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'm.yaml'}:6:") and "model.source.path" in line, line
    assert str(shard) in line and "truncated" in line, line
    assert p.stdout.strip() == ""
    assert not (tmp_path / "artifacts").exists()
    leftovers = [q for q in (tmp_path / "cache").rglob("*") if q.is_file()] if (tmp_path / "cache").exists() else []
    assert all(q.name == "file-hashes.json" for q in leftovers), leftovers  # no step ran, no entry
