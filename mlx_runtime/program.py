"""An ExecuTorch ``.pte`` loader and execution-plan executor in Python.

The program flatbuffer is read with ExecuTorch's own deserializer (through
``mlx_runtime.pte``); the file itself is memory-mapped, so segments (delegate
payloads, constants, named data) are only touched when used. A method's value
table holds ExecuTorch's EValues as Python objects (tensors as ``torch.Tensor``,
Int/Double/Bool/String as Python scalars, lists resolved on use), and its
instructions run in order:

- ``KernelCall``: the ops a partitioner leaves outside the delegate (for the MLX
  artifacts, ``aten::copy_`` writing delegate outputs back into the program's
  mutable buffers) run as the matching ``torch.ops`` overload on the value table,
  following the emitter's argument convention (every schema argument, then the
  returns); ``executorch_prim::*`` / ``aten::sym_*`` scalar ops run in Python.
- ``DelegateCall``: ``MLXBackend`` payloads run through ``graph.MLXGraphRunner``.
- ``JumpFalseCall``, ``MoveCall``, ``FreeCall``: as in ExecuTorch's ``Method``.

A loaded method keeps its value table, so memory-planned mutable buffers and the
delegates' own state (the KV cache) persist across calls, as in ExecuTorch.
"""

from __future__ import annotations

import math
import mmap
import operator
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["Program", "Method", "ProgramError", "load_program"]


class ProgramError(RuntimeError):
    """The program cannot be loaded or run by this runtime."""


# ExecuTorch ScalarType code -> torch dtype name.
_TORCH_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
                 7: "float64", 11: "bool", 15: "bfloat16", 27: "uint16", 28: "uint32", 29: "uint64"}


def _torch_dtype(code) -> Any:
    import torch

    try:
        return getattr(torch, _TORCH_DTYPES[int(code)])
    except KeyError:
        raise ProgramError(f"unsupported tensor ScalarType {code!r}") from None


# -- named data from .ptd files ------------------------------------------------------------


def _map(path: Path) -> mmap.mmap | bytes:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_ptd(path: str | os.PathLike) -> dict[str, memoryview]:
    """Named data (key -> bytes) of an ExecuTorch ``.ptd`` (FlatTensor) file."""
    from executorch.extension.flat_tensor.serialize.serialize import (
        FlatTensorHeader,
        _deserialize_to_flat_tensor,
    )

    path = Path(path)
    buf = _map(path)
    mv = memoryview(buf)
    header = FlatTensorHeader.from_bytes(bytes(mv[8:8 + FlatTensorHeader.EXPECTED_LENGTH])) \
        if len(mv) >= 8 + FlatTensorHeader.EXPECTED_LENGTH else None
    if header is None or not header.is_valid():
        raise ProgramError(f"{path}: not an ExecuTorch data file (.ptd): bad FlatTensor header")
    flat = _deserialize_to_flat_tensor(bytes(mv[:header.flatbuffer_offset + header.flatbuffer_size]))
    base = header.segment_base_offset
    out = {}
    for nd in flat.named_data:
        seg = flat.segments[nd.segment_index]
        out[nd.key] = mv[base + seg.offset: base + seg.offset + seg.size]
    return out


def _sibling_data_files(pte: Path) -> list[Path]:
    """``.ptd`` files that belong to ``pte``: ``<stem>.ptd``, ``<stem>-*.ptd``; beside
    an unpackaged ``model.pte`` (a build cache entry), every ``.ptd``."""
    d, stem = pte.parent, pte.stem
    found = [d / f"{stem}.ptd"] + sorted(d.glob(f"{stem}-*.ptd"))
    if stem == "model":
        found += sorted(d.glob("*.ptd"))
    seen, out = set(), []
    for p in found:
        if p.is_file() and p not in seen:
            seen.add(p)
            out.append(p)
    return out


# -- scalar kernels ExecuTorch runs natively ----------------------------------------------------


def _et_copy_index(copy_to, copy_from, index):
    if copy_to.shape[0] <= index:
        copy_to.resize_((index + 1, *copy_from.shape))
    copy_to[index] = copy_from
    return copy_to


