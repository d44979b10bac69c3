"""What each ExecuTorch backend can build, as data.

This table is the single source of truth used by manifest validation
(:func:`check`, :func:`options_model`) and by the README (:func:`render_markdown`).
It must stay cheap to import: no torch, no executorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

__all__ = [
    "ALL_BACKENDS",
    "DTYPES",
    "SUPPORTED_BACKENDS",
    "BackendCapabilities",
    "LayerSupport",
    "CAPABILITIES",
    "check",
    "get",
    "options_model",
    "render_markdown",
]

DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16")
ALL_BACKENDS: tuple[str, ...] = ("mlx", "xnnpack", "portable", "coreml", "vulkan", "cuda")
LAYERS: tuple[str, ...] = ("linear", "embedding")


# --------------------------------------------------------------------------- options


class BackendOptions(BaseModel):
    """Base for per-backend ``targets[].options`` models (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid")

    def dtype_problem(self, dtype: str) -> tuple[str, str] | None:
        """(option, why) when an option cannot serve a model of ``dtype``; None when all can."""
        return None


class MlxOptions(BackendOptions):
    """Options for the MLX delegate."""

    kv_cache: Literal["static", "turboquant"] = Field(
        "static", description="turboquant: ExecuTorch's TurboQuant KV cache on the full-attention layers "
        "(keys and values rotated, 4-bit codebook indices plus a norm per vector: 0.26x the bytes of a "
        "bf16 cache at head_dim 128); bf16 models, head_dim a multiple of 64")

    def dtype_problem(self, dtype: str) -> tuple[str, str] | None:
        if self.kv_cache == "turboquant" and dtype != "bf16":
            return "kv_cache", (f"turboquant needs a bf16 model (ExecuTorch's TurboQuant cache keeps its "
                                f"rotation, boundaries and norms in bf16); this target is {dtype}")
        return None


EXTERNAL_WEIGHTS = ("write the weights to a .ptd beside the .pte (ExecuTorch's external constants: "
                    "the app loads both; the program stays small and the weights can be shared or "
                    "updated apart from it)")


class XnnpackOptions(BackendOptions):
    """Options for the XNNPACK delegate."""

    external_weights: bool = Field(False, description=EXTERNAL_WEIGHTS)


class PortableOptions(BackendOptions):
    """Options for the portable (no delegate) backend."""

    external_weights: bool = Field(False, description=EXTERNAL_WEIGHTS)


# Core ML deployment targets (coremltools' ``ct.target`` names; the macOS names are
# aliases of the iOS release with the same Core ML specification version).
COREML_TARGETS: tuple[str, ...] = (
    "iOS15", "iOS16", "iOS17", "iOS18", "iOS26",
    "macOS12", "macOS13", "macOS14", "macOS15", "macOS26",
)


class CoremlOptions(BackendOptions):
    """Options for the Core ML delegate (``CoreMLBackend.generate_compile_specs``)."""

    compute_units: Literal["cpu_only", "cpu_and_gpu", "cpu_and_ne", "all"] = Field(
        "cpu_only", description="where Core ML may run the model (ExecuTorch's LLM export default: "
        "cpu_only, which loads fastest and decodes fastest on phones)")
    precision: Literal["fp16", "fp32"] = Field(
        "fp16", description="Core ML compute precision (fp16 halves float32 activations on device)")
    minimum_deployment_target: Literal[COREML_TARGETS] = Field(  # type: ignore[valid-type]
        "iOS18", description="oldest OS the model must load on; quantized weights need iOS18/macOS15")
    model_type: Literal["model", "compiled_model"] = Field(
        "model", description="ship the .mlpackage (compiled on device at first load) or the compiled "
        ".mlmodelc (compiling needs macOS: Core ML's compiler exists only there)")


class VulkanOptions(BackendOptions):
    """Options for the Vulkan delegate (``VulkanPartitioner(compile_options, operator_blocklist)``)."""

    force_fp16: bool = Field(False, description="run float32 tensors as float16 on the GPU")
    texture_limits: tuple[PositiveInt, PositiveInt, PositiveInt] | None = Field(
        None, description="largest 3D texture extents [x, y, z] of the target GPU "
        "(default 16384, 16384, 2048); bigger tensors use buffers or stay outside the delegate")
    small_texture_limits: bool = Field(
        False, description="use 2048 for every texture extent (the Vulkan guaranteed minimum)")
    buffer_limit: PositiveInt | None = Field(
        None, description="largest buffer in elements (default 128 Mi); bigger tensors stay outside")
    require_dynamic_shapes: bool = Field(
        True, description="delegate only ops that can resize, so the prefill length can vary "
        "(ExecuTorch's LLM export sets this with dynamic shapes)")
    downcast_64_bit: bool = Field(True, description="store int64/float64 tensors as 32-bit on the GPU")
    @field_validator("texture_limits", mode="before")
    @classmethod
    def three_extents(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)) and len(v) != 3:
            raise ValueError(f"expected 3 extents [x, y, z], got {len(v)}")
        return v

    skip_ops: list[str] = Field(
        default_factory=list, description="edge op names to keep out of the delegate, "
        "e.g. aten.embedding.default")


