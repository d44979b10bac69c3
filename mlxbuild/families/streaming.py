"""A Hugging Face weights folder read a piece at a time, so no step holds the float model.

``layout`` builds the model on the meta device (no memory for its tensors) with the same
preparation ``hf.load_model`` applies, computes the non-persistent buffers (rotary
frequencies) by the architecture's own ``_init_weights``, and returns a ``Checkpoint``
whose ``pieces`` materialize one decoder layer (then the rest) at a time from the
safetensors files. The quantize step quantizes each piece as it arrives; export and the
reference load the quantized state onto the layout and read only what it lacks.

Streaming is used where it reproduces ``from_pretrained`` tensor for tensor: the folder's
tensor names and shapes are the model's own (no weight conversion: fused MoE experts are
renamed on load, so such checkpoints take the whole-model path), and no module is kept in
float32 against the requested dtype (``_keep_in_fp32_modules``). ``layout`` returns None
otherwise, and the caller loads the whole model as before. ``MLXBUILD_STREAMING=never``
takes the whole-model path everywhere: a way to rule streaming out when a build goes
wrong, not a choice of output (both paths give the same bytes, so it is in no cache key;
``tests/test_streaming.py`` compares them).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from mlxbuild.families.hf import DTYPES, prepare, auto_model_class


class Checkpoint:
    """The safetensors files of a weights folder, by tensor name.

    Tensors are read with plain file reads into memory of their own, not through the
    safetensors package: its torch loader maps the whole file, and (safetensors 0.8) the
    maps outlive the handle and the tensors, so every page a piece touched stayed in the
    process's resident set until the end (measured: the quantize step grew by each layer's
    float bytes). The format is an 8-byte header length, a JSON header with each tensor's
    dtype, shape and byte range, then the data; ``stages.weights`` writes it the same way."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        self.folder, self.dtype = Path(folder), dtype
        self.where: dict[str, tuple[str, torch.dtype, tuple, int, int]] = {}
        for path in checkpoint_files(self.folder):
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            start = 8 + size
            for name, info in header.items():
                if name != "__metadata__":
                    a, b = info["data_offsets"]
                    self.where[name] = (path.name, DTYPES_BY_TAG[info["dtype"]], tuple(info["shape"]),
                                        start + a, b - a)

    @property
    def shapes(self) -> dict[str, tuple]:
        return {name: w[2] for name, w in self.where.items()}

    def read(self, names) -> dict[str, torch.Tensor]:
        """The tensors ``names``, floating ones in the build's dtype."""
        out = {}
        handles = {}
        try:
            for name in names:
                file_name, dt, shape, offset, nbytes = self.where[name]
                if file_name not in handles:
                    handles[file_name] = open(self.folder / file_name, "rb", buffering=0)
                t = torch.empty(shape, dtype=dt)
                if nbytes:
                    view = memoryview(t.view(-1).view(torch.uint8).numpy())
                    done = 0
                    while done < nbytes:
                        n = os.preadv(handles[file_name].fileno(), [view[done:]], offset + done)
                        if n <= 0:
                            raise OSError(f"{file_name}: {name} ends past the end of the file")
                        done += n
                out[name] = t.to(self.dtype) if t.is_floating_point() else t
        finally:
            for h in handles.values():
                h.close()
        return out


