"""How much memory each step will take, and the budget a build keeps to.

**The estimate** of a step's peak resident memory comes from the model's size, known at plan
time without loading anything: the parameter count (a synthetic config's shapes, or the
checkpoint's safetensors headers), the step's dtype and the scheme's widths. With W the
weights in the step's dtype, Q the quantized state (torchao's form: affine codes unpacked to
an int8 each plus a scale and a zero point per group; what the quantize step writes and
export, the reference and lowering hold) and A the artifact:

    weights     PROCESS + the largest piece (a layer, or the embeddings): its largest tensor x (4 B
                in fp32 + its cast + 1.5 B of normal_'s work), the rest of it in the dtype; a
                local checkpoint is linked, not loaded
    quantize    PROCESS + LINE(Q) + the largest piece in the step's dtype (round-to-nearest is
                streamed a piece at a time, docs/quantization.md); GPTQ, AWQ and cuda_int4 load
                the whole float model: PROCESS + WHOLE_QUANTIZE(W)
    export, reference, lower
                PROCESS + LINE(Q); lowering for Core ML or Vulkan + Q (ExecuTorch's copy of
                the program for the backend's preprocess)
    baseline    PROCESS + LINE(W) + one sequence's logits and log-probabilities (the float model)
    verify      PROCESS + LINE(A) (through ExecuTorch's runtime: a line of its own, VERIFY_ET_LINE)
    quality     PROCESS + LINE(A) + every sequence's logits, twice
    preprocessor PROCESS              tokenizer, package   0 (no model; a few MB)

LINE(X) = FIXED x min(1, X / X_REF) + SLOPE x X: each step holds a part that grows with the
model and a part that does not (tracing and lowering state, the 151,936-row vocabulary's
working copies), which FIXED scales down for small models so a tiny one is not charged for
it. SLOPE and FIXED are the line through the measured peaks of each step of the MLX 4-bit
builds of Qwen3-0.6B's and Qwen3-1.7B's shapes (``benchmarks/fit_memory_lines.py`` on the
results files named at ``LINE``; X_REF is the 0.6B's size). PROCESS is what a step process holds before its
work (Python, torch, transformers and ExecuTorch imported: 400-540 MB measured). Beyond 1.7B
the line is an extrapolation; the build report puts each step's estimate beside its measured
peak.

**The budget** (``doit build --memory-budget SIZE``, ``MLXBUILD_MEMORY_BUDGET``; default
``DEFAULT_FRACTION`` of physical memory) holds for every step, whatever process runs it: a
step whose own estimate exceeds it fails before it starts, naming both; with ``-n N`` a step
starts only when its estimate and those of the steps running fit in it together, else it
waits. The running steps are noted in a ledger under the cache root, shared by every build
using that cache on this machine (``fcntl`` lock; entries of dead processes are dropped).

Torch-free: the planner calls it on every build.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import time
import uuid
from pathlib import Path

from mlxbuild.errors import BuildError
from mlxbuild.steps import streams  # noqa: F401  (the quantize step's rule, estimated by it)

BUDGET_ENV = "MLXBUILD_MEMORY_BUDGET"
DEFAULT_FRACTION = 0.8  # of physical memory: the rest is the OS's, the doit process's and the page cache's
MB = 2**20
PROCESS = {"export": 490 * MB, "lower": 540 * MB}
PROCESS_DEFAULT = 400 * MB
# (SLOPE, FIXED in MB) per step kind, over Q, W or A (OVER): the line through the peaks of
# the mlx-4w builds of Qwen3-0.6B's shapes (benchmarks/results/step-process-bench-qwen3-0.6b-
# final-2026-12-06.json) and Qwen3-1.7B's (build-compare-1.7b-final-2026-12-06.json), fitted
# by benchmarks/fit_memory_lines.py.
LINE = {"quantize": (1.08, 197), "export": (1.28, 461), "reference": (1.61, 435), "lower": (1.98, 214),
        "baseline": (1.0, 287), "verify": (2.11, 559), "quality": (2.04, 388)}
# Verification through ExecuTorch's own runtime (XNNPACK, portable) holds the program about
# once where MLX's (our runtime over mlx.core, the line above) holds it twice: Llama-3.1-8B's
# XNNPACK 8da4w fp32 verify step measured 6,068 MiB against the MLX line's 11,058
# (benchmarks/results/step-process-bench-llama3.1-8b-xnnpack-8da4w-2026-12-07.json); the
# slope through that one point, the MLX line's FIXED kept.
VERIFY_ET_LINE = (1.07, 559)
VERIFY_ET_BACKENDS = frozenset({"xnnpack", "portable"})
WHOLE_QUANTIZE = (1.27, 1368)  # over W: the whole-model path, measured before streaming
W_REF = 1137 * MB  # Qwen3-0.6B's bf16 weights
Q_REF = 622 * MB   # its 4-bit quantized state
A_REF = 355 * MB   # its 4-bit artifact as artifact_bytes_per_param counts it (the .pte: 320 MB)
# What each step's line is over: W the weights in the step's dtype (the float model), A the
# artifact (verify and quality run the program), else Q the quantized state.
OVER = {"baseline": "W", "verify": "A", "quality": "A"}
REF = {"W": W_REF, "Q": Q_REF, "A": A_REF}
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# ExecuTorch deep-copies each partition's program, weights included, before these backends'
# preprocess (MLX and XNNPACK get a copy that shares them, backends.lowering; CUDA's backend
# shares its own; portable delegates nothing): Llama-3.2-3B's XNNPACK 8da4w fp32 lowering
# measured 11.05 GB with ExecuTorch's copy against 7.77 GB for the MLX line alone.
DEEP_COPY_BACKENDS = frozenset({"coreml", "vulkan"})
INIT_WORK_BYTES = 1.5  # per parameter of a piece, what torch's normal_ holds besides it (measured)
# The evaluation's float32 [L, V] blocks held at once: the baseline writes one sequence's
# log-probabilities as it scores it (its logits and their log-probabilities); the quality
# step holds the artifact's logits and the baseline's log-probabilities of every sequence.
# Their float64 arithmetic goes ``mlxbuild.quality.ROWS`` positions at a time (a few MB).
BASELINE_BLOCKS = 2
QUALITY_BLOCKS = 2


# --------------------------------------------------------------------------- sizes


def model_shape(load: dict) -> dict | None:
    """{"params": count, "piece": the largest piece's parameters} of a weights source, or
    None where it cannot be told before the weights step runs (a hub id not yet cached, a
    ``module:`` factory)."""
    if "synthetic" in load:
        return _synthetic_shape(load["synthetic"].get("config") or {})
    if "path" in load:
        return _checkpoint_shape(Path(load["path"]))
    return None


def _synthetic_shape(c: dict) -> dict | None:
    """A decoder's parameters from its config (embeddings, attention, MLP or experts);
    an encoder-decoder's (Whisper's d_model and layer counts) the same way."""
    h = int(c.get("hidden_size") or c.get("d_model") or 0)
    v = int(c.get("vocab_size") or 0)
    if not h:
        return None
    layers = int(c.get("num_hidden_layers") or 0) or \
        int(c.get("encoder_layers") or 0) + int(c.get("decoder_layers") or 0)
    inter = int(c.get("intermediate_size") or c.get("encoder_ffn_dim") or 4 * h)
    heads = int(c.get("num_attention_heads") or c.get("encoder_attention_heads") or 1)
    hd = int(c.get("head_dim") or h // heads)
    kv = int(c.get("num_key_value_heads") or heads)
    experts = int(c.get("num_experts") or 0)
    mlp = 3 * h * int(c.get("moe_intermediate_size") or inter) * experts if experts else 3 * h * inter
    layer = h * heads * hd * 2 + h * kv * hd * 2 + mlp
    embed = v * h * (1 if c.get("tie_word_embeddings", True) else 2)
    # the pieces: each layer, and the rest (embedding and, untied, the output head); within a
    # piece each module is cast as soon as it is initialized, so an untied head's embedding is
    # already in the target dtype when the head is drawn in fp32 (a layer is counted whole)
    piece = max(embed, layer)
    return {"params": embed + layers * layer, "piece": piece, "tensor": v * h if embed > layer else piece}


def _checkpoint_shape(folder: Path) -> dict | None:
    """Parameter count and largest tensor from the safetensors headers (nothing loaded)."""
    total, largest = 0, 0
    shards = sorted(folder.glob("*.safetensors"))
    for shard in shards:
        try:
            with open(shard, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
        except (OSError, ValueError):
            return None
        for name, info in header.items():
            if name != "__metadata__":
                count = math.prod(info["shape"])
                total += count
                largest = max(largest, count)
    return {"params": total, "piece": largest} if shards else None


def artifact_bytes_per_param(scheme: dict | None, dtype: str) -> float:
    """Bytes per parameter of a lowered program: the base linear rule's width plus a scale
    and a zero point (2 bytes each) per group, or the dtype's width unquantized."""
    q = (scheme or {}).get("linear") or {}
    if not q or q.get("format", "affine") == "none":
        return DTYPE_BYTES[dtype]
    if q.get("format") == "nvfp4":
        return 0.5 + 1 / 16
    bits = int(q.get("bits") or 4)
    group = q.get("group_size") or 32
    return bits / 8 + (0 if group == "per_channel" else 4 / int(group))


