"""The MLX-delegate runtime (backends/mlx_runtime) on whole models and on bad input.

One session build (a `doit build` subprocess) makes the tiny Qwen3 as MLX
artifacts: fp32 and 4-bit from an fp32 model, and 4-bit from a bf16 model; each runs
a prefill and 32 greedy decode steps through `mlx.core` and must agree with the
eager model quantized the same way (the reference stage's own machinery, asked for
32 decode steps).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("mlx.core")

import mlx_runtime  # noqa: E402
from mlxbuild.families import decoding  # noqa: E402
from mlx_runtime import fb  # noqa: E402
from mlx_runtime.registry import HANDLERS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NAME, VERSION = "qwen3-tiny", "0.1.0"
TARGETS = {"fp32": ("mlx-fp32", "none"), "4w": ("mlx-4w", "4w")}
BF16 = "bf16-4w"  # the 4w target of a bf16 copy of the manifest
PROMPT, DECODE = 8, 32


def _doit() -> list[str]:
    script = Path(sys.executable).with_name("doit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "doit"]


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The tiny Qwen3 manifest with only MLX targets (fp32 and 4w), built once."""
    root = tmp_path_factory.mktemp("mlx_runtime")
    manifest = yaml.safe_load((REPO / "manifests" / "qwen.yaml").read_text())
    manifest["targets"] = [{"name": t, "backend": "mlx", "quantization": q} for t, q in TARGETS.values()]
    (root / "tiny.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    manifest["name"], manifest["model"]["dtype"] = f"{NAME}-bf16", "bf16"
    manifest["targets"] = [{"name": "mlx-4w", "backend": "mlx", "quantization": "4w"}]
    (root / "tiny-bf16.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    env = {**__import__("os").environ, "MLXBUILD_CACHE": str(root / "cache"),
           "MLXBUILD_ARTIFACTS": str(root / "artifacts")}
    proc = subprocess.run(_doit() + ["build", "-v", "0", "tiny.yaml", "tiny-bf16.yaml"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return root


def _artifact(root: Path, key: str) -> tuple[Path, dict]:
    name, target = (f"{NAME}-bf16", "mlx-4w") if key == BF16 else (NAME, TARGETS[key][0])
    out = root / "artifacts" / name / VERSION
    return out / f"{name}-{target}.pte", json.loads((out / f"{name}-{target}.json").read_text())


@pytest.fixture(scope="session")
def references(built, tmp_path_factory):
    """Eager logits (prefill + 32 greedy steps) per scheme, from mlxbuild's reference stage."""
    from mlxbuild.cache import Cache
    from mlxbuild.stages import reference
    from mlxbuild.steps import ReferenceParams

    cache, refs = Cache(built / "cache"), {}
    for key in [*TARGETS, BF16]:
        _, record = _artifact(built, key)
        out = tmp_path_factory.mktemp(f"ref-{key}")
        reference.run(ReferenceParams(weights=record["keys"]["weights"], quantized=record["keys"]["quantize"],
                                      dtype=record["dtype"], max_context_length=128, max_prefill_chunk=PROMPT,
                                      task="text-generation", prompt=PROMPT, decode_steps=DECODE, seed=0),
                      cache, out)
        refs[key] = (np.load(out / "tokens.npy"), np.load(out / "logits.npy"))
    return refs


def _generate(prog, tokens: np.ndarray) -> np.ndarray:
    """Prefill PROMPT tokens, then feed the rest one by one; every logit row, stacked."""
    rows = [prog.forward(tokens[:, :PROMPT], np.arange(PROMPT))[0][0]]
    for pos in range(PROMPT, tokens.shape[1]):
        rows.append(prog.forward(tokens[:, pos:pos + 1], np.array([pos]))[0][0])
    return np.concatenate(rows)


# ------------------------------------------------------------------------ whole models


@pytest.mark.parametrize("key", [*TARGETS, BF16])
def test_prefill_and_greedy_decode_match_eager(built, references, key):
    from mlxbuild.families.common import compare
    from mlxbuild.tolerance import tolerance

    pte, record = _artifact(built, key)
    tokens, ref = references[key]
    assert tokens.shape == (1, PROMPT + DECODE)
    prog = mlx_runtime.load(pte)
    got = _generate(prog, tokens).astype(np.float32)
    assert got.shape == ref.shape == (PROMPT + DECODE, 512)
    result = compare(got, ref, tolerance(record["dtype"], record.get("quantization") or {}))
    assert result["passed"], result["reason"]
    assert result["max_abs_error"] < (1e-4 if record["dtype"] == "fp32" else 0.05)
    # Greedy decoding through the runtime picks the tokens the eager model picked.
    assert (got[PROMPT - 1:-1].argmax(-1) == tokens[0, PROMPT:]).all()


def test_kv_cache_persists_and_resets(built, references):
    pte, _ = _artifact(built, "4w")
    tokens, ref = references["4w"]
    prog = mlx_runtime.load(pte)
    # Chunked prefill: the second chunk attends to the first through the cache.
    prog.forward(tokens[:, :4], np.arange(4))
    second = prog.forward(tokens[:, 4:PROMPT], np.arange(4, PROMPT))[0][0]
    np.testing.assert_allclose(second, ref[4:PROMPT], atol=1e-4)
    step = prog.forward(tokens[:, PROMPT:PROMPT + 1], np.array([PROMPT]))[0][0]
    np.testing.assert_allclose(step, ref[PROMPT:PROMPT + 1], atol=1e-4)
    # A fresh state decodes the same token differently (nothing cached)...
    prog.reset()
    alone = prog.forward(tokens[:, PROMPT:PROMPT + 1], np.array([PROMPT]))[0][0]
    assert np.abs(alone - step).max() > 1e-3
    # ...and replaying from the start reproduces the first run exactly.
    prog.reset()
    again = prog.forward(tokens[:, :PROMPT], np.arange(PROMPT))[0][0]
    np.testing.assert_allclose(again, ref[:PROMPT], atol=1e-4)


def test_program_surface(built):
    import torch

    pte, record = _artifact(built, "fp32")
    prog = mlx_runtime.load(pte)
    assert prog.method_names == ["forward"]
    assert prog.constant_methods == record["constant_methods"]
    assert prog.constant_methods["get_max_seq_len"] == 128
    # torch in -> torch out; numpy in -> numpy out; the same numbers either way.
    out_t = prog.run("forward", [torch.zeros((1, 3), dtype=torch.long), torch.arange(3)])[0]
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (1, 3, 512)
    prog.reset()
    out_n = prog.forward(np.zeros((1, 3), dtype=np.int64), np.arange(3))[0]
    assert isinstance(out_n, np.ndarray)
    np.testing.assert_array_equal(out_n, out_t.numpy())
    with pytest.raises(mlx_runtime.ProgramError, match="dtype"):
        prog.forward(np.zeros((1, 3), dtype=np.int32), np.arange(3))
    with pytest.raises(mlx_runtime.ProgramError, match="bound"):
        prog.forward(np.zeros((1, 129), dtype=np.int64), np.arange(129))
    with pytest.raises(mlx_runtime.ProgramError, match="no method"):
        prog.run("backward", [])


# ------------------------------------------------------------------------ loader errors


def _payload(pte: Path) -> bytes:
    prog = mlx_runtime.load(pte)
    d = prog.plans["forward"].delegates[0]
    return bytes(prog.segment(d.processed.index))


def _repack(graph) -> bytes:
    import flatbuffers

    b = flatbuffers.Builder(1024)
    b.Finish(graph.Pack(b))
    body = bytes(b.Output())
    return b"\0\0\0\0" + fb.MAGIC + struct.pack("<QQ", fb.HEADER_LENGTH + len(body), 0) + body


def test_bad_magic_is_a_clear_error(built, tmp_path):
    pte, _ = _artifact(built, "fp32")
    payload = _payload(pte)
    with pytest.raises(fb.PayloadError, match="magic b'MLX9'"):
        fb.read_payload(payload[:4] + b"MLX9" + payload[8:])
    # The same through a whole .pte: the payload is patched in place in a copy.
    data = pte.read_bytes()
    at = data.index(payload[:24])
    bad = tmp_path / "bad.pte"
    bad.write_bytes(data[:at + 4] + b"MLX9" + data[at + 8:])
    with pytest.raises(mlx_runtime.ProgramError, match="not an MLX delegate payload") as info:
        mlx_runtime.load(bad).forward(np.zeros((1, 2), dtype=np.int64), np.arange(2))
    assert isinstance(info.value.__cause__, fb.PayloadError)


def test_newer_schema_version_is_a_clear_error(built):
    pte, _ = _artifact(built, "fp32")
    graph, _ = fb.read_payload(_payload(pte))
    graph.version = "2"
    with pytest.raises(fb.PayloadError, match="version 2.*up to version 1"):
        fb.read_payload(_repack(graph))
    graph.version = "one"
    with pytest.raises(fb.PayloadError, match="invalid MLX schema version"):
        fb.read_payload(_repack(graph))
    graph.version = "1"
    assert fb.read_payload(_repack(graph))[0].numConstantTensors == graph.numConstantTensors


def test_truncated_payload_and_file(built, tmp_path):
    pte, _ = _artifact(built, "fp32")
    with pytest.raises(fb.PayloadError, match="too short"):
        fb.read_payload(b"\0\0\0\0MLX0")
    with pytest.raises(fb.PayloadError, match="truncated"):
        fb.read_payload(_payload(pte)[:100])
    junk = tmp_path / "junk.pte"
    junk.write_bytes(b"not a program at all" * 10)
    with pytest.raises(mlx_runtime.ProgramError, match="not an ExecuTorch program"):
        mlx_runtime.load(junk)


def test_unknown_node_is_named(built, monkeypatch):
    import mlx_runtime.nodes  # noqa: F401 - handlers registered before we remove one

    pte, _ = _artifact(built, "fp32")
    monkeypatch.delitem(HANDLERS, "RMSNormNode")
    with pytest.raises(mlx_runtime.ProgramError, match=r"no handler for MLX node type\(s\): RMSNormNode"):
        mlx_runtime.load(pte).forward(np.zeros((1, 2), dtype=np.int64), np.arange(2))


# ------------------------------------------------------------------------ the executor alone


def test_non_delegated_program_runs_on_torch_kernels(tmp_path):
    """The .pte executor without a delegate: out-variant kernels, Int inputs, a mutable
    buffer kept across calls, two methods, constant methods, and torch.cond's
    JumpFalseCall / MoveCall."""
    import torch
    from executorch.exir import to_edge
    from torch.export import export

    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 3))
            self.register_buffer("count", torch.zeros(1))

        def forward(self, x, k: int):
            self.count.add_(1)
            y = torch.softmax(x @ self.w, -1) * k + self.count
            return y, y.sum()

    class Branch(torch.nn.Module):
        def forward(self, p, x):
            return torch.cond(p.sum() > 0, lambda x: x.sin(), lambda x: x.cos() * 2, (x,))

    torch.manual_seed(0)
    counter, x = Counter(), torch.randn(2, 4)
    programs = {"forward": export(counter, (x, 3)),
                "branch": export(Branch(), (torch.ones(1), torch.randn(3)))}
    et = to_edge(programs, constant_methods={"meta": 7, "vals": [1.5, 2.5]}).to_executorch()
    (tmp_path / "p.pte").write_bytes(et.buffer)

    prog = mlx_runtime.load(tmp_path / "p.pte")
    assert sorted(prog.method_names) == ["branch", "forward"]
    assert prog.constant_methods == {"meta": 7, "vals": [1.5, 2.5]}
    with torch.no_grad():
        counter.count.zero_()
        for _ in range(3):  # the buffer counts up in both
            got, want = prog.forward(x, 3), counter(x, 3)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w)
        v = torch.randn(3)
        for sign in (1.0, -1.0):
            (got,) = prog.run("branch", [torch.tensor([sign]), v])
            torch.testing.assert_close(got, Branch()(torch.tensor([sign]), v))


