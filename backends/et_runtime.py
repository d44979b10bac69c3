"""ExecuTorch's own runtime (``executorch.runtime``) behind the small interface our MLX
runtime has (``method_names``, ``constant_methods``, ``run(method, inputs)``,
``reset(method)``, ``input_dtype``), so one loop drives either runtime."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from mlx_runtime import pte as _pte


class EtProgram:
    def __init__(self, path: str | os.PathLike, data_files=()):
        # The LLM artifacts call kernels outside the core library: custom SDPA / KV cache
        # (llama::*) and the quantized embedding (quantized_decomposed::*).
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
        import executorch.kernels.quantized  # noqa: F401
        from executorch.runtime import Runtime

        self.path = str(path)
        self.runs_on = "executorch.runtime"
        self._container, _, _ = _pte.load(path)
        self.constant_methods = _pte.constant_methods(self._container)
        self.method_names = [p.name for p in self._container.execution_plan
                             if p.name not in self.constant_methods]
        self._runtime = Runtime.get()
        data = [str(p) for p in data_files]
        self._data_path = data[0] if data else None
        self._methods: dict = {}

    def method(self, name: str):
        if name not in self._methods:
            # executorch.runtime's Program gives all its host-only methods one set of planned
            # memory arenas (Program.load_method's docstring), and mutable buffers live there:
            # two methods with state (a streaming encoder's convolution states and KV cache, a
            # decoder's KV cache) would overwrite each other's. ExecuTorch's C++ Module, which
            # apps run, plans each method's memory apart; so does this, with a Program per method.
            # (A Program also caches its methods, state and all: a reset loads a new one.)
            program = self._runtime.load_program(self.path, data_path=self._data_path)
            self._methods[name] = (program, program.load_method(name))
        return self._methods[name][1]

    def run(self, name: str, inputs: list) -> list:
        import torch

        return list(self.method(name).execute([x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
                                               for x in inputs]))

    def input_dtype(self, method: str, index: int = 0) -> str | None:
        return _pte.input_dtype(self._container, method, index)

    def reset(self, name: str | None = None) -> None:
        # Mutable state (the KV cache) lives in the loaded method: a fresh load is a reset.
        if name is None:
            self._methods.clear()
        else:
            self._methods.pop(name, None)


def load(path: str | os.PathLike, data_files=()) -> EtProgram:
    """``data_files`` default to the ``.ptd`` of the same name beside the program (how an
    external-weights artifact is published, and how a cache entry holds one). Not
    ``mlx_runtime.program``'s sibling rule: importing the MLX runtime here would put its code
    into the keys of every XNNPACK and portable verification (tests/test_structure.py)."""
    if not data_files:
        beside = Path(path).with_suffix(".ptd")
        data_files = [beside] if beside.is_file() else []
    return EtProgram(path, data_files)


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


def text_llm_generate(pte: str | os.PathLike, tokenizer: str | os.PathLike, prompt: str,
                      data_file: str | os.PathLike | None = None) -> list[str]:
    """Greedy generation by ExecuTorch's C++ ``TextLLMRunner`` (its Python binding), as an
    app runs the artifact: the runner's own chunked prefill, its KV-cache budget
    (``max_new_tokens=-1``: up to the context limit) and its EOS stop. Returns the pieces its
    token callback received. The runner prints the text and its statistics from C++ to
    fds 1 and 2; both are kept out of our output."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    pieces: list[str] = []
    with _stdout_discarded():
        runner = TextLLMRunner(str(pte), str(tokenizer), None if data_file is None else str(data_file))
        runner.generate(prompt, GenerationConfig(echo=False, temperature=0.0, max_new_tokens=-1),
                        token_callback=pieces.append)
    return pieces


@contextlib.contextmanager
def _stdout_discarded():
    """fd 1 to /dev/null: the C++ runners print the text they generate and their statistics."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def multimodal_generate(pte: str | os.PathLike, tokenizer: str | os.PathLike, inputs: list, max_new_tokens: int,
                        data_file: str | os.PathLike | None = None) -> list[str]:
    """Greedy generation by ExecuTorch's C++ ``MultimodalRunner`` (its Python binding), as an
    app runs a multimodal artifact: ``inputs`` in order, each ``("text", str)`` (its
    tokenizer encodes it), ``("audio", features[B, n_bins, n_frames] float32)`` or ``("image",
    [3, H, W] uint8)``, each
    prefilled with one ``text_decoder`` call; then ``max_new_tokens`` greedy tokens or to an
    EOS. Returns the pieces its token callback received; its own printing is kept out."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    import torch
    from executorch.extension.llm.runner import (
        GenerationConfig,
        MultimodalRunner,
        make_audio_input,
        make_image_input,
        make_text_input,
    )

    items = []
    for kind, value in inputs:
        if kind == "text":
            items.append(make_text_input(value))
        elif kind == "audio":
            items.append(make_audio_input(torch.as_tensor(np.asarray(value, dtype=np.float32))))
        elif kind == "image":
            items.append(make_image_input(torch.as_tensor(np.asarray(value, dtype=np.uint8))))
        else:
            raise ValueError(f"the multimodal runner takes text, audio and images, not {kind!r}")
    pieces: list[str] = []
    with _stdout_discarded():
        runner = MultimodalRunner(str(pte), str(tokenizer), None if data_file is None else str(data_file))
        runner.generate(items, GenerationConfig(echo=False, temperature=0.0, max_new_tokens=max_new_tokens),
                        token_callback=pieces.append)
    return pieces


def write_bundled_program(pte: str | os.PathLike, method: str, inputs: list, expected: list) -> bytes:
    """ExecuTorch's bundled program (``.bpte``) over the ``.pte``'s own bytes, with one test
    case of ``method``: a device harness loads it and checks the outputs where it runs."""
    from executorch.devtools import BundledProgram
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
    from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

    case = MethodTestCase(inputs=list(inputs), expected_outputs=list(expected))
    bundled = BundledProgram(None, [MethodTestSuite(method_name=method, test_cases=[case])],
                             pte_file_path=str(pte))
    return serialize_from_bundled_program_to_flatbuffer(bundled)


def run_bundled_program(bpte: str | os.PathLike, method: str, atol: float, rtol: float) -> str:
    """Run a bundled program's test cases of ``method`` with ExecuTorch's own checker; the
    problem in one line, or '' when every output is within ``atol + rtol * |expected|``."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.pybindings.portable_lib import _load_bundled_program_from_buffer

    with open(bpte, "rb") as f:
        bundled = _load_bundled_program_from_buffer(f.read())
    try:
        with native_stderr_captured() as log:
            bundled.verify_result_with_bundled_expected_output(method, 0, rtol, atol)
    except RuntimeError as e:
        tail = " | ".join(log["text"].strip().splitlines()[-2:])
        return f"{e}" + (f" ({tail})" if tail else "")
    return ""


def etrecord_methods(path: str | os.PathLike) -> list[str]:
    """The methods an ETRecord (as the devtools Inspector parses it) records debug handles
    for; raises when the file does not parse."""
    import logging
    import warnings

    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401 - ops its graphs name
    from executorch.devtools.etrecord import parse_etrecord

    # Deserializing the recorded graphs warns per unbacked symbol and per custom op.
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            record = parse_etrecord(str(path))
    finally:
        logging.disable(logging.NOTSET)
    return sorted(record._debug_handle_map or {})
