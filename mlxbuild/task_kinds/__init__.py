"""Task kinds: what an artifact *is* for a task -- its methods, their example inputs
and dynamic dims, the constant methods it carries, the eager reference it is checked
against and how a verification (or a user's `mlxbuild run`) drives it.

The export, reference, lower and verify stages look up ``get(task)`` and delegate the
task-specific part; the backend-specific part stays in ``delegate/``. A task kind
module provides (torch imported only inside the functions, so planning stays light):

- ``NAME``; ``METHODS``: the methods every program of the kind has (``of_program`` tells
  kinds apart by them; the structural check asks for them);
- ``verify_spec(max_context_length, max_prefill_chunk)``: the plan's verification inputs;
- ``export(params, cache, flavour) -> ({method: ExportedProgram}, info)``;
- ``constant_methods(params, info) -> dict``: what runners read, before the manifest's own;
- ``reference(params, cache, out) -> dict``: the eager model's outputs, written to ``out``;
- ``verify(pte, reference_dir, tol, backend) -> dict``: run the artifact, compare;
- ``prepare_inputs(program, args, tokenizer)``, ``run(program, args) -> dict`` and
  ``describe(result) -> lines``: the greedy loop ``mlxbuild run`` uses, on a program from
  ``common.open_program`` (our MLX runtime or ExecuTorch's).

(``mlxbuild.tasks`` is a different thing: the doit tasks of a plan.)
"""

from __future__ import annotations

from types import ModuleType

from mlxbuild.task_kinds import speech_to_text, text_generation

KINDS: dict[str, ModuleType] = {"text-generation": text_generation, "speech-to-text": speech_to_text}

# transformers model_type -> task, for checkpoints (path / hf) whose task the manifest
# cannot know before the weights are read; anything else is a causal LM.
MODEL_TYPE_TASKS: dict[str, str] = {"whisper": "speech-to-text", "parakeet_tdt": "speech-to-text"}
# transformers auto class per model_type, where it is not AutoModelForCausalLM.
AUTO_CLASSES: dict[str, str] = {"whisper": "AutoModelForSpeechSeq2Seq", "parakeet_tdt": "AutoModelForTDT"}


def get(task: str | None) -> ModuleType:
    """The task kind module (params written before task kinds existed mean text-generation)."""
    try:
        return KINDS[task or "text-generation"]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(KINDS)}") from None


def task_of_model_type(model_type: str | None) -> str:
    return MODEL_TYPE_TASKS.get(model_type or "", "text-generation")


def auto_class_name(model_type: str | None) -> str:
    return AUTO_CLASSES.get(model_type or "", "AutoModelForCausalLM")


def of_program(method_names) -> ModuleType:
    """Which task kind a lowered program belongs to, from its method names."""
    names = set(method_names)
    for kind in KINDS.values():
        if set(kind.METHODS) <= names:
            return kind
    raise ValueError(f"no task kind has the methods {sorted(names)} "
                     f"(known: {', '.join(f'{k}: {list(m.METHODS)}' for k, m in KINDS.items())})")
