"""Read facts out of a serialized ExecuTorch ``.pte`` without running it.

Uses ExecuTorch's own flatbuffer deserializer on the program part of the file
only: the extended header (``eh00`` at byte 8) gives the size of the flatbuffer
and where the segments start, so the (possibly multi-GB) segment data -- delegate
payloads, constants, named data -- is never read, only its sizes from the
program's segment table.

``inspect_pte(path)`` returns a JSON-serializable dict::

    {
      "file_size": int, "program_size": int, "file_identifier": "ET12", "version": int,
      "extended_header": {"program_size", "segment_base_offset", "segment_data_size"} | None,
      "methods": {name: {
          "num_inputs", "num_outputs",
          "inputs": [io], "outputs": [io],       # io: {"kind": "Tensor", "dtype", "sizes",
                                                 #      "dim_order", "shape_dynamism"} or
                                                 #     {"kind": "Int"|..., "value": ...}
          "operators": ["aten::addmm.out", ...],  # non-delegated kernels (plan operator table)
          "delegates": [{"backend_id", "location": "inline"|"segment", "index",
                         "payload_bytes", "compile_specs": [keys], "calls"}],
          "instructions": {"KernelCall", "DelegateCall", "other", "total", "by_kind": {...}},
          "num_values", "non_const_buffer_sizes"}},
      "constant_methods": {name: value},        # int/float/bool/str/list..., pytree-unflattened
      "segments": {"count", "total_bytes", "sizes": [...]},
      "constant_segment": {"segment_index", "num_tensors", "bytes"} | None,
      "constant_buffer": {"count", "bytes"},    # inline (legacy) constants
      "mutable_data": {"count", "bytes"},
      "named_data": {"count", "bytes", "keys": [...]} | None,
      "backend_delegate_data": {"count", "bytes"},  # inline delegate payloads
    }
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# The container reader is the runtime package's (our MLX runtime and ExecuTorch-runtime
# wrappers read constant methods with it too); this module reports on what it reads.
from mlx_runtime.pte import (DTYPE_NAMES as _DTYPE_NAMES, PteError as PTEInspectError,  # noqa: F401
                             constant_value as _constant_value, describe_value as _describe_value,
                             is_constant_method as _is_constant_method, read_program_bytes as _read_program_bytes,
                             unflatten as _unflatten, delegate_payloads)

__all__ = ["inspect_pte", "delegated_backends", "delegate_payloads", "non_delegated_ops", "PTEInspectError"]

def _op_name(op: Any) -> str:
    return f"{op.name}.{op.overload}" if op.overload else op.name


def inspect_pte(path: str | os.PathLike) -> dict:
    """Inspect a serialized ``.pte`` file; see the module docstring for the result."""
    from executorch.exir import schema as S
    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program

    data, file_size, eh = _read_program_bytes(path)
    try:
        program = _flatbuffer_to_program(data)
    except Exception as e:  # flatbuffers raises assorted errors on garbage
        raise PTEInspectError(f"{path}: cannot parse program flatbuffer: {e}") from e

    seg_sizes = [s.size for s in program.segments]

    def seg_size(i: int) -> int | None:
        return seg_sizes[i] if 0 <= i < len(seg_sizes) else None

    methods: dict[str, dict] = {}
    constant_methods: dict[str, Any] = {}
    for plan in program.execution_plan:
        if _is_constant_method(plan):
            leaves = [_constant_value(plan.values, i) for i in plan.outputs]
            constant_methods[plan.name] = _unflatten(leaves, plan.container_meta_type.encoded_out_str)
            continue

        by_kind: dict[str, int] = {}
        delegate_calls: dict[int, int] = {}
        for chain in plan.chains:
            for ins in chain.instructions:
                k = type(ins.instr_args).__name__
                by_kind[k] = by_kind.get(k, 0) + 1
                if isinstance(ins.instr_args, S.DelegateCall):
                    di = ins.instr_args.delegate_index
                    delegate_calls[di] = delegate_calls.get(di, 0) + 1
        n_kernel = by_kind.get("KernelCall", 0)
        n_deleg = by_kind.get("DelegateCall", 0)
        total = sum(by_kind.values())

        delegates = []
        for di, d in enumerate(plan.delegates):
            ref = d.processed
            if ref.location == S.DataLocation.INLINE:
                loc = "inline"
                bdd = program.backend_delegate_data
                payload = len(bdd[ref.index].data) if 0 <= ref.index < len(bdd) else None
            else:
                loc = "segment"
                payload = seg_size(ref.index)
            delegates.append(
                {
                    "backend_id": d.id,
                    "location": loc,
                    "index": ref.index,
                    "payload_bytes": payload,
                    "compile_specs": [cs.key for cs in d.compile_specs],
                    "calls": delegate_calls.get(di, 0),
                }
            )

        methods[plan.name] = {
            "num_inputs": len(plan.inputs),
            "num_outputs": len(plan.outputs),
            "inputs": [_describe_value(plan.values, i) for i in plan.inputs],
            "outputs": [_describe_value(plan.values, i) for i in plan.outputs],
            "operators": [_op_name(op) for op in plan.operators],
            "delegates": delegates,
            "instructions": {
                "KernelCall": n_kernel,
                "DelegateCall": n_deleg,
                "other": total - n_kernel - n_deleg,
                "total": total,
                "by_kind": by_kind,
            },
            "num_values": len(plan.values),
            "non_const_buffer_sizes": list(plan.non_const_buffer_sizes),
        }

    cs = program.constant_segment
    constant_segment = None
    if cs is not None and cs.offsets:
        constant_segment = {
            "segment_index": cs.segment_index,
            # offsets[0] is the reserved empty entry for non-constant tensors.
            "num_tensors": max(len(cs.offsets) - 1, 0),
            "bytes": seg_size(cs.segment_index),
        }
    mutable = program.mutable_data_segments or []
    named = program.named_data
    named_data = None
    if named:
        named_segs = {n.segment_index for n in named}
        named_data = {
            "count": len(named),
            "bytes": sum(seg_size(i) or 0 for i in named_segs),
            "keys": [n.key for n in named],
        }

    return {
        "path": str(path),
        "file_size": file_size,
        "program_size": len(data),
        "file_identifier": data[4:8].decode("ascii", "replace"),
        "version": program.version,
        "extended_header": None
        if eh is None
        else {
            "program_size": eh.program_size,
            "segment_base_offset": eh.segment_base_offset,
            "segment_data_size": eh.segment_data_size,
        },
        "methods": methods,
        "constant_methods": constant_methods,
        "segments": {"count": len(seg_sizes), "total_bytes": sum(seg_sizes), "sizes": seg_sizes},
        "constant_segment": constant_segment,
        "constant_buffer": {
            "count": len(program.constant_buffer),
            "bytes": sum(len(b.storage) for b in program.constant_buffer),
        },
        "mutable_data": {
            "count": len(mutable),
            "bytes": sum(seg_size(m.segment_index) or 0 for m in mutable),
        },
        "named_data": named_data,
        "backend_delegate_data": {
            "count": len(program.backend_delegate_data),
            "bytes": sum(len(b.data) for b in program.backend_delegate_data),
        },
    }


def delegated_backends(info: dict) -> set[str]:
    """Backend ids of every delegate called anywhere in the program."""
    return {d["backend_id"] for m in info["methods"].values() for d in m["delegates"]}


def non_delegated_ops(info: dict, method: str = "forward") -> list[str]:
    """Operators ``method`` runs outside any delegate, as ``name.overload``."""
    try:
        return list(info["methods"][method]["operators"])
    except KeyError:
        raise KeyError(f"no method {method!r}; have {sorted(info['methods'])}") from None


# --------------------------------------------------------------------------- `mlxbuild inspect`


def delegate_nodes(path: str | os.PathLike, info: dict) -> dict[str, list]:
    """{method: [node counts of each delegate, or None]}: what runs inside each delegate,
    read from its payload (MLX through ``mlx_runtime``'s payload reader, XNNPACK
    through flatc and the XNNPACK schema)."""
    found: dict[str, list] = {}
    payloads: dict[str, list] = {}
    for method, m in info["methods"].items():
        found[method] = []
        for d in m["delegates"]:
            backend = d["backend_id"]
            reader = _NODE_READERS.get(backend)
            if backend not in payloads:
                payloads[backend] = delegate_payloads(path, backend) if reader else []
            blob = payloads[backend].pop(0) if payloads[backend] else None
            found[method].append(reader(blob) if blob is not None else None)
    return found


def _mlx_nodes(payload: bytes) -> dict | None:
    try:
        from mlx_runtime import fb
    except ImportError:  # mlx not installed: no payload reader on this host
        return None
    graph, _ = fb.read_payload(payload)
    return fb.node_counts(graph.instructionChains)


def _xnnpack_nodes(payload: bytes) -> dict | None:
    """XNNPACK node types of a payload: its flatbuffer (after the XNNHeader) turned into
    JSON by flatc with the installed executorch's XNNPACK schema."""
    import re
    import tempfile

    from executorch.backends.xnnpack.serialization import xnnpack_graph_serialize as ser
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    header = ser.XNNHeader.from_bytes(payload[:ser.XNNHeader.EXPECTED_LENGTH])
    if not header.is_valid():
        return None
    graph = payload[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size]
    with tempfile.TemporaryDirectory(prefix="mlxbuild-xnn-") as tmp:
        (Path(tmp) / "graph.bin").write_bytes(graph)
        _flatc_decompile(tmp, str(Path(ser.__file__).with_name("schema.fbs")), str(Path(tmp) / "graph.bin"),
                         ["--raw-binary"])
        text = (Path(tmp) / "graph.json").read_text()
    # flatc writes non-finite floats (clamp bounds) bare, which JSON does not allow.
    text = re.sub(r":\s*(-?)inf\b", r': "\1inf"', re.sub(r":\s*(-?)nan\b", r': "nan"', text))
    counts: dict[str, int] = {}
    for node in json.loads(text).get("xnodes") or []:
        name = str(node.get("xnode_union_type", "?")).removeprefix("XNN")
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


