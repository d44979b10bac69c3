"""CUDA programs run on the build host's GPU without ExecuTorch's CUDA runtime, which
ExecuTorch's Python wheel does not have.

A CUDA ``.pte`` holds, per method, one ``CudaBackend`` delegate: the AOTInductor shared
library (named data ``<sha256>_so_blob`` in the ``.pte``) and a payload that says where each
of its constants lies in the ``.ptd`` (``ETCUDAFQN3``: the library's key, then per constant
its name, storage key, byte size, ExecuTorch dtype, device, offset, sizes and strides;
``executorch.backends.cuda.cuda_weight_collector.encode_cuda_weight_metadata``). This runtime
does what ExecuTorch's C++ ``CudaBackend::init`` does with them, through torch's own AOTI
container runner: it writes the library out, loads it with ``AOTIModelContainerRunnerCuda``
(the library is built without libtorch linked in: torch's C shims are made global first),
hands it the constants from the ``.ptd`` and calls it with the method's inputs on the GPU.

So the compiled kernels that ship are the ones executed. What is not exercised is
ExecuTorch's C++ CUDA runtime itself (its shims stand in for torch's at run time).

The program's KV cache lives in the library's constants: ``reset`` loads them again.
"""

from __future__ import annotations

import ctypes
import os
import struct
import tempfile
from pathlib import Path

from mlx_runtime import pte as _pte

BACKEND_ID = "CudaBackend"
MAGIC = b"ETCUDAFQN3"
# ExecuTorch ScalarType code -> torch dtype name (the codes CUDA constants use).
_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
           7: "float64", 11: "bool", 15: "bfloat16"}


class CudaRuntimeError(RuntimeError):
    pass


def parse_payload(payload: bytes) -> tuple[str, list[dict]]:
    """The library's named-data key and its constants' layout, from a delegate payload."""
    if not payload.startswith(MAGIC):
        raise CudaRuntimeError(f"not a CUDA weight-metadata payload (starts {payload[:10]!r}, expected {MAGIC!r})")
    pos = len(MAGIC)

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from(fmt, payload, pos)
        pos += struct.calcsize(fmt)
        return values

    def string() -> str:
        nonlocal pos
        (n,) = take("<I")
        pos += n
        return payload[pos - n:pos].decode()

    so_key = string()
    (count,) = take("<I")
    entries = []
    for _ in range(count):
        fqn, storage = string(), string()
        nbytes, dtype, device, offset, ndim = take("<QiiqI")
        sizes, strides = list(take(f"<{ndim}q")), list(take(f"<{ndim}q"))
        entries.append({"fqn": fqn, "storage_key": storage, "nbytes": nbytes, "dtype": dtype,
                        "device": device, "offset": offset, "sizes": sizes, "strides": strides})
    return so_key, entries


class _Container:
    """The ``.pte`` parsed once and mapped once: its segments by index, the named data of the
    file and of its ``.ptd`` files, and each delegate's payload."""

    def __init__(self, path: Path, data_files) -> None:
        from executorch.exir import schema as S

        from mlx_runtime.program import _map, _sibling_data_files, read_ptd

        self.program, _, eh = _pte.load(path)
        self._mv = memoryview(_map(path))
        self._base = eh.segment_base_offset if eh is not None else 0
        self.named = {nd.key: self.segment(nd.segment_index) for nd in self.program.named_data or []}
        for ptd in [Path(p) for p in data_files] or _sibling_data_files(path):
            self.named.update(read_ptd(ptd))
        self._inline = S.DataLocation.INLINE

    def segment(self, index: int) -> memoryview:
        seg = self.program.segments[index]
        return self._mv[self._base + seg.offset: self._base + seg.offset + seg.size]

    def payload(self, delegate) -> bytes:
        ref = delegate.processed
        if ref.location == self._inline:
            return bytes(self.program.backend_delegate_data[ref.index].data)
        return bytes(self.segment(ref.index))


_SHIMS_LOADED = False