class CudaOptions(BackendOptions):
    """Options for the CUDA delegate (AOTInductor; ``CudaPartitioner`` compile specs)."""

    device: str = Field("cuda:0", pattern=r"^cuda(:\d+)?$",
                        description="the device the delegate's tensors live on")
    # ExecuTorch's CUDA runtime ships only a few ATen fallbacks (int4 mm, sort, randint): with
    # autotuning off Inductor calls cuBLAS for every matmul (aoti_torch_cuda_mm_out), which the
    # backend refuses; on, it emits Triton GEMM templates, as ExecuTorch's own exports do.
    max_autotune: bool = Field(True, description="let Inductor generate and benchmark Triton GEMM kernels "
                               "while lowering (off: cuBLAS calls, which ExecuTorch's CUDA runtime lacks)")
    triton_kernels: bool | None = Field(
        None, description="replace attention with ExecuTorch's Triton SDPA kernels (bf16 only); "
        "default: on for bf16 programs, off otherwise (attention then compiles as matmuls)")
    low_memory_mode: bool = Field(False, description="compile one layer's weights at a time on the GPU")


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class LayerSupport:
    """Quantization formats a backend accepts for one layer kind.

    ``format: none`` (unquantized) is always accepted.
    """

    affine_bits: tuple[int, ...] = ()  # bits allowed with format 'affine'; () = no affine
    nvfp4: bool = False
    cuda_int4: bool = False  # torchao's tinygemm int4 layout (ExecuTorch's CUDA backend)
    int8_dynamic: bool = False  # int8 dynamic activation quantization (linear only)
    weight_only: bool = True  # affine without dynamic activations
    nvfp4_dtypes: tuple[str, ...] = DTYPES
    int8_dynamic_dtypes: tuple[str, ...] = DTYPES
    per_channel_bits: tuple[int, ...] = ()  # affine bits that lower only with group_size per_channel
    # Why a format is missing, when it was tried and found not to work: affine (or,
    # with weight_only=False, weight-only affine), the bits not in affine_bits, nvfp4,
    # and int8 dynamic activations.
    unsupported_because: str = ""
    bits_unsupported_because: str = ""
    nvfp4_unsupported_because: str = ""
    int8_dynamic_unsupported_because: str = ""
    note: str = ""

    def formats(self) -> tuple[str, ...]:
        out = ["none"]
        if self.affine_bits:
            out.append("affine")
        if self.nvfp4:
            out.append("nvfp4")
        if self.cuda_int4:
            out.append("cuda_int4")
        return tuple(out)

    def describe(self) -> str:
        parts = ["none"]
        bits = "/".join(str(b) for b in self.affine_bits)
        if self.affine_bits and self.weight_only:
            parts.append(f"affine {bits}-bit weight-only")
        if self.int8_dynamic:
            da_bits = "/".join(str(b) for b in self.affine_bits if b in (4, 8))
            parts.append(f"affine {da_bits}-bit with int8_dynamic activations"
                         + _only(self.int8_dynamic_dtypes))
        if self.nvfp4:
            parts.append("nvfp4" + _only(self.nvfp4_dtypes))
        if self.cuda_int4:
            parts.append("cuda_int4 (bf16 only)")
        text = ", ".join(parts)
        if self.per_channel_bits:
            text += (f" ({'/'.join(str(b) for b in self.per_channel_bits)}-bit: "
                     "group_size per_channel only)")
        if self.note:
            text += f" — {self.note}"
        return text


