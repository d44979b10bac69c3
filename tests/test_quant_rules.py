"""Per-layer quantization rules: manifest validation, the layers each rule reaches,
tied embeddings, dtypes, tolerances, the published record, and one tiny end-to-end
mixed-precision build whose MLX program is checked node by node.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from backends import capabilities
from mlxbuild.errors import BuildError, ManifestError
from mlxbuild.manifest import load_manifest, parse_manifest
from mlxbuild.tolerance import tolerance

REPO = Path(__file__).resolve().parent.parent
MIXED_MANIFEST = REPO / "manifests" / "qwen-mixed.yaml"

# Line numbers matter: the malformed cases below point into this text.
BASE = """\
name: mixed
version: 0.1.0
model:
  source:
    synthetic: {architecture: qwen3}
  dtype: fp32
export:
  max_context_length: 64
quantization:
  mixed:
    linear: {bits: 4}
    embedding: {bits: 4}
    rules:
      - {match: lm_head, bits: 8, group_size: per_channel}
      - {blocks: [0, -1], bits: 8}
      - {regex: 'model\\.layers\\.1\\..*', layers: linear, format: nvfp4}
  x8da:
    linear: {bits: 4, activations: int8_dynamic}
    embedding: {bits: 8, group_size: per_channel}
    rules:
      - {blocks: [0], bits: 8, group_size: per_channel, activations: int8_dynamic}
      - {match: '*.o_proj', format: none}
targets:
  - {name: mlx, backend: mlx, quantization: mixed}
  - {name: xnn, backend: xnnpack, quantization: x8da}
"""


def sub(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, f"{old!r} must occur exactly once"
    return text.replace(old, new)


# --------------------------------------------------------------------------- manifest


def test_rules_parse_and_dump():
    m = parse_manifest(BASE)
    rules = m.quantization["mixed"].rules
    assert [r.match for r in rules] == ["lm_head", None, None]
    assert rules[1].blocks == [0, -1] and rules[1].group_size == 32  # affine default
    assert [r.kinds for r in rules] == [("linear", "embedding"), ("linear", "embedding"), ("linear",)]
    # int8_dynamic exists for linear layers only, so such a rule picks only those.
    assert m.quantization["x8da"].rules[0].kinds == ("linear",)
    dumped = m.scheme_for("mlx").model_dump(mode="json")
    assert dumped["rules"][1] == {"blocks": [0, -1], "format": "affine", "bits": 8,
                                  "group_size": 32, "activations": "none"}
    assert dumped["rules"][2]["regex"] == r"model\.layers\.1\..*"
    # A scheme without rules dumps exactly as before rules existed (keys and records unchanged).
    plain = parse_manifest(sub("    rules:\n      - {match: lm_head, bits: 8, group_size: per_channel}\n"
                               "      - {blocks: [0, -1], bits: 8}\n"
                               "      - {regex: 'model\\.layers\\.1\\..*', layers: linear, format: nvfp4}\n",
                               ""))
    assert set(plain.scheme_for("mlx").model_dump(mode="json")) == {"linear", "embedding"}


def test_shipped_mixed_manifest_is_valid():
    m = load_manifest(MIXED_MANIFEST)
    assert all(m.scheme_for(t).rules for t in m.targets)


def test_rules_only_scheme_is_not_empty():
    m = parse_manifest(sub("    linear: {bits: 4}\n    embedding: {bits: 4}\n", ""))
    assert m.quantization["mixed"].linear is None and not m.quantization["mixed"].is_empty


def why(backend: str, kind: str, attr: str, dtype: str = "fp32", **quant) -> str:
    """The capability table's reason for refusing one layer quantization."""
    q = SimpleNamespace(**{"format": "affine", "bits": None, "group_size": 32, "activations": "none",
                           **quant})
    issues = capabilities.check(backend, SimpleNamespace(**{kind: q}), dtype)
    found = [msg for fld, msg in issues if fld == f"{kind}.{attr}"]
    assert found, issues
    return found[0]


