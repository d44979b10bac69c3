"""The ExecuTorch ``.pte`` container, read without running it: the program flatbuffer
(only the program part of the file: the extended header says where segments start,
so multi-GB segment data is never read), its values and its constant methods.

Shared by this runtime, the ExecuTorch-runtime wrapper (``backends.et_runtime``) and
``mlxbuild inspect``; uses ExecuTorch's own flatbuffer deserializer.
"""

from __future__ import annotations

import math
import os
from typing import Any


# Bytes of the file head that hold the flatbuffer root offset, the file
# identifier and the extended header (executorch: _ExtendedHeader.NUM_HEAD_BYTES).
_NUM_HEAD_BYTES = 64

# ExecuTorch ScalarType names -> torch dtype names.
DTYPE_NAMES = {
    "BYTE": "uint8",
    "CHAR": "int8",
    "SHORT": "int16",
    "INT": "int32",
    "LONG": "int64",
    "HALF": "float16",
    "FLOAT": "float32",
    "DOUBLE": "float64",
    "COMPLEX32": "complex32",
    "COMPLEX64": "complex64",
    "COMPLEX128": "complex128",
    "BOOL": "bool",
    "QINT8": "qint8",
    "QUINT8": "quint8",
    "QINT32": "qint32",
    "BFLOAT16": "bfloat16",
    "QUINT4x2": "quint4x2",
    "QUINT2x4": "quint2x4",
    "BITS16": "bits16",
    "FLOAT8E5M2": "float8_e5m2",
    "FLOAT8E4M3FN": "float8_e4m3fn",
    "FLOAT8E5M2FNUZ": "float8_e5m2fnuz",
    "FLOAT8E4M3FNUZ": "float8_e4m3fnuz",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
}


class PteError(ValueError):
    """The file is not a readable ExecuTorch program."""


def read_program_bytes(path: str | os.PathLike) -> tuple[bytes, int, Any]:
    """Return (flatbuffer bytes, file size, extended header or None)."""
    from executorch.exir._serialize._program import _ExtendedHeader

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(_NUM_HEAD_BYTES)
        if len(head) < 8 or head[4:6] != b"ET":
            raise PteError(f"{path}: not an ExecuTorch program (file identifier {head[4:8]!r})")
        eh = None
        if len(head) >= 8 + _ExtendedHeader.EXPECTED_LENGTH:
            cand = _ExtendedHeader.from_bytes(head[8:])
            if cand.is_valid():
                eh = cand
        program_size = eh.program_size if eh is not None else size
        if program_size > size:
            raise PteError(f"{path}: truncated (program size {program_size} > file size {size})")
        f.seek(0)
        data = f.read(program_size)
    return data, size, eh


def _enum_name(v: Any) -> Any:
    return v.name if hasattr(v, "name") else v


