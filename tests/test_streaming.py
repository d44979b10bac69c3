"""Bounded-memory quantization (``mlxbuild.families.streaming``, ``mlxbuild.hqq``): the
model is laid out on the meta device and read, quantized and kept a piece at a time; the
largest matrices are quantized in row blocks. Both must give exactly what the whole-model
path (``MLXBUILD_STREAMING=never``) gives, and the float model must never be whole."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from mlxbuild import hqq
from mlxbuild.families import streaming
from mlxbuild.stages import quantize as quantize_stage
from mlxbuild.stages import weights
from mlxbuild.steps import QuantizeParams
from recipes import qwen3_moe, whisper

QWEN = {"architecture": "qwen3", "seed": 3,
        "config": {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                   "tie_word_embeddings": True}}
GEMMA = {"architecture": "gemma3", "seed": 1,
         "config": {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "sliding_window": 8}}
WHISPER = whisper(64)
MOE = qwen3_moe(32)

SCHEMES = {
    "4w": {"linear": {"bits": 4, "group_size": 32}, "embedding": {"bits": 4, "group_size": 32}},
    "8da4w": {"linear": {"bits": 4, "group_size": 32, "activations": "int8_dynamic"},
              "embedding": {"bits": 8, "group_size": "per_channel"}},
    # per-layer rules across pieces, an untied head, nvfp4 and a layer left in float
    "mixed": {"linear": {"bits": 4, "group_size": 32}, "embedding": {"bits": 8, "group_size": "per_channel"},
              "rules": [{"blocks": [0], "bits": 8, "group_size": 32},
                        {"match": "*.mlp.down_proj", "format": "nvfp4"},
                        {"match": "*.self_attn.o_proj", "blocks": [-1], "format": "none"}]},
}


class _Cache:
    def __init__(self, **entries: Path):
        self.entries = entries

    def read(self, kind: str, key: str) -> Path:
        return self.entries[kind]


def _weights(root: Path, recipe: dict, dtype: str) -> Path:
    from mlxbuild.families.hf import DTYPES

    out = root / f"weights-{recipe['architecture']}-{dtype}"
    if not out.exists():
        out.mkdir(parents=True)
        weights.write_synthetic(recipe, DTYPES[dtype], out)
        (out / "source.json").write_text(json.dumps({"load": {"synthetic": recipe}, "dtype": dtype}))
    return out


def _quantize(tmp_path: Path, w: Path, scheme: dict, dtype: str, name: str) -> Path:
    out = tmp_path / name
    out.mkdir()
    quantize_stage.run(QuantizeParams(weights="w", scheme=scheme, dtype=dtype), _Cache(weights=w), out)
    return out


def _flat(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A tensor's plain parts: a torchao subclass's inner tensors (and its attributes), or itself."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        inner, attrs = t.__tensor_flatten__()
        out = {f"{k}": getattr(t, k) for k in inner}
        out["__attrs__"] = repr(attrs)
        return out
    return {"": t}


def _same_state(a: Path, b: Path) -> None:
    sa = torch.load(a / "state.pt", weights_only=False)
    sb = torch.load(b / "state.pt", weights_only=False)
    assert list(sa) == list(sb)
    for k in sa:
        assert type(sa[k]) is type(sb[k]), k
        fa, fb = _flat(sa[k]), _flat(sb[k])
        assert fa.keys() == fb.keys(), k
        for part in fa:
            if part == "__attrs__":
                assert fa[part] == fb[part], k
            else:
                assert fa[part].dtype == fb[part].dtype and torch.equal(fa[part], fb[part]), (k, part)
    assert json.loads((a / "layers.json").read_text()) == json.loads((b / "layers.json").read_text())


# ----------------------------------------------------------------------------- hqq in row blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["int4-g32", "int8-channel", "8da4w", "int2-g16"])
def test_row_blocks_give_torchaos_tensor_bit_for_bit(monkeypatch, dtype, kind):
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )

    config = {
        "int4-g32": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32),
                                         intx_choose_qparams_algorithm="hqq_scale_only"),
        "int8-channel": IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0),
                                             intx_choose_qparams_algorithm="hqq_scale_only"),
        "8da4w": Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32),
                                                       intx_choose_qparams_algorithm="hqq_scale_only"),
        "int2-g16": IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=PerGroup(16),
                                         intx_choose_qparams_algorithm="hqq_scale_only"),
    }[kind]
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 128, generator=gen) * torch.logspace(-2, 1, 1000).unsqueeze(1)
    w[7] = 0  # a row of zeros: den == 0 keeps the previous scale
    for rows in (1, 96, 1000, 4096):
        monkeypatch.setattr(hqq, "BLOCK_BYTES", rows * 4 * 128)
        theirs = torch.nn.Linear(128, 1000, bias=False).to(dtype)
        theirs.weight = torch.nn.Parameter(w.to(dtype))
        ours = torch.nn.Linear(128, 1000, bias=False).to(dtype)
        ours.weight = torch.nn.Parameter(w.to(dtype))
        quantize_(theirs, config)
        assert hqq.applies(ours, config)
        hqq.quantize_module(ours, config)
        a, b = theirs.weight, ours.weight
        assert type(a) is type(b)
        for attr in ("qdata", "scale", "zero_point"):
            x, y = getattr(a, attr), getattr(b, attr)
            assert x.dtype == y.dtype and torch.equal(x, y), (rows, attr)
        for attr in ("block_size", "target_dtype", "dtype", "activation_quantization"):
            assert getattr(a, attr) == getattr(b, attr), attr


def test_what_row_blocks_leave_to_torchao():
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_api import IntxWeightOnlyConfig

    hqq_cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32),
                                   intx_choose_qparams_algorithm="hqq_scale_only")
    affine = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    assert hqq.applies(torch.nn.Embedding(1000, 64, device="meta"), hqq_cfg)
    assert hqq.applies(torch.nn.Linear(64, 8, device="meta"), hqq_cfg)  # every size: it is the faster path
    assert not hqq.applies(torch.nn.Embedding(1000, 64, device="meta"), affine)  # another parameter choice
    conv = torch.nn.Conv1d(64, 8, 3, device="meta")
    assert not hqq.applies(conv, hqq_cfg)        # not a matrix


def test_blocks_follow_the_width():
    """A block holds ``BLOCK_BYTES`` of fp32 whatever the width, and at least one row."""
    w = torch.randn(40, 256)
    q, s = hqq.quantize(w, 32, -8, 7)
    for rows in (1, 3, 40):
        assert torch.equal(hqq.quantize(w, 32, -8, 7, rows=rows)[0], q)
    calls = []
    real = torch.Tensor.to

    def spy(self, *a, **k):
        if self.dim() == 2 and self.shape[1] == 256:
            calls.append(self.shape[0])
        return real(self, *a, **k)

    import unittest.mock as mock

    with mock.patch.object(hqq, "BLOCK_BYTES", 4 * 256 * 8), mock.patch.object(torch.Tensor, "to", spy):
        hqq.quantize(w, 32, -8, 7)
    assert calls and max(calls) == 8


# ----------------------------------------------------------------------------- streamed quantize


@pytest.mark.parametrize("recipe,dtype,scheme", [
    (QWEN, "fp32", "4w"), (QWEN, "bf16", "4w"), (QWEN, "fp32", "8da4w"), (QWEN, "fp16", "mixed"),
    (GEMMA, "bf16", "mixed"), (WHISPER, "fp32", "4w"),
], ids=["qwen-fp32-4w", "qwen-bf16-4w", "qwen-fp32-8da4w", "qwen-fp16-mixed", "gemma3-bf16-mixed",
        "whisper-fp32-4w"])
def test_streamed_quantization_is_the_whole_models(tmp_path, monkeypatch, recipe, dtype, scheme):
    monkeypatch.setattr(hqq, "BLOCK_BYTES", 4096)  # several blocks in every tiny matrix
    w = _weights(tmp_path, recipe, dtype)
    assert streaming.layout(w, dtype) is not None
    streamed = _quantize(tmp_path, w, SCHEMES[scheme], dtype, "streamed")
    monkeypatch.setenv("MLXBUILD_STREAMING", "never")
    assert streaming.layout(w, dtype) is None
    whole = _quantize(tmp_path, w, SCHEMES[scheme], dtype, "whole")
    _same_state(streamed, whole)


def test_a_sharded_folder_is_read_as_from_pretrained_reads_it(tmp_path, monkeypatch):
    """Shards through their index, and a stray file under other names (Mistral's hub repos
    ship consolidated.safetensors beside the shards) ignored, as from_pretrained ignores it."""
    from safetensors.torch import save_file

    monkeypatch.setattr(weights, "SHARD_BYTES", 64 * 1024)
    w = _weights(tmp_path, QWEN, "fp32")
    assert len(list(w.glob("model-*.safetensors"))) > 2
    save_file({"tok_embeddings.weight": torch.zeros(2, 2)}, str(w / "consolidated.safetensors"))
    streamed = _quantize(tmp_path, w, SCHEMES["4w"], "fp32", "streamed")
    monkeypatch.setenv("MLXBUILD_STREAMING", "never")
    _same_state(streamed, _quantize(tmp_path, w, SCHEMES["4w"], "fp32", "whole"))


def test_the_model_export_starts_from_is_the_loaded_one(tmp_path, monkeypatch):
    """Laid out on the meta device with the quantized state assigned (the float model never
    read) against from_pretrained + the same state: the same tensors, buffers (rotary
    frequencies, computed), generation config and outputs."""
    w = _weights(tmp_path, GEMMA, "bf16")
    q = _quantize(tmp_path, w, SCHEMES["mixed"], "bf16", "q")

    class P:
        weights, quantized, dtype = "w", "q", "bf16"

    cache = _Cache(weights=w, quantize=q)
    ours = quantize_stage.quantized_model(cache, P)
    monkeypatch.setenv("MLXBUILD_STREAMING", "never")
    theirs = quantize_stage.quantized_model(cache, P)
    a = dict(ours.named_parameters(remove_duplicate=False)) | dict(ours.named_buffers())
    b = dict(theirs.named_parameters(remove_duplicate=False)) | dict(theirs.named_buffers())
    assert a.keys() == b.keys()
    for k in a:
        assert not a[k].is_meta, k
        fa, fb = _flat(a[k].detach()), _flat(b[k].detach())
        assert all(part == "__attrs__" and fa[part] == fb[part] or torch.equal(fa[part], fb[part])
                   for part in fa), k
    # the scheme's rules differ for the two (8-bit embedding, 4-bit head): untied in both
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert theirs.lm_head.weight is not theirs.model.embed_tokens.weight
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    assert ours.config.to_dict() == theirs.config.to_dict()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_checkpoints_streaming_cannot_reproduce_load_whole(tmp_path):
    """Fused MoE experts are renamed on load (a weight conversion), so the layout's names are
    not the checkpoint's: the whole-model path takes them, and quantizes as before."""
    w = _weights(tmp_path, MOE, "fp32")
    assert streaming.layout(w, "fp32") is None
    out = _quantize(tmp_path, w, SCHEMES["4w"], "fp32", "q")
    layers = json.loads((out / "layers.json").read_text())
    assert layers["model.layers.0.mlp.experts.gate_proj.0"]["bits"] == 4


