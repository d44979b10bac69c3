"""A local checkpoint checked before any step: what would otherwise fail deep inside the
weights step (a page of safetensors or transformers traceback) is one line naming the file.

Checked without torch, from the files' headers: ``config.json`` parses and names a model
type; each shard index names files that exist; each ``.safetensors`` file's header parses,
its tensors' byte ranges match their dtypes and shapes and the file holds all of them (a
truncated download fails here); the embedding and the layer count agree with the config;
``tokenizer.json`` and ``tokenizer_config.json`` parse. A folder already checked (same files,
same bytes: the planner's hashes) is not checked again.
"""

from __future__ import annotations

import json
import re
import struct
from math import prod
from pathlib import Path

from mlxbuild.errors import MlxbuildError

# bytes per element of the safetensors dtypes
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "I16": 2,
            "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
MAX_HEADER = 100 << 20  # safetensors' own limit
_LAYER = re.compile(r"(?:^|\.)(?:model|language_model)\.layers\.(\d+)\.")


class CheckpointError(MlxbuildError):
    """A checkpoint file is malformed: ``str`` is ``<file>: <what is wrong>``."""

    def __init__(self, file: Path, message: str):
        self.file, self.message = Path(file), message
        super().__init__(f"{self.file}: {message}")

    def __reduce__(self):
        return (type(self), (self.file, self.message))


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(path, "not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot be read ({e.strerror})") from None


def safetensors_header(path: Path) -> dict:
    """The tensors of a .safetensors file ({name: {dtype, shape, data_offsets}}), after
    checking that the file holds exactly what its header describes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(path, f"{size} bytes: too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(path, f"header length {n} does not fit the file ({size} bytes): "
                                      "not a safetensors file, or truncated")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(path, f"cannot be read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(path, "the safetensors header is not valid JSON (corrupted file)") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "the safetensors header is not a table of tensors")
    header.pop("__metadata__", None)
    end = 0
    for name, t in header.items():
        try:
            dtype, shape, (lo, hi) = t["dtype"], t["shape"], t["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"tensor {name!r}: malformed header entry") from None
        if dtype not in ITEMSIZE:
            raise CheckpointError(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(path, f"tensor {name!r}: malformed shape {shape!r}")
        if not (isinstance(lo, int) and isinstance(hi, int)) or hi - lo != prod(shape) * ITEMSIZE[dtype]:
            raise CheckpointError(path, f"tensor {name!r}: {dtype}{shape} does not fill bytes {lo}..{hi}")
        end = max(end, hi)
    if 8 + n + end != size:
        raise CheckpointError(path, f"holds {size} bytes, its header describes {8 + n + end}: "
                              + ("truncated" if size < 8 + n + end else "trailing bytes"))
    return header


def check_folder(folder: Path) -> None:
    """Raise CheckpointError for the first malformed file of a Hugging Face model folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = _json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(config_path, "expected a JSON object")
    if not isinstance(config.get("model_type"), str):
        raise CheckpointError(config_path, "no model_type (not a transformers config)")
    for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file() and not isinstance(_json(folder / name), dict):
            raise CheckpointError(folder / name, "expected a JSON object")
    for index_path in sorted(folder.glob("*.safetensors.index.json")):
        index = _json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(index_path, "no weight_map")
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or not (folder / shard).is_file():
                raise CheckpointError(index_path, f"weight_map names {shard!r}, which is not in {folder}")
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for name, t in safetensors_header(shard).items():
            tensors[name] = (shard, t["shape"])
    _check_shapes(config_path, config, tensors)
    if (folder / "tokenizer.json").is_file():
        check_tokenizer(folder / "tokenizer.json")


def _check_shapes(config_path: Path, config: dict, tensors: dict) -> None:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vocab, hidden = text.get("vocab_size"), text.get("hidden_size") or text.get("d_model")
    for name, (shard, shape) in tensors.items():
        if name.endswith("embed_tokens.weight") and isinstance(vocab, int) and isinstance(hidden, int):
            if shape != [vocab, hidden]:
                raise CheckpointError(shard, f"tensor {name!r} is {shape}, but {config_path.name} says "
                                      f"vocab_size {vocab} x hidden size {hidden}")
    layers = {int(m.group(1)) for name in tensors if (m := _LAYER.search(name))}
    want = text.get("num_hidden_layers")
    if layers and isinstance(want, int) and max(layers) + 1 != want:
        raise CheckpointError(config_path, f"num_hidden_layers is {want}, but the weights have "
                              f"{max(layers) + 1} layers")


def check_tokenizer(path: Path) -> None:
    """A tokenizer file (or folder with tokenizer.json) that the tokenizers library loads."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(path, "not found (expected a tokenizer.json file or a folder with one)")
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type with serde's message
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(path, f"does not load as a tokenizer ({message})") from None