def _scalar(v: Any) -> Any:
    """Make a decoded primitive JSON-friendly (non-finite doubles become strings)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def describe_value(values: list, idx: int, _depth: int = 0) -> dict:
    """Describe values[idx] (an EValue) as a JSON-friendly dict."""
    from executorch.exir import schema as S

    if idx < 0 or idx >= len(values):
        return {"kind": "Invalid", "index": idx}
    val = values[idx].val
    kind = type(val).__name__
    if isinstance(val, S.Tensor):
        st = _enum_name(val.scalar_type)
        return {
            "kind": "Tensor",
            "dtype": DTYPE_NAMES.get(st, str(st).lower()),
            "sizes": list(val.sizes),
            "dim_order": list(val.dim_order),
            "shape_dynamism": _enum_name(val.shape_dynamism),
        }
    out: dict[str, Any] = {"kind": kind}
    if isinstance(val, S.Int):
        out["value"] = val.int_val
    elif isinstance(val, S.Bool):
        out["value"] = bool(val.bool_val)
    elif isinstance(val, S.Double):
        d = val.double_val
        out["value"] = _scalar(float(d)) if not isinstance(d, str) else d
    elif isinstance(val, S.String):
        out["value"] = val.string_val
    elif isinstance(val, (S.DoubleList, S.BoolList)):
        out["value"] = [_scalar(x) for x in val.items]
    elif isinstance(val, S.IntList):
        # Boxed list: items are indices of Int EValues (see exir emitter _emit_int_list).
        out["value"] = [
            describe_value(values, i, _depth + 1).get("value") if _depth < 4 else None for i in val.items
        ]
    elif isinstance(val, S.TensorList):
        out["items"] = [describe_value(values, i, _depth + 1) if _depth < 4 else {"index": i} for i in val.items]
    return out


def constant_value(values: list, idx: int) -> Any:
    d = describe_value(values, idx)
    if d["kind"] == "Tensor":
        return {k: d[k] for k in ("kind", "dtype", "sizes")}
    return d.get("value")


def unflatten(leaves: list, encoded_out_str: str) -> Any:
    """Rebuild a constant method's return value from its flattened outputs."""
    try:
        from torch.utils import _pytree as pytree

        spec = pytree.treespec_loads(encoded_out_str)
        if spec.num_leaves == len(leaves):
            return pytree.tree_unflatten(leaves, spec)
    except Exception:  # noqa: BLE001 - fall back to a shape-only guess
        pass
    return leaves[0] if len(leaves) == 1 else list(leaves)


def is_constant_method(plan: Any) -> bool:
    return (
        not plan.inputs
        and not plan.operators
        and not plan.delegates
        and all(not c.instructions for c in plan.chains)
    )


def load(path: str | os.PathLike):
    """``(program, file size, extended header or None)``: the parsed program flatbuffer."""
    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program

    data, size, eh = read_program_bytes(path)
    try:
        return _flatbuffer_to_program(data), size, eh
    except Exception as e:  # noqa: BLE001 - flatbuffers raises assorted errors on garbage
        raise PteError(f"{path}: cannot parse program flatbuffer: {e}") from e


def constant_methods(program) -> dict[str, Any]:
    """{name: value} of a parsed program's constant methods (pytree-unflattened)."""
    out = {}
    for plan in program.execution_plan:
        if is_constant_method(plan):
            leaves = [constant_value(plan.values, i) for i in plan.outputs]
            out[plan.name] = unflatten(leaves, plan.container_meta_type.encoded_out_str)
    return out


def input_dtype(program, method: str, index: int = 0) -> str | None:
    """The torch dtype name of a method's tensor input, or None when it is not a tensor."""
    for plan in program.execution_plan:
        if plan.name == method:
            d = describe_value(plan.values, plan.inputs[index])
            return d.get("dtype") if d.get("kind") == "Tensor" else None
    raise KeyError(f"no method {method!r}")


def output_dtype(program, method: str, index: int = 0) -> str | None:
    """The torch dtype name of a method's tensor output, or None when it is not a tensor."""
    for plan in program.execution_plan:
        if plan.name == method:
            d = describe_value(plan.values, plan.outputs[index])
            return d.get("dtype") if d.get("kind") == "Tensor" else None
    raise KeyError(f"no method {method!r}")


def delegate_payloads(path: str | os.PathLike, backend_id: str) -> list[bytes]:
    """The processed payload of every delegate of ``backend_id``, in program order
    (reads only those bytes of the file)."""
    from executorch.exir import schema as S
    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program

    data, _, eh = read_program_bytes(path)
    program = _flatbuffer_to_program(data)
    base = eh.segment_base_offset if eh is not None else 0
    blobs = []
    with open(path, "rb") as f:
        for plan in program.execution_plan:
            for d in plan.delegates:
                if d.id != backend_id:
                    continue
                ref = d.processed
                if ref.location == S.DataLocation.INLINE:
                    blobs.append(bytes(program.backend_delegate_data[ref.index].data))
                    continue
                seg = program.segments[ref.index]
                f.seek(base + seg.offset)
                blobs.append(f.read(seg.size))
    return blobs