BAD = [
    ("no-selector", sub("{match: lm_head, bits: 8,", "{bits: 8,"),
     "14:9: quantization.mixed.rules[0]: a rule needs at least one selector: match, regex, "
     "blocks, layers"),
    ("unknown-rule-field", sub("{match: lm_head,", "{match: lm_head, name: head,"),
     "14:26: quantization.mixed.rules[0].name: unknown field 'name'; allowed: match, regex, "
     "blocks, layers, format, bits, group_size, activations"),
    ("empty-match", sub("match: lm_head", "match: ''"),
     "14:10: quantization.mixed.rules[0].match: expected a non-empty string, got an empty string"),
    ("bad-regex", sub("'model\\.layers", "'model[layers"),
     "16:10: quantization.mixed.rules[2].regex: invalid regular expression "
     "'model[layers\\\\.1\\\\..*': unterminated character set at position 5"),
    ("blocks-empty", sub("[0, -1]", "[]"),
     "15:10: quantization.mixed.rules[1].blocks: must not be empty (at least 1 item required)"),
    ("blocks-not-int", sub("[0, -1]", "[0, last]"),
     "15:22: quantization.mixed.rules[1].blocks[1]: expected an integer, got a string ('last')"),
    ("blocks-duplicate", sub("[0, -1]", "[0, -1, 0]"),
     "15:26: quantization.mixed.rules[1].blocks[2]: duplicate block index 0 (already at "
     "blocks[0])"),
    ("blocks-not-list", sub("[0, -1]", "first"),
     "15:10: quantization.mixed.rules[1].blocks: expected a list, got a string ('first')"),
    ("layers-unknown", sub("layers: linear", "layers: conv"),
     "16:41: quantization.mixed.rules[2].layers: 'conv' is not allowed; expected one of: "
     "linear, embedding"),
    ("rule-affine-without-bits", sub("{blocks: [0, -1], bits: 8}", "{blocks: [0, -1]}"),
     "15:9: quantization.mixed.rules[1].bits: required when format is 'affine' (one of: 2, 4, 8)"),
    ("rule-nvfp4-with-bits", sub("layers: linear, format: nvfp4}", "layers: linear, format: nvfp4, bits: 4}"),
     "16:72: quantization.mixed.rules[2].bits: not allowed when format is 'nvfp4' (nvfp4 is "
     "always 4-bit)"),
    ("rule-8da-on-embedding", sub("{blocks: [0], bits: 8,", "{blocks: [0], layers: embedding, bits: 8,"),
     "21:76: quantization.x8da.rules[0].activations: int8_dynamic activations apply to linear "
     "layers only, and this rule has layers: embedding"),
    ("rules-not-list", sub("    rules:\n      - {match: lm_head, bits: 8, group_size: per_channel}\n"
                           "      - {blocks: [0, -1], bits: 8}\n"
                           "      - {regex: 'model\\.layers\\.1\\..*', layers: linear, format: nvfp4}\n",
                           "    rules: lm_head\n"),
     "13:5: quantization.mixed.rules: expected a list, got a string ('lm_head')"),
    ("rule-8da-2bit", sub("{blocks: [0], bits: 8, group_size: per_channel,",
                          "{blocks: [0], bits: 2, group_size: per_channel,"),
     "21:57: quantization.x8da.rules[0].activations: int8_dynamic activations require format "
     "'affine' with bits 4 or 8"),
    # Backend support is checked per rule and reported at the rule's own field. The reason
    # after the colon is the capability table's wording (backends/capabilities.py).
    ("rule-8da-on-mlx", sub("{blocks: [0, -1], bits: 8}", "{blocks: [0, -1], bits: 8, activations: int8_dynamic}"),
     "15:36: quantization.mixed.rules[1].activations: not supported by backend 'mlx' of "
     "targets[0] ('mlx') for linear layers: "
     + why("mlx", "linear", "activations", bits=8, activations="int8_dynamic")),
    ("rule-8bit-groups-on-xnnpack", sub("{blocks: [0], bits: 8, group_size: per_channel,",
                                        "{blocks: [0], bits: 8, group_size: 32,"),
     "21:32: quantization.x8da.rules[0].group_size: not supported by backend 'xnnpack' of "
     "targets[1] ('xnn') for linear layers: "
     + why("xnnpack", "linear", "group_size", bits=8, activations="int8_dynamic")),
    ("rule-weight-only-linear-on-xnnpack", sub("{match: '*.o_proj', format: none}",
                                               "{match: '*.o_proj', bits: 8}"),
     "22:9: quantization.x8da.rules[1].activations: not supported by backend 'xnnpack' of "
     "targets[1] ('xnn') for linear layers: " + why("xnnpack", "linear", "activations", bits=8)
     + " (the rule applies to linear and embedding layers; add layers: embedding to limit it)"),
    ("rule-nvfp4-on-xnnpack", sub("{match: '*.o_proj', format: none}",
                                  "{match: '*.o_proj', layers: linear, format: nvfp4}"),
     "22:45: quantization.x8da.rules[1].format: not supported by backend 'xnnpack' of "
     "targets[1] ('xnn') for linear layers: " + why("xnnpack", "linear", "format", format="nvfp4")),
    ("rule-quantized-linear-on-portable", sub("backend: xnnpack", "backend: portable").replace(
        "    linear: {bits: 4, activations: int8_dynamic}\n", "").replace(
        "{blocks: [0], bits: 8, group_size: per_channel, activations: int8_dynamic}",
        "{blocks: [0], layers: linear, bits: 8}"),
     "20:9: quantization.x8da.rules[0].format: not supported by backend 'portable' of "
     "targets[1] ('xnn') for linear layers: " + why("portable", "linear", "format", bits=8)),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_malformed_rules(tmp_path, text, expected):
    p = tmp_path / "m.yaml"
    p.write_text(text)
    with pytest.raises(ManifestError) as info:
        load_manifest(p)
    assert str(info.value) == f"{p}:{expected}"


# --------------------------------------------------------------------------- tolerance


def test_tolerance_takes_the_loosest_rule():
    q4 = {"format": "affine", "bits": 4, "group_size": 32, "activations": "none"}
    dyn = {**q4, "activations": "int8_dynamic"}
    none = {"format": "none"}
    assert tolerance("fp32", {})["max_rel_error"] == 1e-4
    assert tolerance("fp32", {"linear": none, "rules": [{"match": "x", **none}]})["max_rel_error"] == 1e-4
    # Only a rule quantizes: the artifact is a quantized model all the same.
    assert tolerance("fp32", {"rules": [{"match": "lm_head", **q4}]})["max_rel_error"] == 1e-3
    # One dynamic-activation rule brings the int8 kernels' looser bound to the whole scheme.
    assert tolerance("fp32", {"linear": q4, "rules": [{"blocks": [0], **dyn}]})["max_rel_error"] == 5e-2
    assert tolerance("bf16", {"linear": q4, "rules": [{"blocks": [0], **q4}]})["max_rel_error"] == 4e-2


# --------------------------------------------------------------------------- apply_scheme

torch = pytest.importorskip("torch")

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny(dtype=None, **overrides):
    """The synthetic model a build makes (mlxbuild.stages.weights), loaded as builds load it."""
    import json
    import tempfile
    from pathlib import Path

    from mlxbuild.families.hf import load_model
    from mlxbuild.stages.weights import write_synthetic

    recipe = {"architecture": "qwen3", "seed": 0, "config": {**CONFIG, **overrides}}
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(recipe, dtype or torch.float32, Path(tmp))
        (Path(tmp) / "source.json").write_text(json.dumps({"load": {"synthetic": recipe}}))
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype or torch.float32]
        return load_model(Path(tmp), name)


