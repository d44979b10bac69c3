"""Core ML: Apple's delegate (CPU, GPU, Neural Engine), converted with coremltools.

Export flavour ``plain`` (transformers' StaticCache, plain SDPA), as ExecuTorch's LLM
export does for Core ML below iOS 18: the partitioner delegates attention and the
projections, while the cache writes stay outside as portable ``index_copy`` kernels
(ExecuTorch's open-source Core ML runtime does not keep state, so the partitioner must
not take over mutable buffers). ExecuTorch's ``llama::`` custom ops would not lower
into Core ML at all.

Lowering runs on Linux (coremltools converts and serializes the model). The Core ML
runtime exists only on Apple platforms, so programs are checked structurally: the
delegate is called and its payload holds a Core ML model coremltools can read back.

A Core ML payload carries a model identifier (the on-device compiled-model cache is
keyed by it) that ExecuTorch draws from ``uuid.uuid4()``, and the ``.mlpackage`` it
contains names its items with random UUIDs too. :func:`_reproducible` replaces both
with values derived from the payload's content, so equal inputs give equal bytes.
"""

from __future__ import annotations

NAME = "coreml"
FLAVOUR = "plain"
VERIFY = "structural"
BACKEND_ID = "CoreMLBackend"
TITLE = "Core ML"


# The StaticCache writes (index_copy_ on the cache buffers, index_put in the edge
# dialect): coremltools cannot convert them with a dynamic position, and they must
# stay outside anyway since the partitioner does not own the cache buffers.
KEEP_OUT = ("aten.index_put.default", "aten.index_copy.default")


# The export runs the flavour's own hooks (backends.flavour); plain is portable's.

def partitioner(options: dict, methods: int = 1):
    import coremltools as ct
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    from backends.capabilities import CoremlOptions

    opts = CoremlOptions.model_validate(options)
    units = {"cpu_only": ct.ComputeUnit.CPU_ONLY, "cpu_and_gpu": ct.ComputeUnit.CPU_AND_GPU,
             "cpu_and_ne": ct.ComputeUnit.CPU_AND_NE, "all": ct.ComputeUnit.ALL}[opts.compute_units]
    precision = {"fp16": ct.precision.FLOAT16, "fp32": ct.precision.FLOAT32}[opts.precision]
    model_type = {"model": CoreMLBackend.MODEL_TYPE.MODEL,
                  "compiled_model": CoreMLBackend.MODEL_TYPE.COMPILED_MODEL}[opts.model_type]
    specs = CoreMLBackend.generate_compile_specs(
        compute_unit=units, minimum_deployment_target=ct.target[opts.minimum_deployment_target],
        compute_precision=precision, model_type=model_type)
    if methods > 1:
        # ExecuTorch shares weights between methods partition by partition (POSITIONAL),
        # which needs the same partitions in every method; a program's methods here are
        # different networks (an encoder, an embedding, a decoder) with nothing to share.
        from executorch.backends.apple.coreml.compiler.coreml_preprocess import (
            MULTIMETHOD_WEIGHT_SHARING_STRATEGY,
        )

        specs.append(CoreMLBackend.generate_multimethod_weight_sharing_strategy_compile_spec(
            MULTIMETHOD_WEIGHT_SHARING_STRATEGY.DISABLED))
    # ExecuTorch's open-source Core ML runtime does not handle state: leave the
    # KV-cache buffers to portable kernels (as ExecuTorch's LLM export does).
    return CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=False,
                             skip_ops_for_coreml_delegation=list(KEEP_OUT))


def size_per_user(graph_module):
    """Give every user of a symbolic size (``aten.sym_size``: the dynamic prefill length)
    its own copy of the size node.

    Core ML programs take tensors only: a partition that reads a size computed in
    another partition gets a SymInt input, which coremltools refuses. With a copy
    beside each user, every Core ML partition measures the tensor itself (coremltools
    converts ``sym_size``), so no size crosses a partition boundary."""
    import torch
    from torch.fx.passes.infra.pass_base import PassResult

    graph, changed = graph_module.graph, False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.sym_size.int:
            continue
        for user in list(node.users)[1:]:
            with graph.inserting_before(user):
                copy = graph.call_function(node.target, node.args, node.kwargs)
            copy.meta = dict(node.meta)
            user.replace_input_with(node, copy)
            changed = True
    if changed:
        graph.lint()
        graph_module.recompile()
    return PassResult(graph_module, changed)


def lower(programs: dict, options: dict, constant_methods: dict, etrecord: bool = False):
    from backends.lowering import to_executorch

    from backends.capabilities import CoremlOptions

    if CoremlOptions.model_validate(options).model_type == "compiled_model":
        _needs_macos()
    return to_executorch(programs, [partitioner(options, len(programs))], constant_methods,
                         transform_passes=[size_per_user], cpu_kernels=True,
                         edit_edge=reproducible_payloads, etrecord=etrecord)