def test_calibrated_schemes_refuse_pieces(tmp_path):
    from mlxbuild.errors import BuildError
    from mlxbuild.quantize import apply_scheme

    model, checkpoint = streaming.layout(_weights(tmp_path, QWEN, "fp32"), "fp32")
    scheme = {**SCHEMES["4w"], "method": "gptq"}
    with pytest.raises(BuildError, match="gptq quantizes the whole float model"):
        apply_scheme(model, scheme, torch.zeros(1, 4, dtype=torch.long), pieces=streaming.pieces(model, checkpoint))


def test_only_one_piece_is_ever_float(tmp_path, monkeypatch):
    """Every float matrix read from the checkpoint is gone (quantized, its float freed)
    before the next piece is read: at most one piece's worth of float linear weights is
    alive at any read."""
    w = _weights(tmp_path, QWEN, "fp32")
    alive: list[tuple[str, weakref.ref]] = []
    most = 0
    real_read = streaming.Checkpoint.read

    def read(self, names):
        nonlocal most
        tensors = real_read(self, names)
        for name, t in tensors.items():
            if t.dim() == 2:
                alive.append((name, weakref.ref(t)))
        pieces = {n.split(".")[2] if n.startswith("model.layers.") else "rest"
                  for n, r in alive if r() is not None}
        most = max(most, len(pieces))
        return tensors

    monkeypatch.setattr(streaming.Checkpoint, "read", read)
    _quantize(tmp_path, w, SCHEMES["4w"], "fp32", "q")
    assert len(alive) == 3 * 7 + 1  # 7 linears a layer, the (tied) embedding once
    assert most == 1


