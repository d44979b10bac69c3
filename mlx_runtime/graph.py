"""The MLX delegate payload interpreter: one ``MLXGraph`` run through ``mlx.core``.

Semantics follow ExecuTorch's C++ MLX runtime (``MLXBackend.cpp``, ``MLXExecutor.h``,
``MLXInterpreter.h``):

- Tensor slot ids are laid out ``constants | inputs | outputs | mutable buffers |
  temporaries``. Constants are loaded once from the program's named data (the
  ``named_slots`` entry of a constant tid is its key) with the dtype and static
  shape in ``tensor_meta``. Only the init chain may overwrite constants.
- Mutable buffers (the KV cache) start as zeros of their ``tensor_meta`` shape and
  persist across ``execute`` calls; inputs, outputs, temporaries and value slots
  are per call.
- The init chain (``init_chain_idx >= 0``) runs once at load; the main chain on
  every call. If/Scan handlers re-enter through ``Frame.run_chain``.
- Inputs bind per ``input_map`` (tensor -> array, int -> int value slot); outputs
  are read per ``output_map`` and made contiguous / cast to the caller's dtype.

Evaluation is lazy: handlers only build ``mlx`` graphs, and one ``mx.eval`` of the
outputs and the mutable buffers ends each call (nodes that need a host value, like
``ItemInt``, evaluate just that scalar).

``precision`` (``auto`` | ``native`` | ``float32``): on the CPU, fp16/bf16 graphs run
in float32 by default and cast their outputs back (see ``_promotes``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

import mlx.core as mx

from . import fb
from .registry import HANDLERS, NodeUnsupported

__all__ = ["MLXGraphRunner", "Frame", "MLXRuntimeError", "UnknownNode", "mx_dtype", "np_dtype",
           "to_mx", "to_numpy"]

INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)


class MLXRuntimeError(RuntimeError):
    """The MLX program cannot be loaded or run."""


class UnknownNode(MLXRuntimeError):
    """The payload uses a node type this runtime has no handler for."""


# ExecuTorch ScalarType code -> (mlx dtype, numpy storage dtype, ExecuTorch name).
# bfloat16 is stored as uint16 on the numpy side and re-viewed.
_SCALAR_TYPES: dict[int, tuple[Any, Any, str]] = {
    0: (mx.uint8, np.uint8, "Byte"),
    1: (mx.int8, np.int8, "Char"),
    2: (mx.int16, np.int16, "Short"),
    3: (mx.int32, np.int32, "Int"),
    4: (mx.int64, np.int64, "Long"),
    5: (mx.float16, np.float16, "Half"),
    6: (mx.float32, np.float32, "Float"),
    7: (mx.float64, np.float64, "Double"),
    11: (mx.bool_, np.bool_, "Bool"),
    15: (mx.bfloat16, np.uint16, "BFloat16"),
    27: (mx.uint16, np.uint16, "UInt16"),
    28: (mx.uint32, np.uint32, "UInt32"),
    29: (mx.uint64, np.uint64, "UInt64"),
}


def mx_dtype(scalar_type: int):
    """ExecuTorch ScalarType code -> ``mx.Dtype``."""
    try:
        return _SCALAR_TYPES[int(scalar_type)][0]
    except KeyError:
        raise MLXRuntimeError(f"unsupported ScalarType {scalar_type} in the MLX program") from None


def np_dtype(scalar_type: int):
    """ExecuTorch ScalarType code -> numpy dtype holding its bytes."""
    try:
        return _SCALAR_TYPES[int(scalar_type)][1]
    except KeyError:
        raise MLXRuntimeError(f"unsupported ScalarType {scalar_type} in the MLX program") from None


def to_mx(arr: np.ndarray, bf16: bool = False) -> mx.array:
    """A numpy array -> mx.array (``bf16``: the array holds bfloat16 bits as uint16)."""
    a = mx.array(np.asarray(arr, order="C"))  # ascontiguousarray would make 0-d arrays 1-d
    return a.view(mx.bfloat16) if bf16 else a


def to_numpy(a: mx.array) -> np.ndarray:
    """An evaluated mx.array -> numpy (bfloat16 comes back as uint16 bits)."""
    if a.dtype == mx.bfloat16:
        return np.asarray(a.view(mx.uint16))
    return np.asarray(a)


_HALF = (mx.float16, mx.bfloat16)
PRECISIONS = ("auto", "native", "float32")


def _promotes(precision: str) -> bool:
    """Whether half-precision (fp16/bf16) arithmetic runs in float32.

    ``native`` computes in the dtypes the graph declares. ``float32`` promotes
    fp16/bf16 tensors (constants, inputs, the KV cache, every node result) to
    float32 and casts outputs back to their declared dtype. ``auto`` (default) is
    ``float32`` when mlx runs on the CPU: MLX's CPU kernels accumulate half types
    in half precision (a 4-bit quantized matmul over K=3072 in bf16 is off by ~10%
    of its output scale, and 10-40x slower than in float32), where Metal
    accumulates in float32; promotion is the closer emulation of the Apple runtime.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        return mx.default_device().type == mx.DeviceType.cpu
    return precision == "float32"