# backend id -> reader of its payload's node counts
_NODE_READERS = {"MLXBackend": _mlx_nodes, "XnnpackBackend": _xnnpack_nodes}


def sibling_record(path: str | os.PathLike) -> Path | None:
    """The artifact's metadata record: the ``.json`` with the same stem beside it."""
    rec = Path(path).with_suffix(".json")
    return rec if rec.is_file() else None


def report(path: str | os.PathLike) -> dict:
    """`inspect_pte` plus what runs inside each delegate and the metadata record beside
    the file (``record``; ``record_matches``: its sha256 is this file's)."""
    from mlxbuild.fingerprint import sha256_file

    info = inspect_pte(path)
    nodes = delegate_nodes(path, info)
    rec_path = sibling_record(path)
    record = None
    if rec_path is not None:
        try:
            record = json.loads(rec_path.read_text())
        except ValueError:
            record = None
    delegation = (record or {}).get("delegation") or {}
    for method, m in info["methods"].items():
        for i, d in enumerate(m["delegates"]):
            d["nodes"] = nodes[method][i]
        # The aten ops the build lowered into delegates (the record has them per method, not per delegate).
        m["lowered_ops"] = (delegation.get(method) or {}).get("delegated_ops") if record else None
    from backends.requirements import runtime_requirements

    beside = [p.name for p in sorted(Path(path).parent.glob(f"{Path(path).stem}*.ptd"))]
    info["runtime_requirements"] = runtime_requirements(info["methods"], beside)
    info["record_path"] = str(rec_path) if rec_path else None
    info["record"] = record
    info["record_matches"] = None if record is None else record.get("sha256") == sha256_file(path)
    return info