# name.overload -> (number of schema arguments, fn)
_PRIMS: dict[str, tuple[int, Any]] = {
    "executorch_prim::add.Scalar": (2, operator.add),
    "executorch_prim::sub.Scalar": (2, operator.sub),
    "executorch_prim::mul.Scalar": (2, operator.mul),
    "executorch_prim::floordiv.Scalar": (2, operator.floordiv),
    "executorch_prim::floordiv.int": (2, operator.floordiv),
    "executorch_prim::truediv.Scalar": (2, operator.truediv),
    "executorch_prim::mod.Scalar": (2, operator.mod),
    "executorch_prim::mod.int": (2, operator.mod),
    "executorch_prim::eq.Scalar": (2, operator.eq),
    "executorch_prim::gt.Scalar": (2, operator.gt),
    "executorch_prim::lt.Scalar": (2, operator.lt),
    "executorch_prim::ge.Scalar": (2, operator.ge),
    "executorch_prim::le.Scalar": (2, operator.le),
    "executorch_prim::neg.Scalar": (1, operator.neg),
    "executorch_prim::sym_float.Scalar": (1, float),
    "executorch_prim::sym_int.Scalar": (1, int),
    "executorch_prim::ceil.Scalar": (1, math.ceil),
    "executorch_prim::round.Scalar": (1, round),
    "executorch_prim::trunc.Scalar": (1, math.trunc),
    "executorch_prim::sym_max.Scalar": (2, max),
    "executorch_prim::sym_min.Scalar": (2, min),
    "executorch_prim::sym_not.Scalar": (1, operator.not_),
    "executorch_prim::sym_ite.Scalar": (3, lambda b, t, f: t if b else f),
    "executorch_prim::et_view.default": (2, lambda t, sizes: t.view(list(sizes))),
    "executorch_prim::et_copy_index.tensor": (3, _et_copy_index),
    "aten::sym_size.int": (2, lambda t, d: int(t.shape[d])),
    "aten::sym_numel": (1, lambda t: int(t.numel())),
    "aten::sym_stride.int": (2, lambda t, d: int(t.stride(d))),
    "aten::sym_storage_offset": (1, lambda t: int(t.storage_offset())),
}

# Modules that register the torch ops behind ExecuTorch's custom kernels.
_OP_LIBRARIES = ("executorch.extension.llm.custom_ops.custom_ops", "executorch.kernels.quantized",
                 "executorch.exir.passes.executorch_prim_ops_registry")


def _torch_op(name: str, overload: str):
    import importlib

    import torch

    ns, _, op = name.partition("::")
    if not op:
        raise ProgramError(f"operator {name!r}: no namespace")
    for attempt in range(2):
        try:
            packet = getattr(getattr(torch.ops, ns), op)
            return getattr(packet, overload or "default")
        except (AttributeError, RuntimeError):
            if attempt:
                break
            for mod in _OP_LIBRARIES:
                try:
                    importlib.import_module(mod)
                except Exception:  # noqa: BLE001 - optional kernel libraries
                    pass
    raise ProgramError(f"no kernel for operator {name}{'.' + overload if overload else ''} "
                       f"(not a torch op this runtime can find)")


class _Kernel:
    """One operator of a plan's operator table, callable on a value table."""

    def __init__(self, name: str, overload: str) -> None:
        self.label = f"{name}.{overload}" if overload else name
        prim = _PRIMS.get(self.label) or _PRIMS.get(f"{name}.default" if not overload else "")
        if prim is not None:
            self.prim, self.n_args = prim[1], prim[0]
            return
        self.prim = None
        self.op = _torch_op(name, overload)
        self.schema = self.op._schema
        self.n_args = len(self.schema.arguments)

    def __call__(self, method: "Method", args: Sequence[int]) -> None:
        ins, outs = args[:self.n_args], args[self.n_args:]
        if self.prim is not None:
            result = self.prim(*[method.read(i) for i in ins])
            method.write_returns(outs, result)
            return
        import torch

        pos, kw = [], {}
        for arg, idx in zip(self.schema.arguments, ins):
            if arg.is_out:
                cur = method.values[idx]
                val = torch.empty(0, dtype=cur.dtype) if isinstance(cur, torch.Tensor) else cur
                method.values[idx] = val
            else:
                val = method.read(idx)
            if arg.kwarg_only:
                kw[arg.name] = val
            else:
                pos.append(val)
        result = self.op(*pos, **kw)
        method.write_returns(outs, result)


