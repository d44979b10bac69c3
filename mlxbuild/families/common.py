"""What every family's verification shares: comparing logits and tensors with the
reference, and the constant methods every KV-cached decoder carries."""

from __future__ import annotations

import numpy as np


def as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


# The reference's logits computed once more without its own precision loss: in float32
# arithmetic, and with activations left unquantized where the scheme rounds them to int8 per
# token (same weight codes, same tokens). What that loss costs the eager model itself.
PRECISE_LOGITS = "logits_precise.npy"
# As PyTorch's accuracy checks judge low-precision results (torch._dynamo.utils.same with an
# fp64 reference): an artifact is faithful if it is no further from the precise computation
# than this many times the eager model is. Two implementations that round part by about
# twice what either carries, and that grows with width and depth:
# - bf16: at Llama-3.1-8B's shapes (4,096 wide, 32 layers) the MLX artifact was 0.064 of the
#   largest logit from eager bf16, over the table's 0.04; eager bf16 is 0.012 from float32 at
#   two layers of that width and 0.019 at 32 layers 1,024 wide.
# - int8 dynamic activations: float ops that differ in the last bit before a linear move an
#   activation by a whole int8 step wherever they cross a rounding boundary. Two layers of
#   Llama-3.2-3B's shapes on XNNPACK: rows bit-exact, others 0.02-0.05 off; 28 layers: 0.12.
PRECISE_MULTIPLIER = 2.0
# ... while the reference's own distance is rounding's size: a reference further than this
# from its precise logits (relative to their largest) is wrong, not rounded, and the table
# alone decides (the largest measured, 3B 8da4w: 0.121).
PRECISE_MAX_OWN = 0.25


def compare(got: np.ndarray, ref: np.ndarray, tol: dict, precise: np.ndarray | None = None) -> dict:
    """Logit rows against the reference: error relative to the largest reference logit,
    and top-1 agreement where the reference's winner is clear. With ``precise`` (the
    reference without its rounding, ``PRECISE_LOGITS``), an error over the table's is still
    faithful where the artifact is within ``PRECISE_MULTIPLIER`` times the reference's own
    distance from it."""
    if got.shape != ref.shape:
        return {"passed": False, "reason": f"logits shape {got.shape} != reference {ref.shape}"}
    scale = float(np.abs(ref).max()) or 1.0
    err = float(np.abs(got - ref).max())
    rel = err / scale
    top_ref, top_got = ref.argmax(-1), got.argmax(-1)
    agree = float((top_ref == top_got).mean())
    srt = np.sort(ref, axis=-1)
    # Only positions where the reference's winner is clear must agree.
    decisive = (srt[:, -1] - srt[:, -2]) > 2 * err
    decisive_agree = float((top_ref == top_got)[decisive].mean()) if decisive.any() else 1.0
    allowed = tol["max_rel_error"]
    extra = {}
    if precise is not None and precise.shape == ref.shape:
        p_scale = float(np.abs(precise).max()) or 1.0
        own = float(np.abs(ref - precise).max()) / p_scale
        art = float(np.abs(got - precise).max()) / p_scale
        extra["precise_reference"] = {"reference_rel_error": own, "artifact_rel_error": art,
                                      "multiplier": PRECISE_MULTIPLIER}
        if own <= PRECISE_MAX_OWN and art <= PRECISE_MULTIPLIER * own:
            # the artifact may then part from the reference by both errors together
            allowed = max(allowed, (PRECISE_MULTIPLIER + 1) * own)
    passed = rel <= allowed and decisive_agree >= tol["min_top1_agreement"]
    reason = "" if passed else (
        f"max abs error {err:.3g} ({rel:.3g} of the largest logit, allowed {allowed:.3g}), "
        f"top-1 agreement {agree:.2%} ({decisive_agree:.2%} where decisive)"
        + (f"; {extra['precise_reference']['artifact_rel_error']:.3g} from the precise logits against the "
           f"reference's own {extra['precise_reference']['reference_rel_error']:.3g}" if extra else ""))
    return {"passed": passed, "reason": reason, "executed": True, "max_abs_error": err,
            "max_rel_error": rel, "top1_agreement": agree, "top1_agreement_decisive": decisive_agree,
            "positions": int(ref.shape[0]), "tolerance": tol, "allowed_rel_error": allowed, **extra}


def precise_pass_applies(model) -> bool:
    """Whether the reference also runs precisely: a transformers model behind a static cache
    that rounds (bf16/fp16 weights, or int8 dynamic activations) and whose unquantized weights
    are no larger than its quantized ones, so that their float32 copies stay within the
    quantized model's own size (an unquantized 8B bf16 model would need 32 GB more; its
    targets are held to the table alone)."""
    import torch

    from mlxbuild.families import gated_delta, hf

    if not hf.is_hf(model) or gated_delta.is_hybrid(model):
        return False
    plain = quantized = 0
    dtypes, dynamic = set(), False
    for p in model.parameters():
        if type(p) in (torch.Tensor, torch.nn.Parameter):
            if p.is_floating_point():
                plain += p.numel() * p.element_size()
                dtypes.add(p.dtype)
        else:
            quantized += p.numel()  # a byte per value or less, as torchao unpacks them
            dtypes.add(p.dtype)
            dynamic = dynamic or bool(getattr(p, "activation_quantization", None))
    low = bool(dtypes & {torch.bfloat16, torch.float16}) and not dtypes & {torch.float32}
    return bool(quantized) and plain <= quantized and (low or dynamic)