def test_generate_and_cli_run(built, references, capsys):
    from mlxbuild.cli import main

    pte, _ = _artifact(built, "4w")
    tokens, _ = references["4w"]
    prog = mlx_runtime.load(pte)
    result = decoding.generate(prog, tokens[0, :PROMPT], DECODE, stop_at_eos=False)
    assert result["tokens"] == tokens[0, PROMPT:].tolist()
    assert result["stopped"] == "max_new_tokens" and result["decode_tokens_per_s"] > 0

    ids = " ".join(map(str, tokens[0, :PROMPT]))
    assert main(["run", str(pte), "--ids", ids, "--max-new-tokens", "5", "--no-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == tokens[0, PROMPT:PROMPT + 5].tolist()
    assert main(["run", str(pte), "--info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["constant_methods"]["get_vocab_size"] == 512
    assert info["mlx_nodes"]["forward/0"]["QuantizedMatmulNode"] == 15
    assert main(["run", str(pte.with_name("missing.pte"))]) == 2


def test_half_precision_modes(built, references):
    """bf16 graphs: "native" computes in bf16 with MLX's CPU kernels, "float32" (the
    CPU default) promotes; both stay close to the eager bf16 model, and outputs keep
    the declared dtype."""
    import torch

    pte, _ = _artifact(built, BF16)
    tokens, ref = references[BF16]
    results = {}
    for precision in ("native", "float32"):
        prog = mlx_runtime.load(pte, precision=precision)
        (out,) = prog.run("forward", [torch.from_numpy(tokens[:, :PROMPT]), torch.arange(PROMPT)])
        assert out.dtype == torch.bfloat16
        results[precision] = out[0].float().numpy()
        assert np.abs(results[precision] - ref[:PROMPT]).max() < 0.05 * np.abs(ref).max()
    assert not np.array_equal(results["native"], results["float32"])
    with pytest.raises(ValueError, match="precision"):
        mlx_runtime.load(pte, precision="fp8")


def test_external_constants_from_ptd(tmp_path):
    """Constants kept in a .ptd beside the .pte (found by name, or passed in)."""
    import torch
    from executorch.exir import ExecutorchBackendConfig, to_edge
    from torch.export import export

    torch.manual_seed(0)
    lin, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    et = to_edge({"forward": export(lin, (x,))}).to_executorch(ExecutorchBackendConfig(external_constants=True))
    (tmp_path / "model.pte").write_bytes(et.buffer)
    et.write_tensor_data_to_file(str(tmp_path))
    (ptd,) = tmp_path.glob("*.ptd")
    with torch.no_grad():
        want = lin(x)
    torch.testing.assert_close(mlx_runtime.load(tmp_path / "model.pte").forward(x)[0], want)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "prog.pte").write_bytes(et.buffer)
    with pytest.raises(mlx_runtime.ProgramError, match="external tensor"):
        mlx_runtime.load(moved / "prog.pte").forward(x)
    torch.testing.assert_close(mlx_runtime.load(moved / "prog.pte", [ptd]).forward(x)[0], want)


def test_cli_run_from_a_prompt_and_tokenizer(built, references, capsys, tmp_path):
    """Text in, text out: the tokenizer comes from --tokenizer, or from the artifact's record."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    from mlxbuild.cli import main

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(512)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    pte, _ = _artifact(built, "4w")
    tokens, _ = references["4w"]
    prompt = tokens[0, :PROMPT].tolist()
    text = " ".join(f"t{i}" for i in prompt)

    args = ["--prompt", text, "--max-new-tokens", "5", "--no-eos", "--json"]
    assert main(["run", str(pte), "--tokenizer", str(tmp_path), *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == prompt
    assert out["tokens"] == tokens[0, PROMPT:PROMPT + 5].tolist()
    assert out["text"] == " ".join(f"t{i}" for i in out["tokens"])

    # The manifest's tokenizer reaches `run` through the record beside the .pte.
    copy = shutil.copy(pte, tmp_path / "model.pte")
    (tmp_path / "model.json").write_text(json.dumps({"tokenizer": str(tmp_path / "tokenizer.json")}))
    assert main(["run", str(copy), *args]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == out["tokens"]
    (tmp_path / "model.json").unlink()
    assert main(["run", str(copy), *args]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err