def _only(dtypes: tuple[str, ...]) -> str:
    return "" if dtypes == DTYPES else f" ({', '.join(dtypes)} only)"


@dataclass(frozen=True)
class BackendCapabilities:
    name: str
    supported: bool
    dtypes: tuple[str, ...] = ()
    linear: LayerSupport = field(default_factory=LayerSupport)
    embedding: LayerSupport = field(default_factory=LayerSupport)
    options: type[BackendOptions] = BackendOptions
    dtypes_unsupported_because: str = ""  # why the missing dtypes are missing
    status: str = "supported"  # what the README's Status column says
    # Embedding bits refused when the scheme's linears are quantized to these bits as
    # well, and why (a constraint between the two layer kinds of one scheme).
    packed_together: tuple[int, ...] = ()
    packed_together_because: str = ""
    notes: str = ""

    def layer(self, kind: str) -> LayerSupport:
        return self.linear if kind == "linear" else self.embedding


# What the CUDA backend was run with on an H100 (benchmarks/cuda_on_device.sh): its own int4
# layout for linears; other layouts are not among its runtime's kernels.
_CUDA_LINEAR = ("ExecuTorch's CUDA runtime has kernels for its own int4 layout only: use format "
                "cuda_int4")
_CUDA_EMBEDDING = "quantized CUDA embeddings were not built on a GPU by mlxbuild (only linears, as cuda_int4)"
CUDA_INT4_ONLY = ("cuda_int4 is torchao's tinygemm tile-packed int4 layout, which only ExecuTorch's "
                  "CUDA backend runs")