def _needs_macos() -> None:
    import platform

    if platform.system() != "Darwin":
        from backends.errors import BackendError

        raise BackendError("coreml model_type 'compiled_model' needs macOS (Core ML's model "
                         "compiler exists only there); use model_type: model on this host")


# --------------------------------------------------------------------------- reproducible bytes


def reproducible_payloads(edge) -> None:
    """Rewrite every Core ML payload of the lowered ``edge`` program so that it names
    nothing at random (see the module docstring); called before the program is emitted.

    There is no supported knob: ExecuTorch draws the identifier from ``uuid.uuid4()`` in
    ``CoreMLBackend.preprocess_model``, coremltools' package writer draws item ids the
    same way, and protobuf serializes the model's metadata map in hash order. The payload
    is a flattened directory, so it is unpacked, normalised and packed again with
    ExecuTorch's own ``executorchcoreml`` helpers; the model itself is not touched."""
    from executorch.exir.lowered_backend_module import get_lowered_submodules

    for method in edge.methods:
        for _, lowered, _ in get_lowered_submodules(edge.exported_program(method).graph_module):
            if lowered.backend_id == BACKEND_ID:
                lowered._processed_bytes = _normalised(lowered.processed_bytes)


def _normalised(blob: bytes) -> bytes:
    import hashlib
    import json
    import tempfile
    import uuid
    from pathlib import Path

    from executorch.backends.apple.coreml import executorchcoreml

    with tempfile.TemporaryDirectory(prefix="mlxbuild-coreml-") as tmp:
        # The payload packs ExecuTorch's "lowered_module" directory, name included.
        if not executorchcoreml.unflatten_directory_contents(blob, tmp):
            raise ValueError("cannot unpack a Core ML payload")
        (root,) = Path(tmp).iterdir()
        for spec_file in root.glob("model.mlpackage/Data/*/model.mlmodel"):
            _canonical_spec(spec_file)
        # The content digest: every file but the two that carry the random names.
        digest = hashlib.sha256()
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            if f.name not in ("metadata.json", "Manifest.json"):
                digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())

        def stable_uuid(what: str) -> str:
            return str(uuid.UUID(hashlib.sha256(digest.digest() + what.encode()).hexdigest()[:32]))

        for manifest in root.glob("model.mlpackage/Manifest.json"):
            data = json.loads(manifest.read_text())
            renamed = {old: stable_uuid(entry["path"]) for old, entry in data["itemInfoEntries"].items()}
            data["itemInfoEntries"] = {renamed[k]: v for k, v in data["itemInfoEntries"].items()}
            data["rootModelIdentifier"] = renamed.get(data["rootModelIdentifier"], data["rootModelIdentifier"])
            manifest.write_text(json.dumps(data, indent=4, sort_keys=True))
        meta = root / "metadata.json"
        data = json.loads(meta.read_text())
        data["identifier"] = "executorch_" + stable_uuid("identifier")
        meta.write_text(json.dumps(data))
        return executorchcoreml.flatten_directory_contents(str(root))


def _canonical_spec(path) -> None:
    """The model spec serialized deterministically, without its conversion date."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(path.read_bytes())
    spec.description.metadata.userDefined.pop("com.github.apple.coremltools.conversion_date", None)
    path.write_bytes(spec.SerializeToString(deterministic=True))


# --------------------------------------------------------------------------- verification


def payload_problem(blob: bytes) -> str:
    """"" when ``blob`` unpacks to a Core ML model coremltools can read, else what is wrong."""
    import json
    import tempfile
    from pathlib import Path

    from executorch.backends.apple.coreml import executorchcoreml

    with tempfile.TemporaryDirectory(prefix="mlxbuild-coreml-") as tmp:
        try:
            unpacked = executorchcoreml.unflatten_directory_contents(blob, tmp)
        except RuntimeError as e:
            return f"not a Core ML delegate payload (cannot unpack it: {e})"
        if not unpacked:
            return "not a Core ML delegate payload (cannot unpack it)"
        dirs = list(Path(tmp).iterdir())
        if len(dirs) != 1 or not dirs[0].is_dir():
            return "not a Core ML delegate payload (expected one model directory)"
        root = dirs[0]
        meta = root / "metadata.json"
        if not meta.is_file():
            return "no metadata.json"
        identifier = json.loads(meta.read_text()).get("identifier", "")
        package, compiled = root / "model.mlpackage", root / "model.mlmodelc"
        if package.is_dir():
            import coremltools as ct

            try:
                spec = ct.utils.load_spec(str(package))
            except Exception as e:
                return f"model.mlpackage does not load: {e}"
            if not spec.WhichOneof("Type"):
                return "model.mlpackage holds an empty model"
        elif not compiled.is_dir():
            return "neither model.mlpackage nor model.mlmodelc in the payload"
        if not identifier:
            return "metadata.json names no model identifier"
    return ""