def affine(bits, group=32, activations="none"):
    return {"format": "affine", "bits": bits, "group_size": group, "activations": activations}


def rule(**kw):
    quant = {k: kw.pop(k) for k in ("format", "bits", "group_size", "activations") if k in kw}
    return {**kw, **({"format": "affine"} | quant)}


def weight_quant(module) -> dict:
    """What the module's weight tensor really is, read from the tensor itself."""
    w = module.weight
    kind = type(w).__name__
    if kind == "IntxUnpackedToInt8Tensor":
        group = w.block_size[-1]
        return {"format": "affine", "bits": {torch.int2: 2, torch.int4: 4, torch.int8: 8}[w.target_dtype],
                "group_size": "per_channel" if group == w.shape[-1] else group,
                "activations": "int8_dynamic" if w.activation_quantization else "none"}
    if kind == "ExportableNVFP4Tensor":
        return {"format": "nvfp4", "group_size": w.block_size}
    assert isinstance(w, torch.nn.Parameter) and type(w.data) is torch.Tensor, kind
    return {"format": "none"}


def quantize(model, scheme):
    from mlxbuild.quantize import apply_scheme

    with torch.no_grad():
        return apply_scheme(model, scheme)


def test_mixed_rules_reach_the_layers_they_name():
    model = tiny()
    scheme = {"linear": affine(4), "embedding": affine(4),
              "rules": [rule(match="lm_head", bits=8, group_size="per_channel"),
                        rule(blocks=[0, -1], bits=8),
                        rule(blocks=[1], match="*.mlp.*", format="nvfp4"),
                        rule(regex=r"model\.layers\.1\.self_attn\.[qk]_proj", format="none")]}
    layers = quantize(model, scheme)

    want = {"model.embed_tokens": affine(4), "lm_head": affine(8, "per_channel")}
    for b in range(3):
        for p in PROJ:
            name = f"model.layers.{b}.{p}"
            if b in (0, 2):
                want[name] = affine(8)
            elif p.startswith("mlp."):
                want[name] = {"format": "nvfp4", "group_size": 16}
            elif p in ("self_attn.q_proj", "self_attn.k_proj"):
                want[name] = {"format": "none"}
            else:
                want[name] = affine(4)
    got = {n: weight_quant(model.get_submodule(n)) for n in want}
    assert got == want
    recorded = {n: {k: v for k, v in info.items() if k not in ("rule", "untied_from")}
                for n, info in layers.items()}
    assert recorded == want
    assert layers["model.layers.2.mlp.down_proj"]["rule"] == "rules[1]"  # -1 resolved to block 2
    assert layers["model.layers.1.mlp.up_proj"]["rule"] == "rules[2]"
    assert layers["model.layers.1.self_attn.v_proj"]["rule"] == "linear"
    assert layers["lm_head"]["untied_from"] == "model.embed_tokens"
    from mlxbuild.quantize import summarize

    assert summarize(layers)["counts"] == {"affine-4": 3, "affine-8": 15, "none": 2, "nvfp4": 3}