def _idx(x) -> int:
    return x if isinstance(x, int) else int(x.idx)


def _clamp32(v: int) -> int:
    # Literals are int64 in the schema; INT64_MAX means "to the end" (Slice stop).
    return INT32_MAX if v >= INT32_MAX else INT32_MIN if v <= INT32_MIN else v


class Frame:
    """One execution of a graph: the slot storage handlers read and write.

    See ``registry.py`` for the contract handlers rely on.
    """

    __slots__ = ("graph", "runner", "tensors", "values", "is_init", "_nconst", "_mut_lo", "_mut_hi",
                 "_promote", "kv_cache", "__weakref__")

    def __init__(self, runner: "MLXGraphRunner", is_init: bool = False) -> None:
        self.runner = runner
        self.graph = runner.graph
        self.tensors: dict[int, mx.array] = {}
        self.values: list = [None] * runner.num_values
        self.is_init = is_init
        self._promote = runner.promote
        self._nconst = runner.num_constants
        self._mut_lo, self._mut_hi = runner.mutable_range
        self.kv_cache = None

    # -- tensors -----------------------------------------------------------------
    def t(self, tid) -> mx.array:
        i = _idx(tid)
        if i < self._nconst:
            return self.runner.constants[i]
        if self._mut_lo <= i < self._mut_hi:
            try:
                return self.runner.mutable[i]
            except KeyError:
                raise MLXRuntimeError(f"tensor slot {i}: mutable buffer not in mutable_buffer_map") from None
        try:
            return self.tensors[i]
        except KeyError:
            raise MLXRuntimeError(f"tensor slot {i} read before it was written "
                                  f"({self.runner.slot_kind(i)})") from None

    def set_t(self, tid, array: mx.array) -> None:
        i = _idx(tid)
        if not isinstance(array, mx.array):
            array = mx.array(array)
        if self._promote and array.dtype in _HALF:
            array = array.astype(mx.float32)
        if i < self._nconst:
            if not self.is_init:
                raise MLXRuntimeError(f"tensor slot {i}: a constant can only be written by the init chain")
            self.runner.constants[i] = array
        elif self._mut_lo <= i < self._mut_hi:
            self.runner.mutable[i] = array
        else:
            self.tensors[i] = array

    # -- values ------------------------------------------------------------------
    def v(self, vid):
        i = _idx(vid)
        try:
            val = self.values[i]
        except IndexError:
            raise MLXRuntimeError(f"value slot {i} out of range ({len(self.values)} values)") from None
        if val is None:
            raise MLXRuntimeError(f"value slot {i} read before it was written")
        return val

    def set_v(self, vid, value) -> None:
        i = _idx(vid)
        if not 0 <= i < len(self.values):
            raise MLXRuntimeError(f"value slot {i} out of range ({len(self.values)} values)")
        if isinstance(value, mx.array):
            value = value.item()
        elif isinstance(value, np.generic):
            value = value.item()
        self.values[i] = value

    def int_(self, x) -> int:
        if x is None:
            raise MLXRuntimeError("missing IntOrVid field")
        if isinstance(x, (int, np.integer)):
            return int(x)
        if x.isVid:
            return int(self.v(x.vid))
        return _clamp32(int(x.literal))

    def float_(self, x) -> float:
        if isinstance(x, (int, float, np.number)):
            return float(x)
        if x.isVid:
            return float(self.v(x.vid))
        return float(x.literal)

    def vid_or_tid(self, x):
        return self.v(x.vid) if x.isVid else self.t(x.tid)

    def int_vid_tid(self, x):
        kind = int(x.kind)
        if kind == 0:
            return _clamp32(int(x.literal))
        if kind == 1:
            return int(self.v(x.vid))
        if kind == 2:
            return self.t(x.tid)
        raise MLXRuntimeError(f"IntOrVidOrTid: invalid kind {kind}")

    def dtype(self, scalar_type: int):
        dt = mx_dtype(scalar_type)
        return mx.float32 if self._promote and dt in _HALF else dt

    def run_chain(self, index: int) -> None:
        self.runner.run_chain(self, int(index))