def quantized_bytes_per_param(scheme: dict | None, dtype: str) -> float:
    """Bytes per parameter of the quantize step's state, by the base linear rule: affine codes
    unpacked to one int8 each plus a scale (the dtype's width) and an int8 zero point per
    group; nvfp4 two codes a byte and an fp8 scale per 16; unquantized the dtype's width."""
    q = (scheme or {}).get("linear") or {}
    if not q or q.get("format", "affine") == "none":
        return DTYPE_BYTES[dtype]
    if q.get("format") == "nvfp4":
        return 0.5 + 1 / 16
    group = q.get("group_size") or 32
    return 1 + (0 if group == "per_channel" else (DTYPE_BYTES[dtype] + 1) / int(group))


def _line(coefficients: tuple[float, float], x: float, x_ref: int) -> float:
    slope, fixed = coefficients
    return fixed * MB * min(1.0, x / x_ref) + slope * x


# --------------------------------------------------------------------------- estimates


def annotate(plan) -> None:
    """Give every planned step its estimate (``step.memory``, bytes; 0 for light steps). Each
    weights source is measured once (a checkpoint's headers are read once per plan)."""
    shapes: dict[str, dict | None] = {}
    for step in plan.steps.values():
        step.memory = estimate(plan, step, shapes)


def estimate(plan, step, shapes: dict | None = None) -> int:
    kind = str(step.kind)
    if kind in ("package", "tokenizer"):
        return 0  # no model, no torch: a few MB in whatever process runs it
    base = PROCESS.get(kind, PROCESS_DEFAULT)
    weights = _upstream(plan, step, "weights")
    shapes = {} if shapes is None else shapes
    if weights is not None and weights.name not in shapes:
        shapes[weights.name] = model_shape(weights.params.load)
    shape = shapes.get(weights.name) if weights is not None else None
    if kind == "preprocessor" or shape is None:
        return base
    dtype = _dtype(plan, step) or "fp32"
    w = shape["params"] * DTYPE_BYTES[dtype]
    if kind == "weights":
        if "synthetic" not in step.params.load:
            return base
        # the largest tensor initialized in fp32, its cast copy and normal_'s working memory,
        # beside the rest of its piece already in the target dtype
        cast = DTYPE_BYTES[dtype] if dtype != "fp32" else 0
        tensor = shape.get("tensor", shape["piece"])
        return int(base + (shape["piece"] - tensor) * DTYPE_BYTES[dtype] + tensor * (4 + cast + INIT_WORK_BYTES))
    quant = _upstream(plan, step, "quantize")
    scheme = quant.params.scheme if quant else None
    if kind == "quantize" and not streams(scheme):
        return int(base + _line(WHOLE_QUANTIZE, w, W_REF))
    if kind == "quantize" and quantized_bytes_per_param(scheme, dtype) >= DTYPE_BYTES[dtype]:
        return base  # nothing to quantize, so nothing is read
    over = OVER.get(kind, "Q")
    x = {"W": w, "Q": shape["params"] * quantized_bytes_per_param(scheme, dtype),
         "A": shape["params"] * artifact_bytes_per_param(scheme, dtype)}[over]
    extra = shape["piece"] * DTYPE_BYTES[dtype] if kind == "quantize" else \
        _eval_logits(step, plan) if kind in ("baseline", "quality") else 0
    if kind == "lower" and getattr(step.params, "backend", None) in DEEP_COPY_BACKENDS:
        extra = x  # the program's weights copied once more for the backend's preprocess
    line = VERIFY_ET_LINE if kind == "verify" and getattr(step.params, "backend", None) in VERIFY_ET_BACKENDS \
        else LINE[kind]
    return int(base + _line(line, x, REF[over]) + extra)