def test_first_matching_rule_wins():
    model = tiny()
    layers = quantize(model, {"rules": [rule(match="*.down_proj", bits=2),
                                        rule(match="*.mlp.*", bits=8)]})
    assert weight_quant(model.model.layers[0].mlp.down_proj) == affine(2)
    assert weight_quant(model.model.layers[0].mlp.up_proj) == affine(8)
    # No base rule: everything else stays as it was.
    assert weight_quant(model.model.layers[0].self_attn.q_proj) == {"format": "none"}
    assert layers["model.embed_tokens"] == {"format": "none", "rule": "embedding"}
    # Neither side quantized: the tie is untouched.
    assert layers["lm_head"] == {"format": "none", "rule": "linear", "tied_to": "model.embed_tokens"}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_int8_dynamic_rule_and_layers_selector():
    model = tiny()
    quantize(model, {"linear": affine(4, 32, "int8_dynamic"), "embedding": affine(8, "per_channel"),
                     "rules": [rule(blocks=[-1], bits=8, group_size="per_channel", activations="int8_dynamic"),
                               rule(layers="embedding", bits=4)]})
    assert weight_quant(model.model.layers[2].mlp.up_proj) == affine(8, "per_channel", "int8_dynamic")
    assert weight_quant(model.model.layers[1].mlp.up_proj) == affine(4, 32, "int8_dynamic")
    assert weight_quant(model.model.embed_tokens) == affine(4)