def checkpoint_files(folder: Path) -> list[Path]:
    """The files from_pretrained reads: those the shard index names, else model.safetensors
    (a hub folder may hold others, e.g. Mistral's consolidated.safetensors under other names)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []


ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}
DTYPES_BY_TAG = {tag: dt for dt, tag in ST_DTYPES.items()}


def layout(weights_dir: Path, dtype: str, attn_implementation: str | None = None):
    """(model on the meta device, its Checkpoint), or None where streaming doesn't apply."""
    weights_dir = Path(weights_dir)
    if os.environ.get("MLXBUILD_STREAMING", "auto") == "never":
        return None
    meta = json.loads((weights_dir / "source.json").read_text())
    if "module" in meta["load"] or not (weights_dir / "config.json").is_file():
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(weights_dir)
    kwargs = {"dtype": DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device("meta"):
        model = auto_model_class(weights_dir).from_config(config, **kwargs)
    if (model._keep_in_fp32_modules_strict and DTYPES[dtype] in (torch.float16, torch.bfloat16)) \
            or (model._keep_in_fp32_modules and DTYPES[dtype] == torch.float16):
        return None
    # from_pretrained ties the output head to the embedding after loading; from_config on
    # the meta device leaves some architectures (Gemma 3) untied.
    model.tie_weights()
    prepare(model).eval()
    if model.can_generate() and (weights_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(weights_dir)
    checkpoint = Checkpoint(weights_dir, DTYPES[dtype])
    wanted = checkpoint_tensors(model)
    if any(checkpoint.shapes.get(n) != tuple(t.shape) for n, t in wanted.items()):
        return None  # renamed or reshaped on load (a weight conversion): not ours to redo
    for module in model.modules():
        computed = [n for n, b in module.named_buffers(recurse=False)
                    if n in module._non_persistent_buffers_set and b.is_meta]
        if computed:
            # Only the buffers leave the meta device: the module's parameters (Gemma 3's
            # scaled embedding has both) stay there for the checkpoint, and the init's
            # writes into them are no-ops.
            for n in computed:
                module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
            with torch.no_grad():
                model._init_weights(module)
    return model, checkpoint


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of ``model``: persistent tensors, a tied one once."""
    first, out = {}, {}
    for n, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), n)
    for n, t in model.state_dict(keep_vars=True).items():
        if first.get(id(t), n) == n:
            out[n] = t
    return out


def _aliases(model) -> dict[str, list[str]]:
    """{name a checkpoint holds: every parameter name sharing that tensor}."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return {names[0]: names for names in by_id.values()}


def materialize(model, checkpoint: Checkpoint, names=None) -> None:
    """Read every tensor of ``model`` still on the meta device (within the modules ``names``)
    from the checkpoint, a tied tensor once for all its names."""
    aliases = _aliases(model)
    wanted = [full for full, t in checkpoint_tensors(model).items()
              if t.is_meta and (names is None or full.rpartition(".")[0] in names)]
    for full, value in checkpoint.read(wanted).items():
        for alias in aliases.get(full, [full]):
            mod_name, _, a = alias.rpartition(".")
            module = model.get_submodule(mod_name)
            if a in module._parameters:
                module._parameters[a] = torch.nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[a] = value


def pieces(model, checkpoint: Checkpoint):
    """Materialize the model a piece at a time (the pieces synthetic weights are generated
    in); yield each piece's module names once its tensors are read."""
    for _prefix, modules in split(model):
        names = {n for n, _ in modules}
        materialize(model, checkpoint, names)
        yield names
        trim()  # the piece's float tensors, freed as it was quantized


def split(model) -> list[tuple[str, list]]:
    """The model cut into pieces each initialized and written on its own: every element of
    each outermost ModuleList (the layers), then everything else."""
    lists = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and name and not any(name.startswith(o + ".") for o in lists):
            lists.append(name)
    pieces, inside = [], set()
    for ln in lists:
        for i, layer in enumerate(model.get_submodule(ln)):
            prefix = f"{ln}.{i}"
            mods = [(f"{prefix}.{n}" if n else prefix, m) for n, m in layer.named_modules()]
            pieces.append((prefix, mods))
            inside.update(n for n, _ in mods)
    rest = [(n, m) for n, m in model.named_modules() if n not in inside]
    pieces.append(("", rest))
    return pieces


def trim() -> None:
    """Hand freed heap memory back to the system. A piece's tensors (a few MB to tens of MB
    each, fp32 then cast) are below glibc's mmap threshold once it has adapted, so they come
    from the heap, whose holes don't fit the next piece: without this the resident size grew
    by most of a layer per layer (measured on Qwen3-0.6B's shapes, both when generating
    synthetic weights and when quantizing a piece at a time)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only; elsewhere nothing to do
        libc.malloc_trim(0)


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
