"""Model knowledge, below the stages: the one home of the families' vocabulary, and
dispatch by name to one module per task kind (in the spirit of mlx-lm's
``mlx_lm/models/<arch>.py`` and ``utils._get_classes``).

This table imports neither torch nor any family module: the manifest validates
against it and the planner keys steps from it. The family modules below it import
no backend and no stage; a stage hands them what they need (the loaded, quantized
model; the backend's export flavour; a program opened on a runtime).

A task kind module provides (torch imported inside the functions):

- ``NAME``; ``METHODS``: the methods every program of the kind has (``of_program`` tells
  kinds apart by them; the structural check asks for them);
- ``USES_FLAVOUR_ATTENTION``: whether the model is loaded with the flavour's attention;
- ``verify_spec(max_context_length, max_prefill_chunk)``: the plan's verification inputs;
- ``export(model, params, flavour) -> ({method: ExportedProgram}, info)``;
- ``constant_methods(params, info) -> dict``: what runners read, before the manifest's own;
- ``reference(model, params, out) -> dict``: the eager model's outputs, written to ``out``;
- ``verify(program, reference_dir, tol) -> dict``: drive the artifact, compare;
- ``prepare_inputs(program, args, tokenizer)``, ``run(program, args) -> dict`` and
  ``describe(result) -> lines``: the greedy loop ``mlxbuild run`` uses.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Architecture:
    name: str  # as a manifest's synthetic source names it
    model_type: str  # transformers' config model_type
    task: str
    auto_class: str = "AutoModelForCausalLM"
    flavours: tuple[str, ...] | None = None  # export flavours it builds with (None: all)
    # backend -> why this family cannot be built for it (a manifest naming one is refused)
    refused: tuple[tuple[str, str], ...] = ()


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("qwen3", "qwen3", "text-generation"),
    Architecture("llama", "llama", "text-generation"),
    Architecture("gemma3", "gemma3_text", "text-generation"),
    Architecture("qwen3_moe", "qwen3_moe", "text-generation"),
    # Qwen3.5's text decoder: gated delta net layers with a recurrent state (gated_delta.py)
    Architecture("qwen3_5", "qwen3_5_text", "text-generation", refused=(
        ("coreml", "ExecuTorch 1.5.1's Core ML lowering fails on the recurrence's dynamic-length "
                   "state update (a SymInt placeholder: 'Placeholder val must be a tensor')"),
        ("vulkan", "ExecuTorch 1.5.1's Vulkan partitioner drops the recurrent states from the "
                   "program's buffers (SpecViolationError: buffer output does not point to a buffer)"),
        ("cuda", "ExecuTorch's CUDA backend has no kernel for the gated delta recurrence "
                 "(llama::gated_delta_rule is a CPU kernel)"))),
    Architecture("whisper", "whisper", "speech-to-text", "AutoModelForSpeechSeq2Seq"),
    Architecture("parakeet", "parakeet_tdt", "speech-to-text", "AutoModelForTDT", flavours=("mlx",)),
    # Voxtral Realtime: a causal audio encoder streamed in 80 ms chunks (voxtral_realtime.py)
    Architecture("voxtral_realtime", "voxtral_realtime", "streaming-speech-to-text", "AutoModelForSpeechSeq2Seq",
                 refused=(("vulkan", "ExecuTorch 1.5.1's Vulkan SDPA fusion asserts on the encoder's "
                                     "sliding-window ring cache (llama::update_cache_with_indices): "
                                     "AssertionError in FusePatternsPass"),)),
    # Voxtral: a Whisper-style audio encoder feeding a Llama decoder (multimodal.py, voxtral.py)
    Architecture("voxtral", "voxtral", "multimodal-text-to-text", "AutoModelForSpeechSeq2Seq"),
    # LLaVA: a CLIP vision tower feeding a Llama decoder (multimodal.py, llava.py)
    Architecture("llava", "llava", "multimodal-text-to-text", "AutoModelForImageTextToText", refused=(
        ("coreml", "coremltools 9 has no uint8 tensor input, and the vision_encoder takes the runner's "
                   "uint8 image (KeyError: torch.uint8 converting it)"),)),
)}
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}

# task -> the module of its kind, and the family modules a kind dispatches to by the
# checkpoint's model_type (a cache key covers all of them: mlxbuild.fingerprint).
TASKS: dict[str, str] = {"text-generation": "text_generation", "speech-to-text": "speech_to_text",
                         # one family so far: the task kind is its module
                         "streaming-speech-to-text": "voxtral_realtime",
                         "multimodal-text-to-text": "multimodal"}
TASK_FAMILIES: dict[str, tuple[str, ...]] = {"speech-to-text": ("whisper", "parakeet"),
                                             "multimodal-text-to-text": ("voxtral", "llava")}
DEFAULT_TASK = "text-generation"


def get(task: str | None) -> ModuleType:
    """The task kind module."""
    task = task or DEFAULT_TASK
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return importlib.import_module(f"mlxbuild.families.{TASKS[task]}")


def modules_of(task: str | None) -> tuple[str, ...]:
    """The dotted names of the modules that decide a task's export and verification."""
    task = task or DEFAULT_TASK
    return tuple(f"mlxbuild.families.{m}" for m in (TASKS[task], *TASK_FAMILIES.get(task, ())))


def task_of_architecture(architecture: str) -> str:
    return ARCHITECTURES[architecture].task


def model_type_of(architecture: str) -> str:
    return ARCHITECTURES[architecture].model_type


def task_of_model_type(model_type: str | None) -> str:
    """The task of a checkpoint (path / hf) read from its config; anything unknown is a causal LM."""
    arch = _BY_MODEL_TYPE.get(model_type or "")
    return arch.task if arch else DEFAULT_TASK


def auto_class_name(model_type: str | None) -> str:
    arch = _BY_MODEL_TYPE.get(model_type or "")
    return arch.auto_class if arch else "AutoModelForCausalLM"


def flavours_of_model_type(model_type: str | None) -> tuple[str, ...] | None:
    arch = _BY_MODEL_TYPE.get(model_type or "")
    return arch.flavours if arch else None


def refusal(architecture: str, backend: str) -> str | None:
    """Why ``architecture`` cannot be built for ``backend`` (None: it can)."""
    arch = ARCHITECTURES.get(architecture)
    return dict(arch.refused).get(backend) if arch else None


def family_of(task: str, family_modules, model_type: str):
    """The family module of ``family_modules`` (a task kind's) that handles ``model_type``."""
    from mlxbuild.errors import BuildError

    for fam in family_modules:
        if model_type in model_types_of(fam.NAME):
            return fam
    known = ", ".join(t for fam in family_modules for t in model_types_of(fam.NAME))
    raise BuildError(f"{task}: model_type {model_type!r} is not supported (supported: {known})")


def model_types_of(family: str) -> tuple[str, ...]:
    """The transformers model_types a family module (``whisper``) handles."""
    return tuple(a.model_type for a in ARCHITECTURES.values() if a.name == family)


def of_program(method_names) -> ModuleType:
    """Which task kind a lowered program belongs to, from its method names."""
    names = set(method_names)
    for task in TASKS:
        kind = get(task)
        if set(kind.METHODS) <= names:
            return kind
    raise ValueError(f"no task kind has the methods {sorted(names)} "
                     f"(known: {', '.join(f'{t}: {list(get(t).METHODS)}' for t in TASKS)})")
