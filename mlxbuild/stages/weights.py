"""The weights as one Hugging Face folder: a local (or hub-cached) checkpoint's own files,
hard-linked into the entry (copied across filesystems) rather than loaded and saved again, so
no step holds a model to make it and the disk holds it once; the steps that load it convert
to the dtype they build in.

Synthetic weights are generated a piece at a time, never as a whole model: the model is laid
out on the meta device, and each decoder (or encoder) layer, then the rest, is materialized,
initialized by the architecture's own Hugging Face ``_init_weights`` and written into
safetensors shards in the manifest's dtype. Each module draws from a seed derived from the
manifest's seed and the module's name, so a tensor's bytes depend on neither the order of
generation nor the other tensors. Module sources are built whole (a user's own module) in
the manifest's dtype."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from mlxbuild.families.hf import DTYPES, build_module
from mlxbuild.families.streaming import ST_DTYPES, checkpoint_tensors, split, trim
from mlxbuild.steps import WeightsParams



def run(params: WeightsParams, cache, out: Path) -> dict:
    load, dtype = params.load, DTYPES[params.dtype]
    if "synthetic" in load:
        count = write_synthetic(load["synthetic"], dtype, out)
        (out / "source.json").write_text(json.dumps({"load": load, "dtype": params.dtype}))
        return {"parameters": count}
    elif "path" in load:
        count = _reference_checkpoint(Path(load["path"]), out)
        (out / "source.json").write_text(json.dumps({"load": load, "dtype": params.dtype}))
        return {"parameters": count}
    elif "module" in load:
        from safetensors.torch import save_model

        torch.manual_seed(0)
        model = build_module(load).to(dtype)
        save_model(model, str(out / "model.safetensors"))
    (out / "source.json").write_text(json.dumps({"load": load, "dtype": params.dtype}))
    return {"parameters": sum(p.numel() for p in model.parameters())}


SHARD_BYTES = 2 * 2**30  # most per safetensors file (a tensor is never split); a tensor never waits for its shard


def synthetic_layout(recipe: dict):
    """The synthetic model on the meta device (no memory for its tensors)."""
    import transformers
    from transformers import AutoConfig

    from mlxbuild.families import auto_class_name, model_type_of

    config = AutoConfig.for_model(model_type_of(recipe["architecture"]), **recipe["config"])
    auto = getattr(transformers, auto_class_name(config.model_type))
    with torch.device("meta"):
        return auto.from_config(config, dtype=torch.float32)


def synthetic_tensors(recipe: dict, dtype, model=None, reverse: bool = False):
    """Yield (name, tensor) for every tensor a checkpoint of the synthetic model holds, in
    ``dtype``, one piece of the model at a time (``reverse``: the pieces in the opposite
    order, which must not change any tensor). Names and layout are the checkpoint's, as
    ``save_pretrained`` writes them (a tied tensor once; fused MoE experts split back)."""
    model = synthetic_layout(recipe) if model is None else model
    channels = None
    if recipe.get("outliers"):
        hidden = model.config.get_text_config().hidden_size
        gen = torch.Generator().manual_seed(recipe["seed"] + 1)
        channels = torch.randperm(hidden, generator=gen)[:recipe["outliers"]["channels"]]
    saved = set(checkpoint_tensors(model))
    pieces = split(model)
    init = _initializers(model)
    for _prefix, modules in (reversed(pieces) if reverse else pieces):
        # Children before parents, as Hugging Face's init applies: a parent's init may
        # overwrite a child's tensor (Whisper's encoder writes its sinusoids so).
        for name, module in reversed(modules):
            own = [n for n, _ in module.named_parameters(recurse=False)] + \
                  [n for n, _ in module.named_buffers(recurse=False)]
            if own:
                module.to_empty(device="cpu", recurse=False)
            # (a module with no tensors of its own is initialized too: its init may write
            # into its children's, here already materialized)
            torch.manual_seed(_seed(recipe["seed"], name))
            with torch.no_grad():
                init(name)(module)
                if channels is not None and type(module).__name__.endswith("RMSNorm") \
                        and tuple(module.weight.shape) == (hidden,):
                    module.weight[channels] *= recipe["outliers"]["scale"]
                # Cast at once: a later parent's init copies into it in the target dtype.
                for n in own:
                    t = getattr(module, n)
                    if t is not None and t.is_floating_point():
                        t.data = t.data.to(dtype)
        yield from _checkpoint_state(model, modules, saved).items()
        for _name, module in modules:
            module.to_empty(device="meta", recurse=False)  # give the memory back
        trim()


def _initializers(model):
    """name -> the ``_init_weights`` that transformers' own initialization applies to that
    module: the innermost pretrained model holding it (its ``smart_apply`` hands each
    sub-model's modules to that sub-model's init). A composite model's own init does not
    know its towers' modules: LLaVA's leaves CLIP's class embedding as allocated, and
    initializes its Llama decoder with the composite's config."""
    from transformers import PreTrainedModel

    owners = sorted(((n, m) for n, m in model.named_modules() if isinstance(m, PreTrainedModel)),
                    key=lambda item: -len(item[0]))

    def init(name: str):
        for prefix, owner in owners:
            if not prefix or name == prefix or name.startswith(prefix + "."):
                return owner._init_weights
        return model._init_weights

    return init