def _eval_logits(step, plan) -> int:
    base = step if str(step.kind) == "baseline" else _upstream(plan, step, "baseline")
    weights = _upstream(plan, step, "weights")
    vocab = int(((weights.params.load.get("synthetic") or {}).get("config") or {}).get("vocab_size") or 0) \
        if weights is not None else 0
    if base is None or not vocab:
        return 0
    ev = base.params.evaluation
    block = int(ev.get("seq_len", 64)) * vocab * 4
    if str(step.kind) == "baseline":
        return BASELINE_BLOCKS * block
    return QUALITY_BLOCKS * int(ev.get("sequences", 4)) * block


def _upward(plan, step):
    """The step, then the steps it reads, nearest first."""
    seen, todo = set(), [step.name]
    while todo:
        name = todo.pop(0)
        if name not in seen:
            seen.add(name)
            yield plan.steps[name]
            todo.extend(plan.steps[name].deps)


def _upstream(plan, step, kind: str):
    """The nearest step of ``kind`` at or above ``step``."""
    return next((s for s in _upward(plan, step) if str(s.kind) == kind), None)


def _dtype(plan, step) -> str | None:
    return next((s.params.dtype for s in _upward(plan, step) if getattr(s.params, "dtype", None)), None)


# --------------------------------------------------------------------------- the budget