# -- methods ---------------------------------------------------------------------------------


class _Boxed(list):
    """IntList / TensorList / OptionalTensorList: value-table indices, resolved on read."""


class Method:
    """One loaded execution plan with its persistent value table."""

    def __init__(self, program: "Program", plan) -> None:
        self.program, self.plan, self.name = program, plan, plan.name
        self.values: list = [self._init_value(i, ev.val) for i, ev in enumerate(plan.values)]
        self.kernels = [None] * len(plan.operators)
        self.delegates = [self._init_delegate(i, d) for i, d in enumerate(plan.delegates)]
        self.calls = 0

    # -- values ------------------------------------------------------------------
    def _init_value(self, i: int, val):
        from executorch.exir import schema as S

        if isinstance(val, S.Tensor):
            return self.program._tensor(val, f"{self.name} value {i}")
        if isinstance(val, S.Int):
            return int(val.int_val)
        if isinstance(val, S.Bool):
            return bool(val.bool_val)
        if isinstance(val, S.Double):
            return float(val.double_val)
        if isinstance(val, S.String):
            return val.string_val
        if isinstance(val, (S.DoubleList, S.BoolList)):
            return list(val.items)
        if isinstance(val, (S.IntList, S.TensorList, S.OptionalTensorList)):
            return _Boxed(val.items)
        if isinstance(val, S.Null):
            return None
        raise ProgramError(f"{self.name}: value {i}: unsupported EValue {type(val).__name__}")

    def read(self, idx: int):
        v = self.values[idx]
        if isinstance(v, _Boxed):
            return [None if j < 0 else self.values[j] for j in v]
        return v

    def write_returns(self, outs: Sequence[int], result) -> None:
        if not outs:
            return
        if len(outs) == 1:
            target = self.values[outs[0]]
            if isinstance(target, _Boxed):  # a list return: its elements are separate values
                for j, r in zip(target, result):
                    self.values[j] = r
            else:
                self.values[outs[0]] = result[0] if isinstance(result, tuple) and len(result) == 1 else result
            return
        for idx, r in zip(outs, result):
            self.values[idx] = r

    # -- delegates ----------------------------------------------------------------
    def _init_delegate(self, i: int, d):
        from executorch.exir import schema as S

        if d.id != "MLXBackend":
            raise ProgramError(f"{self.name}: delegate {i} is for backend {d.id!r}; this runtime runs "
                               f"MLXBackend payloads only")
        ref = d.processed
        if ref.location == S.DataLocation.INLINE:
            payload = self.program.program.backend_delegate_data[ref.index].data
        else:
            payload = self.program.segment(ref.index)
        from .graph import MLXGraphRunner

        try:
            return MLXGraphRunner(payload, self.program.named_data, name=f"{self.name}/MLXBackend[{i}]",
                                  precision=self.program.precision)
        except (ValueError, RuntimeError) as e:
            raise ProgramError(f"{self.program.path.name}: method {self.name!r}: cannot load MLX delegate {i}: "
                               f"{e}") from e

    def _delegate_call(self, index: int, args: Sequence[int]) -> None:
        import torch

        from .graph import mx_dtype, to_mx, to_numpy

        runner = self.delegates[index]
        n_in = len(runner.input_map)
        if len(args) != n_in + len(runner.output_map):
            raise ProgramError(f"{self.name}: delegate {index} takes {n_in} inputs and "
                               f"{len(runner.output_map)} outputs, the call passes {len(args)} values")
        inputs = []
        for idx in args[:n_in]:
            v = self.values[idx]
            if isinstance(v, torch.Tensor):
                t = v.detach().contiguous()
                bf16 = t.dtype == torch.bfloat16
                inputs.append(to_mx((t.view(torch.uint16) if bf16 else t).numpy(), bf16=bf16))
            else:
                inputs.append(v)
        out_idx = args[n_in:]
        want = []
        for idx in out_idx:
            v = self.values[idx]
            want.append(mx_dtype(_code_of(v.dtype)) if isinstance(v, torch.Tensor) else None)
        results = runner.execute(inputs, want)
        for idx, r, dt in zip(out_idx, results, want):
            if dt is None:
                self.values[idx] = r
                continue
            t = torch.from_numpy(np.array(to_numpy(r)))  # a copy torch owns
            self.values[idx] = t.view(torch.bfloat16) if self.values[idx].dtype == torch.bfloat16 else t

    # -- running -------------------------------------------------------------------
    def _kernel(self, op_index: int) -> _Kernel:
        k = self.kernels[op_index]
        if k is None:
            op = self.plan.operators[op_index]
            k = self.kernels[op_index] = _Kernel(op.name, op.overload)
        return k

    def set_inputs(self, inputs: Sequence[Any]) -> None:
        import torch

        plan = self.plan
        if len(inputs) != len(plan.inputs):
            raise ProgramError(f"{self.name}: {len(inputs)} inputs given, the method takes {len(plan.inputs)}")
        for k, (idx, value) in enumerate(zip(plan.inputs, inputs)):
            cur = self.values[idx]
            spec = plan.values[idx].val
            if isinstance(cur, torch.Tensor):
                t = _as_tensor(value)
                if t.dtype != cur.dtype:
                    raise ProgramError(f"{self.name}: input {k} has dtype {t.dtype}, the method expects {cur.dtype}")
                _check_shape(self.name, k, list(t.shape), list(spec.sizes), int(spec.shape_dynamism))
                self.values[idx] = t.detach().clone().contiguous()
            elif isinstance(cur, bool):
                self.values[idx] = bool(_scalar(value))
            elif isinstance(cur, int):
                self.values[idx] = int(_scalar(value))
            elif isinstance(cur, float):
                self.values[idx] = float(_scalar(value))
            else:
                self.values[idx] = value

    def execute(self, inputs: Sequence[Any]) -> list:
        """Run the method; returns its outputs (tensors as torch.Tensor copies)."""
        from executorch.exir import schema as S

        self.set_inputs(inputs)
        for chain in self.plan.chains:
            instrs = chain.instructions
            pc = 0
            while pc < len(instrs):
                a = instrs[pc].instr_args
                try:
                    if isinstance(a, S.KernelCall):
                        self._kernel(a.op_index)(self, a.args)
                    elif isinstance(a, S.DelegateCall):
                        self._delegate_call(a.delegate_index, a.args)
                    elif isinstance(a, S.JumpFalseCall):
                        cond = self.values[a.cond_value_index]
                        if not bool(cond.item() if hasattr(cond, "item") else cond):
                            pc = a.destination_instruction
                            continue
                    elif isinstance(a, S.MoveCall):
                        self.values[a.move_to] = self.values[a.move_from]
                    elif isinstance(a, S.FreeCall):
                        pass  # storage is garbage collected
                    else:
                        raise ProgramError(f"unsupported instruction {type(a).__name__}")
                except ProgramError:
                    raise
                except Exception as e:
                    what = (self._kernel(a.op_index).label if isinstance(a, S.KernelCall)
                            else type(a).__name__)
                    raise ProgramError(f"{self.name}: instruction {pc} ({what}) failed: "
                                       f"{type(e).__name__}: {e}") from e
                pc += 1
        self.calls += 1
        out = []
        for idx in self.plan.outputs:
            v = self.read(idx)
            out.append(v.clone() if hasattr(v, "clone") else v)
        return out