CAPABILITIES: dict[str, BackendCapabilities] = {
    "mlx": BackendCapabilities(
        name="mlx",
        supported=True,
        dtypes=("fp32", "fp16", "bf16"),
        linear=LayerSupport(affine_bits=(2, 4, 8), nvfp4=True),
        embedding=LayerSupport(affine_bits=(2, 4, 8), nvfp4=True),
        options=MlxOptions,
        notes="Apple MLX delegate; weight-only quantization lowered to MLX quantized kernels.",
    ),
    "xnnpack": BackendCapabilities(
        name="xnnpack",
        supported=True,
        dtypes=("fp32", "fp16"),
        # Weight-only linear lowers but computes wrong logits, and 8da fails to
        # compile in XNNPACK at fp16 (both found by verification with executorch 1.5.1).
        linear=LayerSupport(
            affine_bits=(4, 8), int8_dynamic=True, weight_only=False, int8_dynamic_dtypes=("fp32",),
            # "Only 4b group quantization is supported" when lowering 8-bit groups.
            per_channel_bits=(8,),
            unsupported_because="its weight-only linear lowering gives wrong logits in executorch 1.5.1",
        ),
        embedding=LayerSupport(
            affine_bits=(2, 4, 8), note="quantized embedding kernels run as portable ops"
        ),
        options=XnnpackOptions,
        notes="CPU delegate; bf16 is not supported by XNNPACK.",
    ),
    "portable": BackendCapabilities(
        name="portable",
        supported=True,
        dtypes=("fp32", "fp16", "bf16"),
        linear=LayerSupport(
            unsupported_because="the portable runtime rejects torchao's quantized linear (error 0x12)",
        ),
        embedding=LayerSupport(affine_bits=(2, 4, 8)),
        options=PortableOptions,
        notes="No delegate: reference portable/quantized kernels (slow, maximally compatible).",
    ),
    # Core ML and Vulkan: found by building every format on the tiny Qwen3 (tests/test_matrix.py);
    # structural checks only, so "supported" means lowered with the weights kept quantized
    # inside the delegate. nvfp4 lowers on both but as dequantizing ops over wider weights
    # (the artifact grows past the unquantized one), so it is refused.
    "coreml": BackendCapabilities(
        name="coreml",
        supported=True,
        dtypes=("fp32",),
        linear=LayerSupport(
            affine_bits=(4, 8),
            bits_unsupported_because="Core ML quantizes weights to 4 or 8 bits only",
            nvfp4_unsupported_because="coremltools lowers it as dequantizing ops over wider weights, "
                                      "larger than unquantized",
            int8_dynamic_unsupported_because="coremltools cannot take the int8 activations "
                                             "between partitions",
        ),
        embedding=LayerSupport(
            affine_bits=(4, 8),
            bits_unsupported_because="Core ML quantizes weights to 4 or 8 bits only",
            nvfp4_unsupported_because="coremltools lowers it as dequantizing ops over wider weights, "
                                      "larger than unquantized",
        ),
        options=CoremlOptions,
        status="supported (verified structurally)",
        dtypes_unsupported_because="coremltools converts neither bf16 tensors nor this fp16 graph, "
                                   "which mixes fp16 and fp32 operands; use fp32 with options.precision: "
                                   "fp16 to compute in fp16 on device",
        notes="Apple Core ML (CPU, GPU, Neural Engine); lowered on any host, runs on Apple "
              "platforms only, so verified structurally (delegate present, model readable, "
              "op coverage; not executed). The KV-cache writes run as portable kernels.",
    ),
    "vulkan": BackendCapabilities(
        name="vulkan",
        supported=True,
        dtypes=("fp32", "fp16"),
        linear=LayerSupport(
            affine_bits=(2, 4, 8), int8_dynamic=True,
            nvfp4_unsupported_because="the Vulkan delegate lowers it as dequantizing ops over wider "
                                      "weights, larger than unquantized",
            note="2-bit weights are stored as 4-bit",
        ),
        embedding=LayerSupport(
            affine_bits=(2, 4, 8),
            nvfp4_unsupported_because="the Vulkan delegate lowers it as dequantizing ops over wider "
                                      "weights, larger than unquantized",
        ),
        options=VulkanOptions,
        status="supported (verified structurally)",
        packed_together=(2, 4),
        packed_together_because="the Vulkan delegate repacks a 2/4-bit weight for the linear, and "
                                "with tied embeddings lm_head and the embedding share it, so the "
                                "embedding then fails to lower; quantize embeddings to 8 bits",
        dtypes_unsupported_because="the Vulkan delegate has no bf16 kernels: half the graph "
                                   "stays on portable kernels",
        notes="GPU delegate (Android, desktop); lowered on any host, verified structurally "
              "(delegate present, graph readable, op coverage; not executed). Embeddings and "
              "linears are not both quantized to 2/4 bits (fails with tied embeddings).",
    ),
    "cuda": BackendCapabilities(
        name="cuda",
        supported=True,
        dtypes=("fp32", "bf16"),
        linear=LayerSupport(cuda_int4=True, unsupported_because=_CUDA_LINEAR,
                            note="cuda_int4 lowered and verified on an H100 (torch 2.11.0+cu130)"),
        embedding=LayerSupport(unsupported_because=_CUDA_EMBEDDING),
        options=CudaOptions,
        status="on CUDA hosts only (verified on the GPU)",
        dtypes_unsupported_because="fp16 is untested with ExecuTorch's CUDA backend",
        notes="NVIDIA GPUs through AOTInductor; lowering needs a CUDA build of torch, a GPU and "
              "triton on the build host (refused before any step elsewhere); the shipped kernels are "
              "run on that GPU through torch's AOTI runner. Run on an H100 with torch 2.11.0+cu130: the "
              "tiny Qwen3 at fp32, bf16 and cuda_int4, lowered and verified; not run: fp16, a "
              "real-size model, ExecuTorch's C++ CUDA runtime (docs/backends.md).",
    ),
}