def parse_size(text: str) -> int:
    """``12G``, ``800M``, ``1.5GB``, ``512MiB``, a plain byte count, or ``75%`` of physical memory."""
    t = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", t)
    if m:
        return int(physical_memory() * float(m[1]) / 100)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", t, re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r}: expected a size such as 12G, 800M or 75%")
    return int(float(m[1]) * 1024 ** " KMGT".index((m[2] or " ").upper()))


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budget() -> int:
    """The budget in bytes: MLXBUILD_MEMORY_BUDGET (which --memory-budget sets), else the
    default fraction of physical memory. Raises ValueError for a value that is not a size."""
    value = os.environ.get(BUDGET_ENV, "").strip()
    return parse_size(value) if value else int(DEFAULT_FRACTION * physical_memory())


def shown(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / MB:.0f} MB"


class OverBudget(BuildError):
    """A step whose estimate alone exceeds the budget: it fails before it starts."""


def over_budget(label: str, need: int, limit: int) -> str:
    return (f"{label}: needs an estimated {shown(need)}, over the memory budget of {shown(limit)} "
            f"(--memory-budget or {BUDGET_ENV})")


@contextlib.contextmanager
def reserve(root: Path, need: int, limit: int, label: str, on_wait=None):
    """Hold ``need`` bytes of the budget ``limit`` while the block runs: wait while the steps
    running beside it would take the total over it. Raises OverBudget when ``need`` alone
    exceeds it."""
    if need > limit:
        raise OverBudget(over_budget(label, need, limit))
    if need <= 0:
        yield
        return
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    told = False
    while True:
        with _ledger(root) as ledger:
            running = sum(e["bytes"] for e in ledger.values())
            if running + need <= limit:
                ledger[token] = {"pid": os.getpid(), "bytes": need, "step": label}
                break
        if on_wait is not None and not told:
            on_wait(f"waiting for memory: {shown(running)} of {shown(limit)} held by running steps, "
                    f"this one needs {shown(need)}")
            told = True
        time.sleep(0.2)
    try:
        yield
    finally:
        with _ledger(root) as ledger:
            ledger.pop(token, None)


@contextlib.contextmanager
def _ledger(root: Path):
    """The ledger of running steps, locked for the block; rewritten when it ends."""
    folder = Path(root) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "memory.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = folder / "memory.json"
        try:
            ledger = json.loads(path.read_text())
        except (OSError, ValueError):
            ledger = {}
        ledger = {k: v for k, v in ledger.items() if _alive(v.get("pid"))}
        yield ledger
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ledger))
        os.replace(tmp, path)
    finally:
        os.close(fd)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True