_CODES: dict = {}


def _code_of(dtype) -> int:
    """torch dtype -> ExecuTorch ScalarType code."""
    if not _CODES:
        import torch

        _CODES.update({getattr(torch, n): c for c, n in _TORCH_DTYPES.items()})
    try:
        return _CODES[dtype]
    except KeyError:
        raise ProgramError(f"unsupported tensor dtype {dtype}") from None


def _scalar(v):
    if hasattr(v, "item"):
        return v.item()
    return v


def _as_tensor(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) or np.isscalar(value) or isinstance(value, (list, tuple)):
        return torch.from_numpy(np.asarray(value, order="C"))
    try:  # anything with the buffer protocol / __array__ (mx.array...)
        return torch.from_numpy(np.asarray(value, order="C"))
    except Exception as e:  # noqa: BLE001
        raise ProgramError(f"cannot use a {type(value).__name__} as a tensor input") from e


def _check_shape(method: str, k: int, got: list[int], spec: list[int], dynamism: int) -> None:
    # TensorShapeDynamism: 0 STATIC, 1 DYNAMIC_BOUND (sizes are upper bounds), 2 DYNAMIC_UNBOUND.
    if len(got) != len(spec):
        raise ProgramError(f"{method}: input {k} has rank {len(got)} (shape {got}), the method expects "
                           f"rank {len(spec)} (shape {spec})")
    if dynamism == 0 and got != spec:
        raise ProgramError(f"{method}: input {k} has shape {got}, the method expects {spec}")
    if dynamism == 1 and any(g > s for g, s in zip(got, spec)):
        raise ProgramError(f"{method}: input {k} has shape {got}, over the method's bound {spec}")