@pytest.mark.parametrize("scheme,message", [
    ({"rules": [rule(match="decoder.*", bits=8)]},
     "quantization rules[0] (match 'decoder.*') matches no layer of the model (linear and "
     "embedding modules: model.embed_tokens, model.layers.0.self_attn.q_proj, "
     "model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj, "
     "model.layers.0.self_attn.o_proj, model.layers.0.mlp.gate_proj, ... (23 in all))"),
    ({"rules": [rule(match="*embed*", layers="linear", bits=8)]},
     "quantization rules[0] (match '*embed*', layers 'linear') matches no layer of the model "
     "(linear and embedding modules: model.embed_tokens, model.layers.0.self_attn.q_proj, "
     "model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj, "
     "model.layers.0.self_attn.o_proj, model.layers.0.mlp.gate_proj, ... (23 in all))"),
    ({"rules": [rule(blocks=[0], bits=8), rule(match="model.layers.0.mlp.*", bits=2)]},
     "quantization rules[1] (match 'model.layers.0.mlp.*') only matches layers that earlier "
     "rules already set (rules[0]); the first matching rule wins, so this one does nothing"),
    ({"rules": [rule(blocks=[0, 3], bits=8)]},
     "quantization rules[0] (blocks [0, 3]): block 3 is out of range; the model has 3 decoder "
     "blocks (model.layers.0 to model.layers.2; -3 to -1 from the end)"),
    ({"rules": [rule(blocks=[-4], bits=8)]},
     "quantization rules[0] (blocks [-4]): block -4 is out of range; the model has 3 decoder "
     "blocks (model.layers.0 to model.layers.2; -3 to -1 from the end)"),
], ids=["no-match", "kind-filter-no-match", "shadowed", "block-out-of-range", "negative-out-of-range"])
def test_rule_that_does_nothing_fails(scheme, message):
    with pytest.raises(BuildError) as info:
        quantize(tiny(), scheme)
    assert str(info.value) == message


# --------------------------------------------------------------------------- tied embeddings


def saved_and_reloaded(model, layers, tmp_path):
    """What export and the reference see: a fresh model with the saved quantized state loaded."""
    from mlxbuild.stages import quantize as stage

    stage.save(model, layers, tmp_path)
    fresh = tiny()
    stage.load_into(fresh, tmp_path)
    return fresh


def test_same_rule_keeps_lm_head_tied(tmp_path):
    model = tiny()
    layers = quantize(model, {"linear": affine(4), "embedding": affine(4)})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert weight_quant(model.lm_head) == affine(4)
    assert layers["lm_head"]["tied_to"] == "model.embed_tokens"
    fresh = saved_and_reloaded(model, layers, tmp_path)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # one tensor in the artifact


def test_same_rule_through_per_layer_rules_keeps_tied(tmp_path):
    # Different base rules, but rules give lm_head and the embedding the same quantization.
    model = tiny()
    layers = quantize(model, {"linear": affine(4), "embedding": affine(2),
                              "rules": [rule(match="lm_head", bits=8, group_size=64),
                                        rule(match="model.embed_tokens", bits=8, group_size=64)]})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert weight_quant(model.lm_head) == affine(8, "per_channel")  # group 64 = whole row
    assert layers["lm_head"]["tied_to"] == "model.embed_tokens"


