"""Run (or, where no runtime exists on this host, inspect) a lowered artifact and
compare it with the reference. A failure raises VerificationError and leaves
no cache entry, so the target is checked again on the next build.

Here the artifact meets its runtime: the backend says which runtime runs its
programs (``backends.open_program``) and what must hold of their structure; the task
kind drives the opened program and compares its outputs.
"""

from __future__ import annotations

from pathlib import Path

import backends
from mlxbuild import families
from mlxbuild.errors import VerificationError
from mlxbuild.steps import LowerResult, ReferenceResult, VerifyParams, VerifyResult


def run(params: VerifyParams, cache, out: Path) -> VerifyResult:
    backend = backends.backend(params.backend)
    kind = families.get(params.task)
    lowered = cache.read("lower", params.lower)
    data = LowerResult.data_files(lowered)  # external weights (.ptd)
    if backend.VERIFY == "runtime":
        result = numerical(lowered / "model.pte", cache.read("reference", params.reference),
                           params.tolerance, params.backend, kind, data)
        if result["passed"] and hasattr(backend, "OUTSIDE_OPS"):
            # A runtime that runs any leftover op (the MLX one runs them with torch)
            # proves the numbers, not the partitioning: check that too.
            shape = structural(lowered / "model.pte", params.backend, kind)
            result["structure"] = {k: shape[k] for k in ("passed", "reason", "delegates") if k in shape}
            if not shape["passed"]:
                result.update(passed=False, reason=f"structure: {shape['reason']}")
        if result["passed"] and params.tokenizer:
            args = (lowered / "model.pte", cache.read("tokenizer", params.tokenizer),
                    cache.read("reference", params.reference), result, data)
            result["runner"] = multimodal_runner(kind, *args) if getattr(kind, "RUNNER", None) == "multimodal" \
                else runner(*args)
            if not result["runner"]["passed"]:
                result.update(passed=False, reason=f"runner: {result['runner']['reason']}")
        if result["passed"] and getattr(backend, "LLM_RUNNER", False) and params.task == "text-generation":
            # the bound the comparison applied (the table's, or the float32 reference's)
            tol = dict(params.tolerance, max_rel_error=result.get("allowed_rel_error", params.tolerance["max_rel_error"]))
            result["bundled_program"] = bundled(lowered / "model.pte", cache.read("reference", params.reference),
                                                tol, out, data)
            if not result["bundled_program"]["passed"]:
                result.update(passed=False, reason=f"bundled program: {result['bundled_program']['reason']}")
    else:
        result = structural(lowered / "model.pte", params.backend, kind)
        result["coverage"] = coverage(LowerResult.read(lowered))
    # What was verified is these bytes: publishing and up-to-date checks compare them with
    # the lowered program they are about to trust (mlxbuild.tasks, mlxbuild.artifacts).
    result["artifact_sha256"] = cache.files("lower", params.lower)["model.pte"]["sha256"]
    verified = VerifyResult(**result)
    verified.write(out)
    if not verified.passed:
        raise VerificationError(f"{params.label}: verification failed: {verified.reason}")
    return verified


def coverage(lowered: LowerResult) -> dict:
    """How much of the program the delegate took (op counts from the lowering's
    delegation summary): what a structural check can say in place of numbers."""
    summary = lowered.delegation
    inside = sum(n for m in summary.values() for n in m.get("delegated_ops", {}).values())
    outside = {op: n for m in summary.values() for op, n in m.get("portable_ops", {}).items()
               if op != "alloc"}  # memory planning's buffers, not compute
    total = inside + sum(outside.values())
    return {"delegated_ops": inside, "portable_ops": sum(outside.values()),
            "delegated_fraction": round(inside / total, 4) if total else 0.0,
            "portable": dict(sorted(outside.items()))}


def numerical(pte: Path, reference: Path, tol: dict, backend: str | None = None, kind=None,
              data_files=()) -> dict:
    """Open ``pte`` on its backend's runtime and let the task kind drive and compare it; a
    runtime error is a verification failure (with the native runtime's last log lines)."""
    from backends.et_runtime import native_stderr_captured
    from mlxbuild.families.common import runtime_failure

    kind = kind or families.get(None)
    info = ReferenceResult.read(reference).model_dump(mode="json")
    try:
        with native_stderr_captured() as log:
            program = backends.open_program(pte, backend, data_files)
            result = kind.verify(program, reference, info, tol)
            # Which runtime executed it (the CUDA one runs the shipped kernels through torch).
            result.setdefault("runtime", getattr(program, "runs_on", None))
            return result
    except Exception as e:  # noqa: BLE001 - whatever the runtime raises fails the check
        return runtime_failure(e, log)