def _precise(p, widen: bool = True):
    import torch

    from torchao.quantization import IntxUnpackedToInt8Tensor

    if isinstance(p, IntxUnpackedToInt8Tensor):
        # the same codes, float32 scales, the activations as they come; unwidened where a
        # blocked forward widens them (``_blocked``): float32 all the same, as the model's
        # dtype (which its static cache takes) is read from its parameters
        scale = p.scale.to(torch.float32) if widen else p.scale
        p = IntxUnpackedToInt8Tensor(p.qdata, scale, p.zero_point, p.target_dtype,
                                     p.block_size, torch.float32, None)
        return torch.nn.Parameter(p, requires_grad=False)
    f32 = p.detach().to(torch.float32)
    return torch.nn.Parameter(f32, requires_grad=False) if isinstance(p, torch.nn.Parameter) else f32


def precisely(model, fn):
    """``fn()`` with ``model``'s parameters and buffers in float32 and its weights under
    int8 dynamic activations taking them unquantized (quantized weights keep their codes;
    tied ones stay tied); then the original tensors are put back. Quantized linears and
    embeddings run a block of rows at a time meanwhile (``_blocked``): torchao dequantizes a
    whole weight at every call, and in float32 a 151,936-row head's temporaries took the
    reference step of a Qwen3-0.6B-shaped model from 1.8 to 2.6 GB."""
    import torch

    swapped, copies, forwards = [], {}, []
    for module in model.modules():
        blocked = _blocked(module)
        if blocked is not None:
            forwards.append(module)
            module.forward = blocked  # an instance attribute: nn.Module calls it over the class's
        for table in (module._parameters, module._buffers):
            for name, p in list(table.items()):
                if p is None or not p.is_floating_point():
                    continue
                if p.dtype == torch.float32 and not getattr(p, "activation_quantization", None):
                    continue
                if id(p) not in copies:
                    # a blocked module's weight: its blocks widen their scales as they go
                    copies[id(p)] = _precise(p, widen=not (blocked and table is module._parameters
                                                            and name == "weight"))
                swapped.append((table, name, p))
                table[name] = copies[id(p)]
    try:
        return fn()
    finally:
        for module in forwards:
            del module.forward
        for table, name, p in swapped:
            table[name] = p


def leanly(model, fn):
    """``fn()`` with ``model``'s quantized linears and embeddings computing what torchao's
    eager forward computes, bit for bit, with less of its work: torchao dequantizes a whole
    weight at every call, through a copy and a zero-point subtraction (here skipped where
    the zero points are all zero, as symmetric schemes' are: ``x - 0`` is ``x``), and for an
    embedding every row, not just those looked up. The eager reference runs the whole model
    once per decode step, so at Qwen3-0.6B's shapes this was most of its time. Forwards this
    does not reproduce (other block shapes, activation schemes, ``max_norm``) stay torchao's.
    """
    forwards = []
    for module in model.modules():
        lean = _lean(module)
        if lean is not None:
            forwards.append(module)
            module.forward = lean  # an instance attribute: nn.Module calls it over the class's
    try:
        return fn()
    finally:
        for module in forwards:
            del module.forward