def test_different_rule_unties_lm_head_correctly(tmp_path):
    model = tiny()
    original = model.lm_head.weight.detach().clone()
    hidden = torch.randn(1, 5, CONFIG["hidden_size"])
    layers = quantize(model, {"linear": affine(4), "embedding": affine(4),
                              "rules": [rule(match="lm_head", bits=8, group_size="per_channel")]})
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert weight_quant(model.lm_head) == affine(8, "per_channel")
    assert weight_quant(model.model.embed_tokens) == affine(4)
    assert layers["lm_head"]["untied_from"] == "model.embed_tokens"
    # Each side is its own quantization of the original matrix: 8-bit is far closer to it.
    head = model.lm_head.weight.dequantize()
    emb = model.model.embed_tokens.weight.dequantize()
    assert (head - original).abs().max() < (emb - original).abs().max() / 4
    with torch.no_grad():
        assert torch.allclose(model.lm_head(hidden), hidden @ head.T, atol=1e-5)
    fresh = saved_and_reloaded(model, layers, tmp_path)
    assert fresh.lm_head.weight is not fresh.model.embed_tokens.weight
    assert weight_quant(fresh.lm_head) == affine(8, "per_channel")
    assert weight_quant(fresh.model.embed_tokens) == affine(4)


def test_excluded_lm_head_keeps_float_weights(tmp_path):
    model = tiny()
    original = model.lm_head.weight.detach().clone()
    layers = quantize(model, {"linear": affine(4), "embedding": affine(4),
                              "rules": [rule(match="lm_head", format="none")]})
    assert weight_quant(model.lm_head) == {"format": "none"}
    assert torch.equal(model.lm_head.weight, original)
    assert weight_quant(model.model.embed_tokens) == affine(4)
    assert layers["lm_head"] == {"format": "none", "rule": "rules[0]", "untied_from": "model.embed_tokens"}
    fresh = saved_and_reloaded(model, layers, tmp_path)
    assert torch.equal(fresh.lm_head.weight, original)
    assert weight_quant(fresh.model.embed_tokens) == affine(4)


# --------------------------------------------------------------------------- dtypes


# Every weight format quantize can produce, and how far (relative RMS) its dequantized weights
# may land from the float ones: a layer quantized wrongly (or not at all) misses these bands.
FORMATS = [(affine(2), 0.2, 0.5), (affine(4), 0.04, 0.15), (affine(8), 0.001, 0.01),
           ({"format": "nvfp4", "group_size": 16}, 0.05, 0.2)]


def _allowed(dtype: str) -> list[dict]:
    """Every weight format some supported backend takes at `dtype`, from the capability table."""
    out = []
    for b in capabilities.SUPPORTED_BACKENDS:
        caps = capabilities.get(b)
        if dtype in caps.dtypes:
            for layer in (caps.linear, caps.embedding):
                out += [affine(bits) for bits in layer.affine_bits]
                if layer.nvfp4 and dtype in layer.nvfp4_dtypes:
                    out.append({"format": "nvfp4", "group_size": 16})
    return out


@pytest.mark.parametrize("dtype", capabilities.DTYPES)
def test_every_format_quantizes_at_every_dtype(dtype):
    from mlxbuild.families.hf import DTYPES

    # The table never allows what this test does not cover.
    assert all(q in [f for f, _, _ in FORMATS] for q in _allowed(dtype))
    # One model, one block per format (mixed in one scheme), and the float original.
    model = tiny(DTYPES[dtype], num_hidden_layers=len(FORMATS))
    ref = tiny(DTYPES[dtype], num_hidden_layers=len(FORMATS))
    quantize(model, {"embedding": {"format": "nvfp4"}, "linear": {"format": "nvfp4"},
                     "rules": [{**q, "blocks": [i]} for i, (q, _, _) in enumerate(FORMATS)]})
    for i, (q, low, high) in enumerate(FORMATS):
        layer, original = model.model.layers[i].mlp.up_proj, ref.model.layers[i].mlp.up_proj.weight.detach()
        assert weight_quant(layer) == q
        assert layer.weight.dtype == DTYPES[dtype]
        err = (layer.weight.dequantize().float() - original.float()).pow(2).mean().sqrt()
        rel = float(err / original.float().pow(2).mean().sqrt())
        assert low < rel < high, (q, rel)
    # nvfp4 embedding and a tied lm_head under the same rule: still one tensor, at this dtype.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert weight_quant(model.lm_head) == FORMATS[-1][0]
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 6))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == DTYPES[dtype] and torch.isfinite(logits).all()