def _global_torch_shims() -> None:
    """AOTInductor libraries built for ExecuTorch are not linked against libtorch (its
    runtime provides the ``aoti_torch_*`` shims): make torch's visible to them."""
    global _SHIMS_LOADED
    if _SHIMS_LOADED:
        return
    import torch

    lib = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cuda.so"):
        ctypes.CDLL(str(lib / name), mode=ctypes.RTLD_GLOBAL)
    _SHIMS_LOADED = True


def _leaves(spec: str) -> int:
    """Leaves of a pytree spec as AOTInductor's call spec writes it ([version, tree])."""
    import json

    def count(node) -> int:
        kids = node.get("children_spec") or []
        return 1 if node.get("type") is None and not kids else sum(count(k) for k in kids)

    return count(json.loads(spec)[1])


class _Delegate:
    """One CudaBackend delegate: the library loaded by torch's AOTI runner, its constants
    given from the program's data."""

    def __init__(self, label: str, payload: bytes, named: dict, device: str, workdir: Path) -> None:
        import torch

        self.label, self.device, self._named = label, device, named
        so_key, self.entries = parse_payload(payload)
        if so_key not in named:
            raise CudaRuntimeError(f"{label}: the program has no library {so_key!r}")
        so = workdir / f"{so_key[:16]}.so"
        so.write_bytes(bytes(named[so_key]))
        _global_torch_shims()
        self.runner = torch._C._aoti.AOTIModelContainerRunnerCuda(str(so), 1, device)
        in_spec, _ = self.runner.get_call_spec()
        # The library's pytree input is (args, kwargs): its leaves are the tensor inputs.
        self.n_inputs = _leaves(in_spec)
        # The library names its constants its own way; the payload uses the model's names.
        self._by_fqn = {fqn: name for name, fqn in self.runner.get_constant_names_to_original_fqns().items()}
        self.reset()

    def _constant(self, entry: dict):
        import torch

        blob = self._named.get(entry["storage_key"])
        if blob is None:
            raise CudaRuntimeError(f"{self.label}: constant {entry['fqn']!r} has no data "
                                   f"{entry['storage_key']!r} (is the .ptd beside the .pte?)")
        storage = torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(getattr(torch, _DTYPES[entry["dtype"]]))
        # Sizes, strides and offset are in elements of the storage, as torch keeps them.
        return torch.as_strided(storage, entry["sizes"], entry["strides"], entry["offset"]).to(self.device)

    def reset(self) -> None:
        """Every constant as the program ships it (the KV cache zeroed again)."""
        constants = {self._by_fqn.get(e["fqn"], e["fqn"]): self._constant(e) for e in self.entries}
        missing = set(self.runner.get_constant_names_to_original_fqns()) - set(constants)
        if missing:
            raise CudaRuntimeError(f"{self.label}: no data for the library's constants {sorted(missing)[:5]}")
        self.runner.update_constant_buffer(constants, False, True)

    def __call__(self, inputs: list) -> list:
        return list(self.runner.run([t.contiguous() for t in inputs]))