def render(info: dict) -> str:
    """The text form of :func:`report`."""
    out = [f"{info['path']}: {info['file_size']} bytes, program {info['program_size']} bytes, "
           f"{info['file_identifier']} v{info['version']}"]
    for name, m in info["methods"].items():
        out.append(f"method {name}:")
        for kind in ("inputs", "outputs"):
            for i, v in enumerate(m[kind]):
                out.append(f"  {kind[:-1]} {i}: {_value(v)}")
        for i, d in enumerate(m["delegates"]):
            out.append(f"  delegate {i}: {d['backend_id']}, payload {d['payload_bytes']} bytes ({d['location']}), "
                       f"{d['calls']} call(s)")
            if d.get("nodes"):
                out.append(f"    nodes ({sum(d['nodes'].values())}): {_counts(d['nodes'])}")
            elif d["backend_id"] == "MLXBackend":
                out.append("    nodes: not read (mlx is not installed)")
            else:
                out.append("    nodes: not read (mlxbuild has no reader for this backend's payload)")
        if m.get("lowered_ops"):
            out.append(f"  aten ops lowered into delegates (record): {_counts(m['lowered_ops'])}")
        ops = m["operators"]
        out.append(f"  portable kernels ({len(ops)}): {', '.join(ops) if ops else 'none'}")
        ins = m["instructions"]
        out.append(f"  instructions: {ins['total']} ({ins['KernelCall']} kernel calls, "
                   f"{ins['DelegateCall']} delegate calls)")
    if info["constant_methods"]:
        out.append("constant methods:")
        for k, v in info["constant_methods"].items():
            out.append(f"  {k} = {json.dumps(v)}")
    seg = info["segments"]
    out.append(f"segments: {seg['count']}, {seg['total_bytes']} bytes: {', '.join(map(str, seg['sizes']))}")
    if info.get("constant_segment"):
        cs = info["constant_segment"]
        out.append(f"constants: {cs['num_tensors']} tensors in segment {cs['segment_index']} ({cs['bytes']} bytes)")
    if info.get("named_data"):
        nd = info["named_data"]
        out.append(f"named data: {nd['count']} entries, {nd['bytes']} bytes")
    if info.get("runtime_requirements"):
        from backends.requirements import describe

        out.append("runtime requirements:")
        out.extend(f"  {line}" for line in describe(info["runtime_requirements"]))
    rec = info.get("record")
    if rec is None:
        out.append("record: none beside this file")
    else:
        v = rec.get("verification") or {}
        figures = (f"max abs error {v['max_abs_error']:.3g}, relative {v['max_rel_error']:.3g}"
                   if v.get("max_abs_error") is not None else v.get("check", "structural"))
        out.append(f"record: {info['record_path']}: {rec.get('name')} {rec.get('version')} target "
                   f"{rec.get('target')}, {rec.get('backend')} {rec.get('scheme')} {rec.get('dtype')}; "
                   f"sha256 {'matches' if info['record_matches'] else 'DOES NOT match'} this file; "
                   f"verification {'passed' if v.get('passed') else 'failed'} ({figures})")
    return "\n".join(out)


def _value(v: dict) -> str:
    if v.get("kind") == "Tensor":
        dyn = "" if v.get("shape_dynamism") == "STATIC" else f" ({str(v.get('shape_dynamism')).lower()})"
        return f"{v['dtype']}[{', '.join(map(str, v['sizes']))}]{dyn}"
    return f"{v.get('kind')} {json.dumps(v.get('value'))}" if "value" in v else str(v.get("kind"))


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} ×{n}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def main(path: str, as_json: bool = False) -> int:
    """`mlxbuild inspect ART.pte [--json]`."""
    import sys

    from mlxbuild.progress import quiet_libraries

    quiet_libraries()
    try:
        info = report(path)
    except (PTEInspectError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1, default=str) if as_json else render(info))
    return 0


if __name__ == "__main__":  # pragma: no cover - python -m mlxbuild.pte_inspect FILE.pte
    import sys

    for p in sys.argv[1:]:
        print(json.dumps(inspect_pte(Path(p)), indent=1))