# -- programs --------------------------------------------------------------------------------


class Program:
    """A loaded ``.pte``: methods (loaded on first use, then kept with their state),
    constant methods, and named data from the file and its ``.ptd`` files."""

    def __init__(self, path: str | os.PathLike, data_files: Iterable[str | os.PathLike] = (), *,
                 precision: str = "auto") -> None:
        from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program

        from .pte import PteError, is_constant_method, read_program_bytes

        from .graph import _promotes

        _promotes(precision)  # validates
        self.path = Path(path)
        self.runs_on = "mlxbuild MLX runtime (mlx.core)"
        self.precision = precision
        try:
            data, _size, eh = read_program_bytes(self.path)
        except PteError as e:
            raise ProgramError(str(e)) from None
        try:
            self.program = _flatbuffer_to_program(data)
        except Exception as e:  # noqa: BLE001 - flatbuffers raises assorted errors on garbage
            raise ProgramError(f"{self.path}: cannot parse the program flatbuffer: {e}") from e
        self._buf = _map(self.path)
        self._mv = memoryview(self._buf)
        self._segment_base = eh.segment_base_offset if eh is not None else 0
        self.plans = {p.name: p for p in self.program.execution_plan}
        self.constant_method_names = [n for n, p in self.plans.items() if is_constant_method(p)]
        self.method_names = [n for n in self.plans if n not in self.constant_method_names]
        self.data_files = [Path(p) for p in data_files] or _sibling_data_files(self.path)
        self.named_data: dict[str, memoryview] = {}
        for nd in self.program.named_data or []:
            self.named_data[nd.key] = self.segment(nd.segment_index)
        for p in self.data_files:
            for key, mv in read_ptd(p).items():
                self.named_data.setdefault(key, mv)
        self._methods: dict[str, Method] = {}
        self._constant_methods: dict[str, Any] | None = None

    # -- data ---------------------------------------------------------------------
    def segment(self, index: int) -> memoryview:
        segs = self.program.segments
        if not 0 <= index < len(segs):
            raise ProgramError(f"{self.path}: segment {index} out of range ({len(segs)} segments)")
        s = segs[index]
        start = self._segment_base + s.offset
        if start + s.size > len(self._mv):
            raise ProgramError(f"{self.path}: segment {index} runs past the end of the file (truncated?)")
        return self._mv[start:start + s.size]

    def _tensor(self, spec, what: str):
        """Initial contents of a tensor EValue: constant data, initial mutable data, or zeros."""
        import torch

        dtype = _torch_dtype(spec.scalar_type)
        sizes = [int(s) for s in spec.sizes]
        info = spec.extra_tensor_info
        external = info is not None and int(info.location) == 1 and info.fully_qualified_name
        buf = None
        if external:
            try:
                buf = self.named_data[info.fully_qualified_name]
            except KeyError:
                raise ProgramError(f"{self.path}: {what}: external tensor {info.fully_qualified_name!r} is in "
                                   f"no data file (pass the .ptd with data_files=)") from None
        elif spec.data_buffer_idx > 0:
            nbytes = math.prod(sizes) * torch.empty(0, dtype=dtype).element_size()
            if spec.allocation_info is None:  # a constant
                cs = self.program.constant_segment
                if cs is not None and cs.offsets:
                    off = cs.offsets[spec.data_buffer_idx]
                    buf = self.segment(cs.segment_index)[off:off + nbytes]
                else:
                    buf = memoryview(self.program.constant_buffer[spec.data_buffer_idx].storage)[:nbytes]
            else:  # a mutable tensor with a serialized initial state
                segs = self.program.mutable_data_segments or []
                k = info.mutable_data_segments_idx if info is not None else 0
                if k < len(segs):
                    off = segs[k].offsets[spec.data_buffer_idx]
                    buf = self.segment(segs[k].segment_index)[off:off + nbytes]
        if buf is None:
            return torch.zeros(sizes, dtype=dtype)
        storage = _TORCH_DTYPES[int(spec.scalar_type)]
        np_dt = np.uint16 if storage == "bfloat16" else np.dtype(storage)
        order = [int(d) for d in spec.dim_order] or list(range(len(sizes)))
        arr = np.frombuffer(buf, dtype=np_dt, count=math.prod(sizes)).reshape([sizes[d] for d in order])
        t = torch.from_numpy(arr.copy())
        if storage == "bfloat16":
            t = t.view(torch.bfloat16)
        if order != list(range(len(sizes))):
            t = t.permute([order.index(d) for d in range(len(sizes))]).contiguous()
        return t

    # -- methods -------------------------------------------------------------------
    def method(self, name: str) -> Method:
        m = self._methods.get(name)
        if m is None:
            if name not in self.plans:
                raise ProgramError(f"{self.path}: no method {name!r}; methods: {', '.join(self.plans)}")
            m = self._methods[name] = Method(self, self.plans[name])
        return m

    @property
    def constant_methods(self) -> dict[str, Any]:
        if self._constant_methods is None:
            from .pte import unflatten

            out = {}
            for name in self.constant_method_names:
                m = self.method(name)
                leaves = [_plain(v) for v in (m.read(i) for i in m.plan.outputs)]
                out[name] = unflatten(leaves, m.plan.container_meta_type.encoded_out_str)
            self._constant_methods = out
        return dict(self._constant_methods)

    def input_dtype(self, method: str, index: int = 0) -> str | None:
        """The torch dtype name a method's tensor input is declared with."""
        from .pte import input_dtype

        return input_dtype(self.program, method, index)

    def reset(self, method: str | None = None) -> None:
        """Forget loaded methods (all, or one): their state (KV cache, buffers) starts over."""
        if method is None:
            self._methods.clear()
        else:
            self._methods.pop(method, None)

    def run(self, method: str, inputs: Sequence[Any] = ()) -> list:
        import torch

        as_torch = any(isinstance(x, torch.Tensor) for x in inputs)
        outs = self.method(method).execute(list(inputs))
        return [_export(o, as_torch) for o in outs]

    def forward(self, *inputs) -> list:
        return self.run("forward", inputs)

    def close(self) -> None:
        self._methods.clear()
        self.named_data.clear()
        if isinstance(self._buf, mmap.mmap):
            try:
                self._buf.close()
            except BufferError:
                pass  # a caller still holds a view into the file

    def __repr__(self) -> str:
        return f"<Program {self.path.name} methods={self.method_names}>"


def _plain(v):
    import torch

    if isinstance(v, torch.Tensor):
        return _export(v, False)
    return v


def _export(v, as_torch: bool):
    import torch

    if isinstance(v, torch.Tensor):
        if as_torch:
            return v
        if v.dtype == torch.bfloat16:
            v = v.float()
        return v.numpy()
    if isinstance(v, list):
        return [_export(x, as_torch) for x in v]
    return v


def load_program(path: str | os.PathLike, data_files: Iterable[str | os.PathLike] = (), *,
                 precision: str = "auto") -> Program:
    return Program(path, data_files, precision=precision)