# --------------------------------------------------------------------------- stage + plan


def test_quantize_stage_writes_layers_and_summary(tmp_path):
    from mlxbuild.cache import Cache
    from mlxbuild.stages import quantize as stage
    from mlxbuild.stages import weights
    from mlxbuild.steps import QuantizeParams, WeightsParams

    cache = Cache(tmp_path / "cache")
    load = {"synthetic": {"architecture": "qwen3", "seed": 0, "config": CONFIG}}
    with cache.writing("weights", "w" * 64) as out:
        weights.run(WeightsParams(load=load, dtype="fp32"), cache, out)
    scheme = {"linear": affine(4), "embedding": affine(4),
              "rules": [rule(match="lm_head", bits=8, group_size="per_channel"), rule(blocks=[0], bits=8)]}
    with cache.writing("quantize", "q" * 64) as out:
        stage.run(QuantizeParams(weights="w" * 64, dtype="fp32", scheme=scheme, label="t mixed"), cache, out)
    entry = cache.path("quantize", "q" * 64)
    layers = json.loads((entry / "layers.json").read_text())
    summary = json.loads((entry / "summary.json").read_text())
    assert layers["model.layers.0.mlp.up_proj"]["bits"] == 8 and layers["model.layers.1.mlp.up_proj"]["bits"] == 4
    assert summary == {"layers": 23, "counts": {"affine-4": 15, "affine-8": 8},
                       "untied": {"lm_head": "model.embed_tokens"}}
    bad = {**scheme, "rules": [rule(match="nothing", bits=8)]}
    with pytest.raises(BuildError, match=r"^t mixed: quantization rules\[0\] \(match 'nothing'\) matches no layer"):
        with cache.writing("quantize", "b" * 64) as out:
            stage.run(QuantizeParams(weights="w" * 64, dtype="fp32", scheme=bad, label="t mixed"), cache, out)
    assert not cache.has("quantize", "b" * 64)


def test_plan_hands_the_quantize_entry_to_package(tmp_path):
    from mlxbuild.fingerprint import FileHasher
    from mlxbuild.plan import Plan, plan_manifest

    m = load_manifest(MIXED_MANIFEST)
    plan = Plan()
    packages = plan_manifest(m, plan, FileHasher(tmp_path / "hashes.json"), tmp_path / "artifacts")
    for name in packages:
        step = plan.steps[name]
        quant = plan.steps[next(d for d in step.deps if d.startswith("quantize:"))]
        assert step.params.quantize == quant.key == step.params.record["keys"]["quantize"]
        assert step.params.record["quantization"]["rules"]
        verify = plan.steps[next(d for d in step.deps if d.startswith("verify:"))]
        scheme = step.params.record["quantization"]
        assert verify.params.tolerance == tolerance(m.model.dtype, scheme)


# --------------------------------------------------------------------------- end to end