class MLXGraphRunner:
    """A loaded MLX delegate: constants, persistent mutable buffers, and ``execute``.

    ``named_data`` maps named-data keys to buffers (anything ``memoryview`` accepts);
    constants are copied out of it, so it need not outlive the runner.
    """

    def __init__(self, payload, named_data: Mapping[str, Any] | Callable[[str], Any], *,
                 name: str = "MLXBackend", precision: str = "auto") -> None:
        from . import nodes  # noqa: F401 - registers every handler

        self.name = name
        self.precision = precision
        self.promote = _promotes(precision)
        self.graph, _segment = fb.read_payload(payload)
        g = self.graph
        self._names = fb.node_type_names()
        self.num_constants = int(g.numConstantTensors)
        self.num_values = int(g.numValues)
        in_end = self.num_constants + int(g.numInputTensors)
        out_end = in_end + int(g.numOutputTensors)
        self.mutable_range = (out_end, out_end + int(g.numMutableBufferTensors))
        self._ranges = (self.num_constants, in_end, out_end, self.mutable_range[1])
        self.chains = list(g.instructionChains or [])
        self.input_map = [(int(s.idx), int(s.slotType)) for s in (g.inputMap or [])]
        self.output_map = [(int(s.idx), int(s.slotType)) for s in (g.outputMap or [])]
        self.metas = list(g.tensorMeta or [])
        self._check_handlers()
        self.constants: list[mx.array | None] = [None] * self.num_constants
        self._load_constants(named_data)
        self.mutable: dict[int, mx.array] = {}
        self.reset_state()
        if int(g.initChainIdx) >= 0:
            frame = Frame(self, is_init=True)
            self.run_chain(frame, int(g.initChainIdx))
            mx.eval([c for c in self.constants if c is not None])
        self.calls = 0

    # -- loading -----------------------------------------------------------------
    def slot_kind(self, i: int) -> str:
        c, ie, oe, me = self._ranges
        return ("constant" if i < c else "input" if i < ie else "output" if i < oe
                else "mutable buffer" if i < me else "temporary")

    def _check_handlers(self) -> None:
        missing: dict[str, int] = {}
        for chain in self.chains:
            for ins in chain.instructions or []:
                name = self._names.get(int(ins.opType), f"<OpNode tag {ins.opType}>")
                if name not in HANDLERS:
                    missing[name] = missing.get(name, 0) + 1
        if missing:
            listed = ", ".join(f"{k} (x{v})" for k, v in sorted(missing.items()))
            raise UnknownNode(f"{self.name}: no handler for MLX node type(s): {listed}")

    def _meta(self, tid: int):
        if tid >= len(self.metas) or self.metas[tid] is None:
            raise MLXRuntimeError(f"tensor slot {tid} ({self.slot_kind(tid)}) has no tensor_meta")
        return self.metas[tid]

    def _static_shape(self, tid: int) -> list[int]:
        shape = []
        for d in self._meta(tid).shape or []:
            if int(d.value) < 0:
                raise MLXRuntimeError(f"tensor slot {tid} ({self.slot_kind(tid)}) has a dynamic shape")
            shape.append(int(d.value))
        return shape

    def _load_constants(self, named_data) -> None:
        if self.num_constants == 0:
            return
        get = named_data if callable(named_data) else named_data.__getitem__
        names: dict[int, str] = {}
        for ns in self.graph.namedSlots or []:
            if int(ns.slot.slotType) == 0:
                n = ns.name.decode() if isinstance(ns.name, bytes) else ns.name
                names[int(ns.slot.idx)] = n
        for tid in range(self.num_constants):
            key = names.get(tid)
            if key is None:
                raise MLXRuntimeError(f"constant tensor {tid} has no name in named_slots")
            try:
                buf = get(key)
            except KeyError:
                raise MLXRuntimeError(f"constant {key!r} (tensor {tid}) is not in the program's named data "
                                      f"(missing .ptd file?)") from None
            meta = self._meta(tid)
            shape = self._static_shape(tid)
            st = int(meta.scalarType)
            ndt = np.dtype(np_dtype(st))
            n = int(np.prod(shape, dtype=np.int64))
            mv = memoryview(buf).cast("B")
            if len(mv) < n * ndt.itemsize:
                raise MLXRuntimeError(f"constant {key!r}: {len(mv)} bytes for shape {shape} of "
                                      f"{_SCALAR_TYPES[st][2] if st in _SCALAR_TYPES else st} ({n * ndt.itemsize} needed)")
            arr = np.frombuffer(mv, dtype=ndt, count=n).reshape(shape)
            const = to_mx(arr, bf16=(st == 15))
            self.constants[tid] = const.astype(mx.float32) if self.promote and const.dtype in _HALF else const
        mx.eval(self.constants)

    def state_bytes(self) -> int:
        """The bytes the mutable buffers (the KV cache, recurrent states) take at the dtypes
        the program declares (this runtime may hold half precision as fp32)."""
        total = 0
        for s in self.graph.mutableBufferMap or []:
            tid = int(s.idx)
            n = int(np.prod(self._static_shape(tid), dtype=np.int64))
            total += n * np.dtype(np_dtype(int(self._meta(tid).scalarType))).itemsize
        return total

    def reset_state(self) -> None:
        """Mutable buffers (the KV cache) back to zeros, as at load."""
        self.mutable = {}
        for s in self.graph.mutableBufferMap or []:
            if int(s.slotType) != 0:
                raise MLXRuntimeError(f"mutable buffer slot {s.idx}: not a tensor slot")
            tid = int(s.idx)
            dt = mx_dtype(self._meta(tid).scalarType)
            dt = mx.float32 if self.promote and dt in _HALF else dt
            self.mutable[tid] = mx.zeros(self._static_shape(tid), dtype=dt)
        if self.mutable:
            mx.eval(list(self.mutable.values()))

    # -- running -----------------------------------------------------------------
    def run_chain(self, frame: Frame, index: int) -> None:
        if not 0 <= index < len(self.chains):
            raise MLXRuntimeError(f"chain {index} out of range ({len(self.chains)} chains)")
        names, handlers = self._names, HANDLERS
        for pos, ins in enumerate(self.chains[index].instructions or []):
            name = names.get(int(ins.opType))
            fn = handlers.get(name)
            if fn is None:
                raise UnknownNode(f"{self.name}: no handler for MLX node type {name or ins.opType}")
            try:
                fn(frame, ins.op)
            except (NodeUnsupported, UnknownNode, MLXRuntimeError):
                raise
            except Exception as e:  # noqa: BLE001 - name the node that failed
                raise MLXRuntimeError(f"{self.name}: chain {index} instruction {pos} ({name}) failed: "
                                      f"{type(e).__name__}: {e}") from e

    def _bind_input(self, frame: Frame, tid: int, slot_type: int, value) -> None:
        if slot_type == 0:
            if not isinstance(value, mx.array):
                raise MLXRuntimeError(f"input slot {tid}: expected an mx.array")
            if tid < len(self.metas) and self.metas[tid] is not None:
                want = mx_dtype(self.metas[tid].scalarType)
                if value.dtype != want:
                    raise MLXRuntimeError(f"input tensor {tid}: dtype {value.dtype} but the program expects {want}")
                # Shapes are not checked here, as in the C++ runtime: the program's own
                # input checks bound them, and the delegate computes with what it gets.
            frame.tensors[tid] = value.astype(mx.float32) if self.promote and value.dtype in _HALF else value
        elif slot_type in (1, 2, 3):
            frame.set_v(tid, value)
        else:
            raise MLXRuntimeError(f"input slot {tid}: unknown slot type {slot_type}")

    def execute(self, inputs: Sequence[Any], out_dtypes: Sequence[Any] | None = None) -> list:
        """Run the main chain. ``inputs`` follow ``input_map`` (mx.array for tensor
        slots, Python scalars for value slots); returns evaluated mx.arrays / scalars
        following ``output_map``. ``out_dtypes`` (mx dtypes or None) cast tensor outputs."""
        if len(inputs) != len(self.input_map):
            raise MLXRuntimeError(f"{self.name}: {len(inputs)} inputs, the program takes {len(self.input_map)}")
        frame = Frame(self)
        for (tid, kind), value in zip(self.input_map, inputs):
            self._bind_input(frame, tid, kind, value)
        self.run_chain(frame, int(self.graph.mainChainIdx))
        outs: list = []
        lazy: list[mx.array] = []
        for k, (idx, kind) in enumerate(self.output_map):
            if kind == 0:
                a = frame.t(idx)
                want = out_dtypes[k] if out_dtypes is not None and k < len(out_dtypes) else None
                if want is None and self.promote and a.dtype == mx.float32 and idx < len(self.metas) \
                        and self.metas[idx] is not None:
                    want = mx_dtype(self.metas[idx].scalarType)  # back to the declared half type
                if want is not None and a.dtype != want:
                    a = a.astype(want)
                outs.append(a)
                lazy.append(a)
            elif kind in (1, 2, 3):
                outs.append(frame.v(idx))
            else:
                raise MLXRuntimeError(f"output slot {idx}: unknown slot type {kind}")
        mx.eval(lazy + list(self.mutable.values()))
        self.calls += 1
        return outs

    def node_counts(self) -> dict[str, int]:
        return fb.node_counts(self.chains)