def _lean(module):
    import torch
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.intx import intx_unpacked_to_int8_tensor as intx

    w = getattr(module, "weight", None)
    if not isinstance(w, IntxUnpackedToInt8Tensor) or w.dim() != 2 or tuple(w.block_size)[0] != 1:
        return None
    k = w.shape[1]
    group = w.block_size[1]
    zeros = not bool(w.zero_point.any())

    def dequant(index=None):
        # torchao's dequantize_affine, step for step: codes to the output dtype, less the
        # zero point, times the scale (promoting as it promotes), back to the output dtype
        q, s, z = (w.qdata, w.scale, w.zero_point) if index is None else \
            (w.qdata[index], w.scale[index], w.zero_point[index])
        rows = q.shape[0]
        d = q.to(w.dtype).view(rows, k // group, group)
        if not zeros:
            d = d - z.to(w.dtype).view(rows, k // group, 1)
        return (d * s.view(rows, k // group, 1)).view(rows, k).to(w.dtype)

    if isinstance(module, torch.nn.Embedding) and module.max_norm is None:
        return lambda ids: dequant(ids.reshape(-1)).reshape(*ids.shape, k)
    if not isinstance(module, torch.nn.Linear):
        return None
    if w.activation_quantization is None:
        return lambda x: torch.nn.functional.linear(x, dequant(), module.bias)
    if w.activation_quantization == intx.IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN:
        return lambda x: torch.nn.functional.linear(intx._apply_int8_act_asym_per_token_quant_dequant(x),
                                                    dequant(), module.bias)
    return None


PRECISE_BLOCK_BYTES = 32 * 2**20  # of one float32 block of a dequantized weight


def _blocked(module):
    """A forward for an ``nn.Linear`` or ``nn.Embedding`` whose weight is torchao's
    IntxUnpackedToInt8Tensor that dequantizes it in float32 a block of rows at a time (a
    linear; each output column is still one dot product in float32) or only the rows looked
    up (an embedding), through torchao's own dequantization; else ``None``. The scales are
    widened a block at a time too: whole, a Llama-3.1-8B's would take 1 GB in float32."""
    import torch
    from torchao.quantization import IntxUnpackedToInt8Tensor

    w = getattr(module, "weight", None)
    if not isinstance(w, IntxUnpackedToInt8Tensor) or not isinstance(module, (torch.nn.Embedding, torch.nn.Linear)):
        return None

    def rows(index):
        # the same codes with float32 scales (bf16 and fp16 widen exactly), activations as they come
        return IntxUnpackedToInt8Tensor(w.qdata[index], w.scale[index].to(torch.float32), w.zero_point[index],
                                        w.target_dtype, w.block_size, torch.float32, None).dequantize()

    if isinstance(module, torch.nn.Embedding):
        return lambda ids: rows(ids.reshape(-1)).reshape(*ids.shape, w.shape[1])
    step = max(1, PRECISE_BLOCK_BYTES // (4 * w.shape[1]))

    def linear(x):
        out = torch.empty(*x.shape[:-1], w.shape[0], dtype=torch.float32)
        for r in range(0, w.shape[0], step):
            bias = None if module.bias is None else module.bias[r:r + step]
            out[..., r:r + step] = torch.nn.functional.linear(x, rows(slice(r, r + step)), bias)
        return out
    return linear


def compare_tensor(got: np.ndarray, ref: np.ndarray, tol: dict) -> dict:
    """A hidden-state output against the reference, relative to its largest value."""
    if got.shape != ref.shape:
        return {"passed": False, "reason": f"shape {got.shape} != reference {ref.shape}"}
    err = float(np.abs(got.astype(np.float32) - ref).max())
    rel = err / (float(np.abs(ref).max()) or 1.0)
    passed = rel <= tol["max_rel_error"]
    return {"passed": passed, "max_abs_error": err, "max_rel_error": rel,
            "reason": "" if passed else f"max abs error {err:.3g} ({rel:.3g} of the largest value, "
                                        f"allowed {tol['max_rel_error']:.3g})"}


def runtime_failure(e: Exception, log: dict) -> dict:
    tail = " | ".join(log["text"].strip().splitlines()[-3:])
    return {"passed": False, "executed": True,
            "reason": f"runtime error: {e}" + (f" (runtime log: {tail})" if tail else "")}


def kv_cache_methods(params: dict) -> dict:
    """Constant methods every runner of a KV-cached decoder reads (LLM and ASR runners alike)."""
    return {
        "get_max_seq_len": params["max_context_length"],
        "get_max_context_len": params["max_context_length"],
        "get_prefill_chunk_size": params["max_prefill_chunk"],
        "use_kv_cache": True,
        "enable_dynamic_shape": params["max_prefill_chunk"] > 1,
    }


def first_parting(got: list, want: list, margins: list, max_abs_error: float, who: str) -> dict | None:
    """Where a runner's tokens first part from eager greedy's: ``None`` if nowhere in their
    common length; else the check's result. They may part only at a near tie of the eager
    model (a top-1 margin within twice the artifact's largest logit error, the rule
    ``compare`` uses for decisive positions); after that the two continue from different
    tokens and are not compared. ``who`` names the runner in the reason."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            if margins[i] <= 2 * max_abs_error:
                return {"passed": True, "matched": i,
                        "note": f"parted from eager at token {i} of {len(want)}, a near tie "
                                f"(margin {margins[i]:.3g} <= 2 x {max_abs_error:.3g})"}
            return {"passed": False, "matched": i,
                    "reason": f"{who}'s token {i} is {a!r}, eager greedy gives {b!r} "
                              f"(a decisive choice: margin {margins[i]:.3g})"}
    return None


def export_methods(modules: dict, examples: dict, names) -> dict:
    """``torch.export`` (strict) each of ``names`` with its (example kwargs, dynamic shapes)."""
    import torch

    from mlxbuild import progress

    programs = {}
    with torch.no_grad():
        for name in names:
            progress.note(f"torch.export {name}")
            kwargs, dynamic = examples[name]
            programs[name] = torch.export.export(modules[name], (), kwargs, dynamic_shapes=dynamic, strict=True)
    return programs