SUPPORTED_BACKENDS: tuple[str, ...] = tuple(b for b in ALL_BACKENDS if CAPABILITIES[b].supported)


def get(backend: str) -> BackendCapabilities:
    """Capabilities of ``backend``; raises ``KeyError`` for an unknown name."""
    try:
        return CAPABILITIES[backend]
    except KeyError:
        raise KeyError(
            f"unknown backend {backend!r}; expected one of: {', '.join(ALL_BACKENDS)}"
        ) from None


def options_model(backend: str) -> type[BackendOptions]:
    """The pydantic model validating ``targets[].options`` for ``backend``."""
    return get(backend).options


def unsupported_message(backend: str) -> str:
    return f"backend {backend!r} is not supported yet (supported: {', '.join(SUPPORTED_BACKENDS)})"


def _int8_dynamic_backends() -> list[str]:
    return [b for b in SUPPORTED_BACKENDS if CAPABILITIES[b].linear.int8_dynamic]


def check(backend: str, scheme: Any, dtype: str) -> list[tuple[str, str]]:
    """Problems with building ``scheme`` at ``dtype`` on ``backend``.

    ``scheme`` is a :class:`mlxbuild.manifest.Scheme` (or anything with optional
    ``linear`` / ``embedding`` attributes carrying ``format``, ``bits`` and
    ``activations``), or ``None`` for no quantization.

    Returns a list of ``(field, message)``; ``field`` is one of ``"backend"``,
    ``"dtype"`` or ``"<layer>.<attr>"`` (e.g. ``"linear.activations"``), relative
    to the scheme for layer issues. An empty list means the combination is fine.
    """
    if backend not in CAPABILITIES:
        return [
            ("backend", f"{backend!r} is not allowed; expected one of: {', '.join(ALL_BACKENDS)}")
        ]
    caps = CAPABILITIES[backend]
    if not caps.supported:
        return [("backend", unsupported_message(backend))]

    issues: list[tuple[str, str]] = []
    if dtype not in caps.dtypes:
        issues.append(
            (
                "dtype",
                f"dtype {dtype!r} is not supported by {backend} "
                + (f"({caps.dtypes_unsupported_because}) " if caps.dtypes_unsupported_because else "")
                + f"(supported: {', '.join(caps.dtypes)})",
            )
        )
    if scheme is None:
        return issues

    issues += _packed_together(caps, scheme)
    for kind in LAYERS:
        layer = getattr(scheme, kind, None)
        if layer is None:
            continue
        fmt = getattr(layer, "format", "none")
        if fmt == "none":
            continue
        sup = caps.layer(kind)
        if fmt == "cuda_int4":
            if not sup.cuda_int4:
                issues.append((f"{kind}.format", f"cuda_int4 is not supported by {backend} for {kind} layers "
                               f"({CUDA_INT4_ONLY}) (supported formats: {', '.join(sup.formats())})"))
            elif dtype != "bf16":
                issues.append((f"{kind}.format", f"cuda_int4 needs dtype bf16 (the tinygemm kernel takes "
                               f"bf16) (manifest dtype is {dtype})"))
            continue
        if (fmt == "nvfp4" and not sup.nvfp4) or (fmt == "affine" and not sup.affine_bits):
            why = sup.nvfp4_unsupported_because if fmt == "nvfp4" else sup.unsupported_because
            issues.append(
                (
                    f"{kind}.format",
                    f"{fmt} is not supported by {backend} for {kind} layers "
                    + (f"({why}) " if why else "")
                    + f"(supported formats: {', '.join(sup.formats())})",
                )
            )
            continue
        if fmt == "nvfp4" and dtype not in sup.nvfp4_dtypes:
            issues.append((f"{kind}.format", f"nvfp4 on {backend} needs dtype "
                           f"{' or '.join(sup.nvfp4_dtypes)} (manifest dtype is {dtype})"))
        dynamic = getattr(layer, "activations", "none") == "int8_dynamic"
        if dynamic and sup.int8_dynamic and dtype not in sup.int8_dynamic_dtypes:
            issues.append((f"{kind}.activations", f"int8_dynamic activations on {backend} need dtype "
                           f"{' or '.join(sup.int8_dynamic_dtypes)} (manifest dtype is {dtype})"))
        if fmt == "affine":
            bits = getattr(layer, "bits", None)
            if bits not in sup.affine_bits:
                issues.append(
                    (
                        f"{kind}.bits",
                        f"{bits}-bit affine is not supported by {backend} for {kind} layers "
                        + (f"({sup.bits_unsupported_because}) " if sup.bits_unsupported_because else "")
                        + f"(supported bits: {', '.join(str(b) for b in sup.affine_bits)})",
                    )
                )
        if fmt == "affine" and not dynamic and not sup.weight_only and not issues:
            issues.append((f"{kind}.activations", f"weight-only affine {kind} is not supported by "
                           f"{backend}: {sup.unsupported_because}; use activations: int8_dynamic"))
        if (not issues and fmt == "affine" and getattr(layer, "bits", None) in sup.per_channel_bits
                and getattr(layer, "group_size", None) != "per_channel"):
            issues.append((f"{kind}.group_size", f"{layer.bits}-bit affine {kind} on {backend} needs "
                           f"group_size per_channel (it lowers only 4-bit groups)"))
        if getattr(layer, "activations", "none") == "int8_dynamic" and not sup.int8_dynamic:
            others = _int8_dynamic_backends()
            where = ", ".join(others) if others else "no backend"
            why = f" ({backend}: {sup.int8_dynamic_unsupported_because})" if sup.int8_dynamic_unsupported_because else ""
            issues.append(
                (f"{kind}.activations", f"int8_dynamic activations are only supported by {where}{why}")
            )
    return issues