def _doit() -> list[str]:
    script = Path(sys.executable).with_name("doit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "doit"]


def _build(root: Path, targets: list[str], env) -> dict:
    text = MIXED_MANIFEST.read_text()
    m = parse_manifest(text)
    for t in m.targets:
        if t.name not in targets:  # drop the other targets' lines
            block = next(b for b in text.split("  - name: ")[1:] if b.startswith(t.name + "\n"))
            text = text.replace("  - name: " + block, "")
    (root / "manifests").mkdir(parents=True)
    (root / "manifests" / "m.yaml").write_text(text)
    shutil.copytree(REPO / "schema", root / "schema")
    p = subprocess.run(_doit() + ["build", "manifests/m.yaml"], cwd=root, capture_output=True, text=True,
                       timeout=900, env=env(MLXBUILD_CACHE=root / "cache", MLXBUILD_ARTIFACTS=root / "artifacts"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = root / "artifacts" / m.name / m.version
    return {t: (out / f"{m.name}-{t}.pte", json.loads((out / f"{m.name}-{t}.json").read_text()))
            for t in targets}


def _mlx_quant_nodes(pte: Path) -> Counter:
    import mlx_runtime

    program = mlx_runtime.load(pte)
    found: Counter = Counter()
    for graph in program.method("forward").delegates:
        for chain in graph.chains:
            for ins in chain.instructions or []:
                name = graph._names.get(int(ins.opType))
                if name in ("QuantizedMatmulNode", "DequantizeNode"):
                    op = ins.op
                    found[(name, int(op.bits), int(op.groupSize), op.mode.decode())] += 1
    return found


def test_mixed_build_mlx_end_to_end(tmp_path, subprocess_env):
    (pte, rec), = _build(tmp_path, ["mlx-mixed"], subprocess_env).values()
    assert rec["verification"]["passed"] and rec["verification"]["executed"]
    assert rec["verification"]["max_rel_error"] <= rec["verification"]["tolerance"]["max_rel_error"]
    assert [(r.get("match"), r.get("blocks")) for r in rec["quantization"]["rules"]] == \
        [("lm_head", None), (None, [0, -1]), ("*.mlp.*", [1])]
    layers = rec["layer_quantization"]["layers"]
    assert layers["lm_head"] == {**affine(8, "per_channel"), "rule": "rules[0]",
                                 "untied_from": "model.embed_tokens"}
    assert layers["model.embed_tokens"] == {**affine(4), "rule": "embedding"}
    for b, want in ((0, affine(8)), (2, affine(8)), (1, affine(4))):
        assert {k: v for k, v in layers[f"model.layers.{b}.self_attn.q_proj"].items() if k != "rule"} == want
    assert layers["model.layers.1.mlp.down_proj"] == {"format": "nvfp4", "group_size": 16, "rule": "rules[2]"}
    assert rec["layer_quantization"]["summary"]["counts"] == {"affine-4": 5, "affine-8": 15, "nvfp4": 3}
    # The lowered MLX program computes with exactly those quantizations: 14 block linears at
    # 8-bit/32, lm_head 8-bit per channel (group = hidden 64), the middle block's attention at
    # 4-bit, its MLP in nvfp4, and the embedding gathered then dequantized at 4-bit.
    assert _mlx_quant_nodes(pte) == Counter({
        ("QuantizedMatmulNode", 8, 32, "affine"): 14, ("QuantizedMatmulNode", 8, 64, "affine"): 1,
        ("QuantizedMatmulNode", 4, 32, "affine"): 4, ("QuantizedMatmulNode", 4, 16, "nvfp4"): 3,
        ("DequantizeNode", 4, 32, "affine"): 1})


@pytest.mark.slow
def test_mixed_build_xnnpack_end_to_end(tmp_path, subprocess_env):
    (pte, rec), = _build(tmp_path, ["xnnpack-mixed"], subprocess_env).values()
    assert rec["verification"]["passed"] and rec["verification"]["executed"]
    layers = rec["layer_quantization"]["layers"]
    assert layers["model.layers.2.mlp.up_proj"]["bits"] == 8
    assert layers["model.layers.1.mlp.up_proj"]["bits"] == 4
    assert layers["model.layers.1.self_attn.o_proj"]["format"] == "none"
    assert rec["layer_quantization"]["summary"]["counts"] == {
        "affine-4-int8_dynamic": 7, "affine-8": 1, "affine-8-int8_dynamic": 14, "none": 1}