class _Method:
    """A method's instructions as ExecuTorch runs them: the CUDA delegate calls, and the
    host/device copies (``et_copy::_h2d_copy``/``_d2h_copy``) the lowering puts around them."""

    COPIES = {"et_copy::_h2d_copy": "device", "et_copy::_d2h_copy": "host"}

    def __init__(self, plan, payloads: list[bytes], named: dict, device: str, workdir: Path) -> None:
        self.plan, self.name, self.device = plan, plan.name, device
        ops = [f"{op.name}" for op in plan.operators]
        unknown = sorted(set(ops) - set(self.COPIES))
        if unknown:
            raise CudaRuntimeError(f"{self.name}: runs {', '.join(unknown)} outside the CUDA delegate; this "
                                   "runtime runs the delegate and its host/device copies only")
        if any(d.id != BACKEND_ID for d in plan.delegates):
            raise CudaRuntimeError(f"{self.name}: delegates {[d.id for d in plan.delegates]}; only {BACKEND_ID} runs here")
        self.ops = ops
        self.delegates = [_Delegate(f"{self.name}/{BACKEND_ID}[{i}]", p, named, device, workdir)
                          for i, p in enumerate(payloads)]

    def reset(self) -> None:
        for d in self.delegates:
            d.reset()

    def run(self, inputs: list) -> list:
        import numpy as np
        import torch
        from executorch.exir import schema as S

        if len(inputs) != len(self.plan.inputs):
            raise CudaRuntimeError(f"{self.name}: {len(inputs)} inputs given, the method takes {len(self.plan.inputs)}")
        values: dict[int, object] = {}
        for idx, x in zip(self.plan.inputs, inputs):
            values[idx] = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        for chain in self.plan.chains:
            for ins in chain.instructions:
                a = ins.instr_args
                if isinstance(a, S.KernelCall):
                    where = self.COPIES[self.ops[a.op_index]]
                    src = values[a.args[0]]
                    values[a.args[1]] = src.to(self.device) if where == "device" else src.cpu()
                elif isinstance(a, S.DelegateCall):
                    d = self.delegates[a.delegate_index]
                    outs = d([values[i] for i in a.args[:d.n_inputs]])
                    if len(outs) != len(a.args) - d.n_inputs:
                        raise CudaRuntimeError(f"{d.label}: returned {len(outs)} outputs, the call expects "
                                               f"{len(a.args) - d.n_inputs}")
                    values.update(zip(a.args[d.n_inputs:], outs))
                elif isinstance(a, S.MoveCall):
                    values[a.move_to] = values[a.move_from]
                elif not isinstance(a, S.FreeCall):
                    raise CudaRuntimeError(f"{self.name}: unsupported instruction {type(a).__name__}")
        torch.cuda.synchronize()
        return [values[i].cpu() if isinstance(values[i], torch.Tensor) else values[i] for i in self.plan.outputs]


def unavailable() -> str:
    """Why CUDA programs cannot run here ('' when they can)."""
    import torch

    if not torch.version.cuda:
        return f"torch {torch.__version__} is not built with CUDA"
    return "" if torch.cuda.is_available() else "no CUDA GPU is visible"


class CudaProgram:
    """A CUDA ``.pte`` on this host's GPU, behind the interface of the other runtimes."""

    def __init__(self, path: str | os.PathLike, data_files=(), device: str = "cuda:0") -> None:
        import torch

        why = unavailable()
        if why:
            raise CudaRuntimeError(f"cannot run CUDA programs here: {why}")
        # What executed, for the record: the shipped kernels, through torch's runner.
        self.runs_on = (f"the delegate's AOTInductor library via torch {torch.__version__}'s AOTI runner "
                        f"on {torch.cuda.get_device_name(torch.device(device))}")
        self.path = Path(path)
        container = _Container(self.path, data_files)
        self._container = container.program
        self.constant_methods = _pte.constant_methods(self._container)
        self.method_names = [p.name for p in self._container.execution_plan
                             if p.name not in self.constant_methods]
        self._workdir = Path(tempfile.mkdtemp(prefix="mlxbuild-cuda-"))
        self._methods = {}
        for plan in self._container.execution_plan:
            if plan.name in self.method_names:
                own = [container.payload(d) for d in plan.delegates if d.id == BACKEND_ID]
                self._methods[plan.name] = _Method(plan, own, container.named, device, self._workdir)

    def run(self, name: str, inputs: list) -> list:
        return self._methods[name].run(inputs)

    def input_dtype(self, method: str, index: int = 0) -> str | None:
        return _pte.input_dtype(self._container, method, index)

    def reset(self, name: str | None = None) -> None:
        for m in ([name] if name else list(self._methods)):
            self._methods[m].reset()


def load(path: str | os.PathLike, data_files=()) -> CudaProgram:
    return CudaProgram(path, data_files)
