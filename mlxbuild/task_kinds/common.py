"""What every task kind's verification and run loop share: opening a `.pte` on a
runtime this host has, capturing the native runtime's log, comparing logits."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


class EtProgram:
    """An ExecuTorch-runtime program behind the same small interface as
    ``delegate.mlx_runtime.Program`` (``method_names``, ``constant_methods``,
    ``run(method, inputs)``, ``reset(method)``), so one loop drives either runtime."""

    def __init__(self, pte: str | os.PathLike):
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  custom SDPA / KV cache kernels
        import executorch.kernels.quantized  # noqa: F401  quantized embedding kernels
        from executorch.runtime import Runtime

        from mlxbuild.pte_inspect import inspect_pte

        self.path = str(pte)
        info = inspect_pte(pte)
        self.constant_methods = info["constant_methods"]
        self.method_names = [m for m in info["methods"] if m not in self.constant_methods]
        self._runtime = Runtime.get()
        self._program = self._runtime.load_program(self.path)
        self._methods: dict = {}

    def method(self, name: str):
        if name not in self._methods:
            self._methods[name] = self._program.load_method(name)
        return self._methods[name]

    def run(self, name: str, inputs: list) -> list:
        import torch

        return list(self.method(name).execute([torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor)
                                               else x for x in inputs]))

    def reset(self, name: str | None = None) -> None:
        # Mutable state (the KV cache) lives in the loaded method: a fresh load is a reset.
        if name is None:
            self._methods.clear()
        else:
            self._methods.pop(name, None)


def open_program(pte: str | os.PathLike, backend=None, data_files=()):
    """The program on the runtime that can run it here: our MLX runtime for a program
    that calls the MLX delegate (or when ``backend`` runs its own), else ExecuTorch's."""
    if backend is None:
        from mlxbuild.pte_inspect import delegated_backends, inspect_pte

        use_mlx = "MLXBackend" in delegated_backends(inspect_pte(pte))
    else:
        use_mlx = hasattr(backend, "load_method")
    if use_mlx:
        from delegate import mlx_runtime

        return mlx_runtime.load(pte, data_files)
    return EtProgram(pte)


def as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def compare(got: np.ndarray, ref: np.ndarray, tol: dict) -> dict:
    """Logit rows against the reference: error relative to the largest reference logit,
    and top-1 agreement where the reference's winner is clear."""
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
    passed = rel <= tol["max_rel_error"] and decisive_agree >= tol["min_top1_agreement"]
    reason = "" if passed else (
        f"max abs error {err:.3g} ({rel:.3g} of the largest logit, allowed {tol['max_rel_error']:.3g}), "
        f"top-1 agreement {agree:.2%} ({decisive_agree:.2%} where decisive)")
    return {"passed": passed, "reason": reason, "executed": True, "max_abs_error": err,
            "max_rel_error": rel, "top1_agreement": agree, "top1_agreement_decisive": decisive_agree,
            "positions": int(ref.shape[0]), "tolerance": tol}


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


@contextlib.contextmanager
def native_stderr_captured():
    """The ExecuTorch runtime logs from C++ straight to fd 2 (CPU probing and the like);
    keep it, and show it only when running the program fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        log = {"text": ""}
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            log["text"] = sink.read().decode(errors="replace")


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