def _checkpoint_state(model, modules, saved: set[str]) -> dict:
    """A piece's tensors under the checkpoint's names (Hugging Face's reverse of the
    conversions it applies when loading, as save_pretrained does shard by shard)."""
    from transformers.core_model_loading import revert_weight_conversion

    state = {}
    for name, module in modules:
        for n, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            full = f"{name}.{n}" if name else n
            if full in saved:
                state[full] = t.detach()
    return dict(revert_weight_conversion(model, state)) if state else {}


def _seed(seed: int, name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def write_synthetic(recipe: dict, dtype, out: Path) -> int:
    """Write the synthetic model as a Hugging Face folder (config, generation config,
    safetensors shards and, for several, their index); return its parameter count.

    Every tensor's shape is known from the meta layout, so each shard's header is written
    first and each tensor goes to its place as it is generated: nothing waits in memory for
    its shard to fill. (The safetensors package writes a file from all its tensors at once,
    hence this writer; the files are read back through the package.)"""
    model = synthetic_layout(recipe)
    saved = set(checkpoint_tensors(model))
    layout = []  # (name, dtype, shape) in the order they are generated
    for _prefix, modules in split(model):
        for full, t in _checkpoint_state(model, modules, saved).items():
            layout.append((full, dtype if t.is_floating_point() else t.dtype, tuple(t.shape)))
    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in layout:
        nbytes = math.prod(entry[2]) * torch.empty((), dtype=entry[1]).element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((*entry, nbytes))
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    where = {}
    files = []
    try:
        for file_name, shard in zip(names, shards):
            f = open(out / file_name, "wb", buffering=0)
            files.append(f)
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, dt, shape, nbytes in shard:
                header[name] = {"dtype": ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the package writes
            f.write(len(raw).to_bytes(8, "little") + raw)
            start = f.tell()
            f.truncate(start + offset)
            for name, _, _, _ in shard:
                where[name] = (f, start + header[name]["data_offsets"][0])
        for name, tensor in synthetic_tensors(recipe, dtype, model):
            f, pos = where.pop(name)
            data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy
            done = 0
            while done < len(data):
                done += os.pwrite(f.fileno(), data[done:], pos + done)
    finally:
        for f in files:
            f.close()
    if where:
        raise RuntimeError(f"synthetic weights: {sorted(where)[:3]} were laid out but never generated")
    # Written last: saved first, the pieces' freed memory was not reused (measured: the peak
    # grew by most of each layer until the end).
    model.config.dtype = dtype
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out)
    if len(shards) > 1:
        weight_map = {name: file_name for file_name, shard in zip(names, shards) for name, *_ in shard}
        index = {"metadata": {"total_size": sum(e[3] for sh in shards for e in sh)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sum(p.numel() for p in model.parameters())



# What a Hugging Face folder's model is read from (the checkpoint check has vouched for them),
# and the tokenizer and processor files beside it (preprocessor_config.json: a speech model's
# feature extractor).
_MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer*", "*.model", "special_tokens_map.json", "preprocessor_config.json")


def _reference_checkpoint(src: Path, out: Path) -> int:
    """Link the checkpoint's files into ``out``; return its parameter count (from the
    safetensors headers, nothing loaded)."""
    from mlxbuild.memory import model_shape

    names = sorted({p.name for pattern in _MODEL_FILES + _TOKENIZER_FILES for p in src.glob(pattern) if p.is_file()})
    for name in names:
        _link(src / name, out / name)
    return (model_shape({"path": str(out)}) or {"params": 0})["params"]


def _link(src: Path, dst: Path) -> None:
    """A hard link (the cache entry and the checkpoint share the bytes; the entry's inventory
    catches an edit made through either name), else a copy (another filesystem)."""
    import os
    import shutil

    src = src.resolve()  # a hub snapshot's files are relative symlinks into its blob store
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