def runner(pte: Path, tokenizer_dir: Path, reference: Path, numbers: dict, data_files=()) -> dict:
    """The artifact as an app runs it: ExecuTorch's TextLLMRunner with the tokenizer that
    ships beside it, the family's runner reference prompt, generation to the context limit."""
    import json

    from backends.et_runtime import text_llm_generate

    from mlxbuild.families import text_runner

    if not (reference / text_runner.RUNNER_FILE).is_file():
        return {"passed": True, "skipped": "no runner reference (a sliding-window model: "
                                           "TextLLMRunner budgets it as an all-ring model)"}
    prompt = json.loads((reference / text_runner.RUNNER_FILE).read_text())["prompt"]
    pieces, failed = _pieces("TextLLMRunner", lambda: text_llm_generate(
        pte, tokenizer_dir, prompt, data_files[0] if data_files else None))
    return failed or text_runner.compare_runner(pieces, reference, float(numbers.get("max_abs_error") or 0.0))


def multimodal_runner(kind, pte: Path, tokenizer_dir: Path, reference: Path, numbers: dict, data_files=()) -> dict:
    """A multimodal artifact as an app runs it: ExecuTorch's MultimodalRunner with the
    tokenizer that ships beside it, the task kind's inputs (media, then text)."""
    from backends.et_runtime import multimodal_generate

    given = kind.runner_inputs(reference)
    if given is None:
        return {"passed": True, "skipped": "no runner reference"}
    inputs, new_tokens = given
    pieces, failed = _pieces("MultimodalRunner", lambda: multimodal_generate(
        pte, tokenizer_dir, inputs, new_tokens, data_files[0] if data_files else None))
    return failed or kind.compare_runner(pieces, reference, float(numbers.get("max_abs_error") or 0.0))


def _pieces(who: str, generate):
    """(the pieces a runner binding's callback received, None), or (None, the failed check
    with the native log's last lines): the bindings raise RuntimeError on a failed generation."""
    from backends.et_runtime import native_stderr_captured

    try:
        with native_stderr_captured() as log:
            return generate(), None
    except Exception as e:  # noqa: BLE001 - whatever the runner raises fails the check
        tail = " | ".join(log["text"].strip().splitlines()[-3:])
        return None, {"passed": False, "reason": f"{who} failed: {e}" + (f" ({tail})" if tail else "")}


BUNDLED = "model.bpte"
BUNDLED_DTYPES = ("float32", "float16")
# A bundled program is one flatbuffer holding the program's bytes, and a flatbuffer cannot
# pass 2 GiB (flatbuffers' BuilderSizeError: Llama-3.2-3B's XNNPACK 8da4w .pte is 2.2 GB).
# The test case (a prefill's ids and logits) and the tables take a few MB beside it.
BUNDLED_MAX_PROGRAM = 2**31 - 64 * 2**20


def bundled(pte: Path, reference: Path, tol: dict, out: Path, data_files=()) -> dict:
    """A self-testing program (ExecuTorch's ``.bpte``) with the verification prefill and the
    eager logits, checked here by ExecuTorch's own checker with the bound verification
    applies (the tolerance relative to the largest reference logit, as an absolute
    bound on every logit)."""
    from backends.et_runtime import native_stderr_captured, run_bundled_program, write_bundled_program
    from mlxbuild.families import text_runner

    import torch

    from mlx_runtime import pte as _pte

    if data_files:
        # A bundled program is one self-testing file; ExecuTorch's loader for it takes no
        # external data, so a program whose weights are in a .ptd cannot carry its test.
        return {"passed": True, "skipped": "the weights are in a .ptd, which ExecuTorch's "
                                           "bundled-program loader does not take"}
    if pte.stat().st_size > BUNDLED_MAX_PROGRAM:
        return {"passed": True, "skipped": f"the program ({pte.stat().st_size / 2**30:.2f} GiB) does not "
                                           "fit a bundled program, one flatbuffer of at most 2 GiB "
                                           "(options: {external_weights: true} puts the weights in a .ptd)"}
    dtype = _pte.output_dtype(_pte.load(pte)[0], "forward")
    if dtype not in BUNDLED_DTYPES:
        # ExecuTorch's checker compares any other dtype bit for bit (bundled_program.cpp,
        # tensors_are_close), so eager logits would fail on every device: no .bpte at all
        # rather than one that cannot pass.
        return {"passed": True, "skipped": f"{dtype} logits: ExecuTorch's bundled-program "
                                           "checker has a tolerance only for float32/float16"}
    prompt = ReferenceResult.read(reference).prompt
    inputs, expected = text_runner.bundled_case(reference, prompt)
    atol = float(tol["max_rel_error"]) * (float(expected[0].abs().max()) or 1.0)
    # The checker refuses outputs of another dtype than the expected ones.
    expected = [e.to(getattr(torch, dtype)) for e in expected]
    with native_stderr_captured():
        (out / BUNDLED).write_bytes(write_bundled_program(pte, "forward", inputs, expected))
    problem = run_bundled_program(out / BUNDLED, "forward", atol=atol, rtol=0.0)
    return {"passed": not problem, "reason": problem, "method": "forward", "test_cases": 1,
            "prompt_tokens": prompt, "atol": atol, "rtol": 0.0, "dtype": dtype}


def structural(pte: Path, backend: str, kind=None) -> dict:
    from mlxbuild.pte_inspect import inspect_pte

    try:
        info = inspect_pte(pte)
    except Exception as e:
        return {"passed": False, "executed": False, "reason": f"does not deserialize: {e}"}
    return backends.check_structure(backend, info, (kind or families.get(None)).METHODS)