def _packed_together(caps: BackendCapabilities, scheme: Any) -> list[tuple[str, str]]:
    def affine_bits(kind: str):
        layer = getattr(scheme, kind, None)
        fmt = getattr(layer, "format", "none") if layer is not None else "none"
        return getattr(layer, "bits", None) if fmt == "affine" else None

    lin, emb = affine_bits("linear"), affine_bits("embedding")
    if lin in caps.packed_together and emb in caps.packed_together:
        return [("embedding.bits", f"{emb}-bit embeddings with {lin}-bit linears are not supported "
                 f"by {caps.name} ({caps.packed_together_because})")]
    return []


def render_markdown() -> str:
    """The capability table as a Markdown table (for the README)."""
    lines = [
        "| Backend | Status | dtypes | linear | embedding | options |",
        "|---|---|---|---|---|---|",
    ]
    for name in ALL_BACKENDS:
        caps = CAPABILITIES[name]
        if not caps.supported:
            lines.append(f"| `{name}` | not supported yet | — | — | — | — |")
            continue
        opts = ", ".join(f"`{k}`" for k in caps.options.model_fields) or "none"
        lines.append(
            f"| `{name}` | {caps.status} | {', '.join(caps.dtypes)} | {caps.linear.describe()} "
            f"| {caps.embedding.describe()} | {opts} |"
        )
    notes = [f"- `{n}`: {CAPABILITIES[n].notes}" for n in ALL_BACKENDS if CAPABILITIES[n].notes]
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines) + "\n"