@pytest.mark.slow  # ~70 s: writes a 168M-parameter checkpoint and quantizes it twice
def test_streamed_quantize_peaks_at_a_piece_not_the_model(tmp_path):
    """A 168M-parameter Llama (336 MB in bf16, a 65 MB vocabulary matrix): the quantize
    step's process peaks at least 300 MB under the whole-model path's (which holds the float
    model and torchao's fp32 temporaries of the largest matrix)."""
    recipe = {"architecture": "llama", "seed": 0,
              "config": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 4096,
                         "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
                         "tie_word_embeddings": False}}
    w = _weights(tmp_path, recipe, "bf16")
    code = ("import sys, json; from pathlib import Path; from mlxbuild.stages import quantize as q; "
            "from mlxbuild.steps import QuantizeParams; from mlxbuild.child import peak_rss\n"
            "class C:\n    def read(self, kind, key): return Path(sys.argv[1])\n"
            "s = json.loads(sys.argv[2]); out = Path(sys.argv[3]); out.mkdir()\n"
            "q.run(QuantizeParams(weights='w', scheme=s, dtype='bf16'), C(), out); print(peak_rss())")

    def peak(mode: str) -> int:
        env = {**__import__("os").environ, "MLXBUILD_STREAMING": mode}
        p = subprocess.run([sys.executable, "-c", code, str(w), json.dumps(SCHEMES["4w"]), str(tmp_path / mode)],
                           capture_output=True, text=True, timeout=600, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        return int(p.stdout.split()[-1])

    streamed, whole = peak("auto"), peak("never")
    assert whole - streamed > 300 * 2**20, (streamed, whole)
    _same_state(tmp_path / "auto", tmp_path / "never")


def _lower(tmp_path: Path, w: Path, q: Path, name: str, backend: str = "mlx", options: dict | None = None) -> Path:
    import backends
    from mlxbuild.stages import export as export_stage
    from mlxbuild.stages import lower as lower_stage
    from mlxbuild.steps import ExportParams, LowerParams

    spec = {"task": "text-generation", "max_context_length": 16, "max_prefill_chunk": 16}
    e, lo = tmp_path / f"{name}-export", tmp_path / f"{name}-lower"
    e.mkdir()
    lo.mkdir()
    cache = _Cache(weights=w, quantize=q, export=e)
    flavour = backends.flavour_of(backend, options or {})
    export_stage.run(ExportParams(weights="w", quantized="q", flavour=flavour, dtype="fp32", **spec), cache, e)
    lower_stage.run(LowerParams(export="e", weights="w", backend=backend, options=options, **spec), cache, lo)
    return lo


def _lower_mlx(tmp_path: Path, w: Path, q: Path, name: str) -> bytes:
    return (_lower(tmp_path, w, q, name) / "model.pte").read_bytes()


@pytest.mark.parametrize("scheme", ["4w", "mixed"], ids=["tied-head", "untied-head"])
def test_the_pte_is_the_whole_models(tmp_path, monkeypatch, scheme):
    """Streamed quantize, export from the layout, and the MLX preprocess sharing the weights
    instead of ExecuTorch's deep copy and packing them in row blocks (backends/mlx.py), the
    export tracing the parameters uncloned, and the lower step dropping the state entries
    its program never reads (a tied head's second name), give the .pte the whole-model path
    and ExecuTorch's own copy and packing give, byte for byte."""
    monkeypatch.setattr("backends.mlx.PACK_ROWS", 24)  # the tiny weights span several blocks
    w = _weights(tmp_path, QWEN, "fp32")
    streamed = _lower_mlx(tmp_path, w, _quantize(tmp_path, w, SCHEMES[scheme], "fp32", "q1"), "streamed")
    import executorch.backends.mlx.ops as mlx_ops
    import executorch.backends.mlx.patterns as mlx_patterns
    from executorch.backends.mlx.builder import op_helpers
    from executorch.backends.mlx.preprocess import MLXBackend  # importable once lowering ran
    from executorch.exir.backend.backend_details import BackendDetails

    assert MLXBackend.copy_exported_program_for_preprocess.__func__ is not \
        BackendDetails.copy_exported_program_for_preprocess.__func__  # the sharing copy was installed
    assert mlx_patterns.to_mlx_qparams is not op_helpers.to_mlx_qparams  # ... and the block packer
    for module in (mlx_patterns, mlx_ops):
        monkeypatch.setattr(module, "to_mlx_qparams", op_helpers.to_mlx_qparams)
    monkeypatch.setattr("backends.mlx._pack_in_row_blocks", lambda: None)
    monkeypatch.setenv("MLXBUILD_STREAMING", "never")
    monkeypatch.setattr(MLXBackend, "copy_exported_program_for_preprocess",
                        classmethod(BackendDetails.copy_exported_program_for_preprocess.__func__))
    monkeypatch.setattr("backends.lowering.share_weights_with_preprocess", lambda backend_cls: None)
    monkeypatch.setattr("mlxbuild.stages.export.drop_unused_state", lambda program: None)
    monkeypatch.setattr("mlxbuild.stages.export.weights_not_cloned", contextlib.nullcontext)
    whole = _lower_mlx(tmp_path, w, _quantize(tmp_path, w, SCHEMES[scheme], "fp32", "q2"), "whole")
    assert len(streamed) > 10_000 and streamed == whole


@pytest.mark.parametrize("options", [{}, {"external_weights": True}], ids=["pte", "ptd"])
def test_xnnpack_lowers_the_same_bytes_sharing_the_weights(tmp_path, monkeypatch, options):
    """The XNNPACK preprocess gets a copy of each partition that shares its weights
    (backends/xnnpack.py) instead of ExecuTorch's deep copy: the same .pte (and .ptd) bytes,
    for 8da4w, whose 4-bit weights its node visitors pack and whose embedding stays on CPU
    kernels."""
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir.backend.backend_details import BackendDetails

    w = _weights(tmp_path, QWEN, "fp32")
    q = _quantize(tmp_path, w, SCHEMES["8da4w"], "fp32", "q")
    shared = _lower(tmp_path, w, q, "shared", "xnnpack", options)
    assert XnnpackBackend.copy_exported_program_for_preprocess.__func__ is not \
        BackendDetails.copy_exported_program_for_preprocess.__func__  # the sharing copy was installed
    monkeypatch.setattr(XnnpackBackend, "copy_exported_program_for_preprocess",
                        classmethod(BackendDetails.copy_exported_program_for_preprocess.__func__))
    monkeypatch.setattr("backends.lowering.share_weights_with_preprocess", lambda backend_cls: None)
    copied = _lower(tmp_path, w, q, "copied", "xnnpack", options)
    files = sorted(p.name for p in shared.iterdir() if p.suffix in (".pte", ".ptd"))
    assert files == (["model.ptd", "model.pte"] if options else ["model.pte"])
    assert files == sorted(p.name for p in copied.iterdir() if p.suffix in (".pte", ".ptd"))
    for name in files:
        a, b = (shared / name).read_bytes(), (copied / name).read_bytes()
        assert len(a) > 10_000 or name == "model.pte" and options, (name, len(a))
        assert a == b, name


def test_export_hands_parameters_over_uncloned_and_still_clones_buffers():
    from torch._dynamo.variables import builder

    from mlxbuild.stages.export import weights_not_cloned

    original = builder._clone_input
    param, buffer = torch.nn.Parameter(torch.ones(3), requires_grad=False), torch.ones(3)
    assert original(param, None) is not param  # what dynamo does unpatched
    with weights_not_cloned():
        assert builder._clone_input(param, None) is param
        copy = builder._clone_input(buffer, None)
        assert copy is not buffer and torch.equal(copy, buffer)
    assert builder._clone_input is original


def test_a_scheme_that_quantizes_nothing_reads_nothing(tmp_path, monkeypatch):
    w = _weights(tmp_path, QWEN, "fp32")
    scheme = {"linear": {"format": "none"}}
    monkeypatch.setattr(streaming.Checkpoint, "read", lambda self, names: pytest.fail(f"read {names}"))
    streamed = _quantize(tmp_path, w, scheme, "fp32", "streamed")
    monkeypatch.setenv("MLXBUILD_STREAMING", "never")
    whole = _quantize(tmp_path, w, scheme, "fp32", "whole")
    assert not (streamed / "state.pt").exists() and not (whole / "state.pt").exists()
    assert json.loads((streamed / "layers.json").read_text()) == json.loads((whole / "layers.json").read_text())
