"""The manifest's models: what a manifest may say, validated by pydantic, with the JSON
schema they generate (committed as ``schema/manifest.schema.json``). The vocabulary of
families, tasks and backends comes from their own tables (``mlxbuild.families``,
``backends.capabilities``). Torch-free.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from backends import capabilities
from mlxbuild import families
from mlxbuild.errors import ManifestError
from mlxbuild.manifest.errors import _describe, _Issue, _show, _translate
from mlxbuild.remote import URL_PATTERN as REMOTE_URL_PATTERN, parse_url


__all__ = [
    "ARCHITECTURES",
    "BACKENDS",
    "DTYPES",
    "SCHEMA_PATH",
    "SOURCE_KINDS",
    "ExportSpec",
    "LayerQuant",
    "Manifest",
    "ModelSpec",
    "QuantRule",
    "Scheme",
    "Source",
    "SyntheticSource",
    "Target",
    "json_schema",
    "schema_text",
]

SCHEMA_PATH = Path(__file__).resolve().parent.parent.parent / "schema" / "manifest.schema.json"

ARCHITECTURES: tuple[str, ...] = tuple(families.ARCHITECTURES)
BACKENDS: tuple[str, ...] = capabilities.ALL_BACKENDS
DTYPES: tuple[str, ...] = capabilities.DTYPES
TASKS: tuple[str, ...] = tuple(families.TASKS)
# The task each synthetic architecture performs (default: text-generation).
ARCHITECTURE_TASKS: dict[str, str] = {a.name: a.task for a in families.ARCHITECTURES.values()}
SOURCE_KINDS: tuple[str, ...] = ("path", "hf", "synthetic", "module")
# cuda_int4: torchao's int4 weight-only layout for the tinygemm kernel (tile_packed_to_4d),
# what ExecuTorch's CUDA exports use; 4-bit, grouped, bf16, packed on a CUDA GPU.
QUANT_FORMATS: tuple[str, ...] = ("affine", "nvfp4", "cuda_int4", "none")
QUANT_BITS: tuple[int, ...] = (2, 4, 8)
GROUP_SIZES: tuple[Union[int, str], ...] = (32, 64, 128, 256, "per_channel")
ACTIVATIONS: tuple[str, ...] = ("none", "int8_dynamic")
DEFAULT_GROUP_SIZE = 32
NVFP4_GROUP_SIZE = 16
NO_QUANTIZATION = "none"

SLUG_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
SEMVER_PATTERN = (
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
HF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"
MODULE_PATTERN = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"

_SLUG_RE = re.compile(SLUG_PATTERN)
_SEMVER_RE = re.compile(SEMVER_PATTERN)
_HF_RE = re.compile(HF_PATTERN)
_MODULE_RE = re.compile(MODULE_PATTERN)


# --------------------------------------------------------------------------- helpers


def _choice(*values: Any):
    """A Literal type whose error says what is allowed."""
    allowed = ", ".join(str(c) for c in values)

    def check(v: Any) -> Any:
        for c in values:
            if type(v) is type(c) and v == c:
                return v
        raise _Issue((), f"{_show(v)} is not allowed; expected one of: {allowed}")

    return Annotated[Literal[values], BeforeValidator(check)]  # type: ignore[valid-type]


# Names and versions become file names (artifacts/<name>/<version>/<name>-<target>.json,
# <name>-<version>.tar.gz): bounded so the longest, name-target.json, stays within 134
# bytes, under the strictest common limit (eCryptfs: 143; ext4, APFS, NTFS: 255).
MAX_NAME, MAX_VERSION = 64, 32


def _string_check(what: str, regex: re.Pattern | None = None, hint: str = "",
                  max_length: int | None = None) -> Callable:
    def check(v: Any) -> Any:
        if not isinstance(v, str):
            raise _Issue((), f"expected a {what} string, got {_describe(v)}")
        if max_length is not None and len(v) > max_length:
            raise _Issue((), f"a {what} of {len(v)} characters is too long (at most {max_length}: "
                         "it becomes part of the artifacts' file names)")
        if regex is None:
            if not v.strip():
                raise _Issue((), f"expected a {what} string, got an empty string")
        elif not regex.fullmatch(v):
            raise _Issue((), f"{v!r} is not a valid {what}; {hint}")
        return v

    return check


_SLUG_HINT = "use lowercase letters, digits, '.', '_' and '-', starting with a letter or digit"


def _none_to_empty(v: Any) -> Any:
    return {} if v is None else v


def _check_scheme_name(v: Any) -> Any:
    _string_check("scheme name", _SLUG_RE, _SLUG_HINT)(v)
    if v == NO_QUANTIZATION:
        raise _Issue((), "'none' is reserved (it means no quantization); choose another scheme name")
    return v


def _check_identifier(v: Any) -> Any:
    if not isinstance(v, str) or not v.isidentifier():
        raise _Issue((), f"{_show(v)} is not a valid method name; expected a Python identifier")
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_constant(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        for i, item in enumerate(v):
            if not _is_number(item):
                raise _Issue((i,), f"list items must be numbers, got {_describe(item)}")
        return v
    raise _Issue(
        (), f"expected an int, float, bool, string or list of numbers, got {_describe(v)}"
    )


Slug = Annotated[
    str,
    StringConstraints(pattern=SLUG_PATTERN, max_length=MAX_NAME),
    BeforeValidator(_string_check("name", _SLUG_RE, _SLUG_HINT, MAX_NAME)),
]
SchemeName = Annotated[
    str, StringConstraints(pattern=SLUG_PATTERN), BeforeValidator(_check_scheme_name)
]
SchemeRef = Annotated[
    str,
    StringConstraints(pattern=SLUG_PATTERN),
    BeforeValidator(_string_check("scheme name", _SLUG_RE, _SLUG_HINT)),
]
SemVer = Annotated[
    str,
    StringConstraints(pattern=SEMVER_PATTERN, max_length=MAX_VERSION),
    BeforeValidator(
        _string_check(
            "semantic version",
            _SEMVER_RE,
            "expected MAJOR.MINOR.PATCH[-prerelease][+build], e.g. 0.1.0",
            MAX_VERSION,
        )
    ),
]
HfRepo = Annotated[
    str,
    StringConstraints(pattern=HF_PATTERN),
    BeforeValidator(_string_check("Hugging Face repo id", _HF_RE, "expected 'owner/name'")),
]
ModuleRef = Annotated[
    str,
    StringConstraints(pattern=MODULE_PATTERN),
    BeforeValidator(
        _string_check("module reference", _MODULE_RE, "expected 'dotted.module:attr'")
    ),
]
NonEmptyStr = Annotated[
    str, StringConstraints(min_length=1), BeforeValidator(_string_check("non-empty"))
]
Identifier = Annotated[str, BeforeValidator(_check_identifier)]
FreeDict = Annotated[dict[str, Any], BeforeValidator(_none_to_empty)]
ConstantValue = Annotated[
    Union[StrictBool, StrictInt, StrictFloat, StrictStr, list[Union[StrictInt, StrictFloat]]],
    BeforeValidator(_check_constant),
]

Architecture = _choice(*ARCHITECTURES)
Backend = _choice(*BACKENDS)
Dtype = _choice(*DTYPES)
Task = _choice(*TASKS)
QuantFormat = _choice(*QUANT_FORMATS)
Bits = _choice(*QUANT_BITS)
GroupSize = _choice(*GROUP_SIZES)
Activations = _choice(*ACTIVATIONS)


class _Model(BaseModel):
    """Base: unknown keys are rejected with a message listing the allowed ones."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def check_known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise _Issue((key,), cls._unknown_field_message(key))
            data = cls._prepare(dict(data))
        return data

    @classmethod
    def _unknown_field_message(cls, key: Any) -> str:
        return f"unknown field {key!r}; allowed: {', '.join(cls.model_fields)}"

    @classmethod
    def _prepare(cls, data: dict) -> dict:
        """Hook for cross-key checks on the raw mapping (keys in file order)."""
        return data


# --------------------------------------------------------------------------- model


class Outliers(_Model):
    """A few hidden channels whose RMSNorm weights are multiplied by ``scale`` (seeded), so
    those channels carry large activations into every linear, as in trained LLMs."""

    channels: StrictInt = Field(ge=1, description="how many hidden channels")
    scale: Annotated[float, Field(gt=0)] = Field(description="their norm weights' factor")


class SyntheticSource(_Model):
    """A randomly initialised model of a known architecture (for tests and CI)."""

    architecture: Architecture = Field(description="model family")
    seed: StrictInt = Field(0, ge=0, description="RNG seed for the weights")
    config: FreeDict = Field(
        default_factory=dict, description="architecture config overrides, e.g. hidden_size"
    )
    outliers: Outliers | None = Field(
        None, description="give the weights the outlier channels trained LLMs have, so "
        "quantization methods can be compared on a synthetic model")


class Source(_Model):
    """Where the weights come from: exactly one of path / hf / synthetic / module."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [{"required": [k]} for k in SOURCE_KINDS],
            "dependentRequired": {"revision": ["hf"], "kwargs": ["module"]},
        },
    )

    path: NonEmptyStr | None = Field(
        None, description="local checkpoint; relative to the manifest's directory"
    )
    hf: HfRepo | None = Field(None, description="Hugging Face Hub repo id 'owner/name'")
    revision: NonEmptyStr | None = Field(None, description="Hub revision (only with hf)")
    synthetic: SyntheticSource | None = None
    module: ModuleRef | None = Field(
        None, description="'dotted.module:factory' returning an nn.Module"
    )
    kwargs: dict[str, Any] | None = Field(None, description="factory kwargs (only with module)")

    @classmethod
    def _prepare(cls, data: dict) -> dict:
        kinds = ", ".join(SOURCE_KINDS)
        given = [k for k in data if k in SOURCE_KINDS and data[k] is not None]
        if not given:
            raise _Issue((), f"no model source given; expected exactly one of: {kinds}")
        if len(given) > 1:
            raise _Issue(
                (given[1],),
                f"only one model source may be given, found both {given[0]!r} and "
                f"{given[1]!r}; expected exactly one of: {kinds}",
            )
        if data.get("revision") is not None and given[0] != "hf":
            raise _Issue(("revision",), "'revision' is only allowed together with 'hf'")
        if data.get("kwargs") is not None and given[0] != "module":
            raise _Issue(("kwargs",), "'kwargs' is only allowed together with 'module'")
        return data

    @property
    def kind(self) -> str:
        """Which source is set: 'path', 'hf', 'synthetic' or 'module'."""
        for k in SOURCE_KINDS:
            if getattr(self, k) is not None:
                return k
        raise AssertionError("validated Source without a kind")

    def resolved_path(self, base_dir: str | os.PathLike | None = None) -> Path | None:
        """``path`` made absolute against ``base_dir`` (default: cwd); None if not a path source."""
        if self.path is None:
            return None
        return _resolve(self.path, base_dir)


class ModelSpec(_Model):
    source: Source
    dtype: Dtype = Field("fp32", description="compute/weight dtype of the exported model")
    task: Task = "text-generation"
    tokenizer: NonEmptyStr | None = Field(
        None, description="tokenizer file/dir; relative to the manifest's directory"
    )

    @model_validator(mode="after")
    def check_task(self) -> "ModelSpec":
        synthetic = self.source.synthetic
        if synthetic is not None:
            fits = ARCHITECTURE_TASKS[synthetic.architecture]
            if fits != self.task:
                raise _Issue(("task",), f"{self.task!r} does not fit architecture "
                             f"{synthetic.architecture!r}, which is {fits!r}")
        if self.task != "text-generation" and self.source.module is not None:
            raise _Issue(("task",), f"{self.task!r} needs a transformers model (source path, hf "
                         "or synthetic); a module source is text-generation only")
        return self


class ExportSpec(_Model):
    max_context_length: StrictInt = Field(ge=2, description="KV-cache length")
    max_prefill_chunk: StrictInt | None = Field(
        None, ge=1, description="tokens per prefill call; default: max_context_length"
    )
    constant_methods: dict[Identifier, ConstantValue] = Field(
        default_factory=dict, description="extra constant methods baked into the .pte"
    )

    @field_validator("constant_methods", mode="before")
    @classmethod
    def constant_methods_null(cls, v: Any) -> Any:
        return _none_to_empty(v)

    @field_validator("max_prefill_chunk")
    @classmethod
    def check_prefill_chunk(cls, v: int | None, info: ValidationInfo) -> int | None:
        ctx = info.data.get("max_context_length")
        if v is not None and isinstance(ctx, int) and v > ctx:
            raise _Issue((), f"must be <= max_context_length ({ctx}), got {v}")
        return v

    @model_validator(mode="after")
    def default_prefill_chunk(self) -> "ExportSpec":
        if self.max_prefill_chunk is None:
            self.max_prefill_chunk = self.max_context_length
        return self


class LayerQuant(_Model):
    """Quantization of one layer kind (linear or embedding)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "allOf": [
                {
                    "if": {"properties": {"format": {"const": "affine"}}},
                    "then": {"required": ["bits"]},
                },
                {
                    "if": {"properties": {"format": {"const": "cuda_int4"}}, "required": ["format"]},
                    "then": {"not": {"required": ["bits"]}},
                },
                {
                    "if": {
                        "properties": {"format": {"enum": ["nvfp4", "none"]}},
                        "required": ["format"],
                    },
                    "then": {
                        "not": {"anyOf": [{"required": ["bits"]}, {"required": ["group_size"]}]}
                    },
                },
            ]
        },
    )

    format: QuantFormat = "affine"
    bits: Bits | None = Field(None, description="required for affine; not allowed otherwise")
    group_size: GroupSize | None = Field(
        None, description=f"affine only; default {DEFAULT_GROUP_SIZE} (nvfp4: fixed at 16)"
    )
    activations: Activations = Field(
        "none", description="int8_dynamic: linear only, affine 4/8-bit"
    )

    @model_validator(mode="after")
    def check_format(self) -> "LayerQuant":
        return _check_quant(self)

    @property
    def quantized(self) -> bool:
        return self.format != "none"

    @property
    def effective_group_size(self) -> int | str | None:
        """Group size actually used: 16 for nvfp4, None when not quantized."""
        if self.format == "nvfp4":
            return NVFP4_GROUP_SIZE
        if self.format == "none":
            return None
        return self.group_size


def _check_quant(q):
    """Format/bits/group_size/activations consistency (LayerQuant and QuantRule)."""
    if q.format == "affine":
        if q.bits is None:
            allowed = ", ".join(str(b) for b in QUANT_BITS)
            raise _Issue(("bits",), f"required when format is 'affine' (one of: {allowed})")
        if q.group_size is None:
            q.group_size = DEFAULT_GROUP_SIZE
    elif q.format == "cuda_int4":
        if q.bits is not None:
            raise _Issue(("bits",), "not allowed when format is 'cuda_int4' (always 4-bit)")
        if q.group_size == "per_channel":
            raise _Issue(("group_size",), "cuda_int4 is grouped: 32, 64, 128 or 256 (the tinygemm kernel's groups)")
        if q.group_size is None:
            q.group_size = DEFAULT_GROUP_SIZE
    else:
        why = " (nvfp4 is always 4-bit)" if q.format == "nvfp4" else ""
        if q.bits is not None:
            raise _Issue(("bits",), f"not allowed when format is {q.format!r}{why}")
        if q.group_size is not None:
            why = (
                f" (nvfp4 uses a fixed group size of {NVFP4_GROUP_SIZE})"
                if q.format == "nvfp4"
                else ""
            )
            raise _Issue(("group_size",), f"not allowed when format is {q.format!r}{why}")
    if q.activations == "int8_dynamic" and not (
        q.format == "affine" and q.bits in (4, 8)
    ):
        raise _Issue(
            ("activations",),
            "int8_dynamic activations require format 'affine' with bits 4 or 8",
        )
    return q


LAYER_KINDS: tuple[str, ...] = ("linear", "embedding")
RULE_SELECTORS: tuple[str, ...] = ("match", "regex", "blocks", "layers")
LayerKind = _choice(*LAYER_KINDS)


def _check_regex(v: Any) -> Any:
    if not isinstance(v, str) or not v:
        raise _Issue((), f"expected a regular expression string, got {_describe(v)}")
    try:
        re.compile(v)
    except re.error as e:
        raise _Issue((), f"invalid regular expression {v!r}: {e}") from None
    return v


def _check_blocks(v: Any) -> Any:
    if isinstance(v, list):
        seen: dict[int, int] = {}
        for i, b in enumerate(v):
            if isinstance(b, int) and not isinstance(b, bool):
                if b in seen:
                    raise _Issue((i,), f"duplicate block index {b} (already at blocks[{seen[b]}])")
                seen[b] = i
    return v


Regex = Annotated[str, BeforeValidator(_check_regex)]
BlockList = Annotated[list[StrictInt], Field(min_length=1), BeforeValidator(_check_blocks)]


class QuantRule(_Model):
    """A per-layer rule: the modules its selectors all pick get this quantization.

    Rules are tried in order and the first that picks a module wins; modules no rule
    picks keep the scheme's ``linear`` / ``embedding`` quantization.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [{"required": [k]} for k in RULE_SELECTORS],
            "allOf": LayerQuant.model_config["json_schema_extra"]["allOf"],
        },
    )

    match: NonEmptyStr | None = Field(
        None, description="glob on the module name, e.g. 'lm_head' or '*.mlp.*' ('*' crosses dots)"
    )
    regex: Regex | None = Field(None, description="Python regular expression, full match on the module name")
    blocks: BlockList | None = Field(
        None, description="decoder block indices; negative counts from the end (-1: the last block)"
    )
    layers: LayerKind | None = Field(
        None, description="only this layer kind (default: both; linear only for int8_dynamic)"
    )
    format: QuantFormat = Field("affine", description="'none' keeps the picked modules unquantized")
    bits: Bits | None = Field(None, description="required for affine; not allowed otherwise")
    group_size: GroupSize | None = Field(
        None, description=f"affine only; default {DEFAULT_GROUP_SIZE} (nvfp4: fixed at 16)"
    )
    activations: Activations = Field(
        "none", description="int8_dynamic: linear only, affine 4/8-bit"
    )

    @classmethod
    def _prepare(cls, data: dict) -> dict:
        if all(data.get(k) is None for k in RULE_SELECTORS):
            raise _Issue((), f"a rule needs at least one selector: {', '.join(RULE_SELECTORS)}")
        return data

    @model_validator(mode="after")
    def check_rule(self) -> "QuantRule":
        _check_quant(self)
        if self.activations == "int8_dynamic" and self.layers == "embedding":
            raise _Issue(("activations",), "int8_dynamic activations apply to linear layers only, "
                         "and this rule has layers: embedding")
        return self

    @property
    def kinds(self) -> tuple[str, ...]:
        """Layer kinds this rule can pick (activation quantization exists for linear only)."""
        if self.layers is not None:
            return (self.layers,)
        return ("linear",) if self.activations == "int8_dynamic" else LAYER_KINDS

    @property
    def quant(self) -> LayerQuant:
        """The quantization it gives, as a LayerQuant."""
        return LayerQuant.model_construct(format=self.format, bits=self.bits,
                                          group_size=self.group_size, activations=self.activations)

    @property
    def quantized(self) -> bool:
        return self.format != "none"


class Calibration(_Model):
    """The text a calibration-based method (GPTQ, AWQ) sees its layers' inputs on."""

    dataset: NonEmptyStr | None = Field(
        None, description="a .txt, .md or .jsonl file relative to the manifest, or "
        "hf:OWNER/NAME[:SPLIT]; default: the text the synthetic tokenizer is trained on "
        "(mlxbuild/data/corpus.txt), not the quality step's evaluation text. Models without a "
        "tokenizer are calibrated on seeded token ids")
    samples: StrictInt = Field(8, ge=1, le=1024, description="calibration sequences")
    seq_len: StrictInt = Field(64, ge=2, description="tokens per calibration sequence")


class Scheme(_Model):
    """A named quantization scheme; omitted (or null) layers stay unquantized."""

    linear: LayerQuant | None = None
    embedding: LayerQuant | None = None
    rules: list[QuantRule] = Field(
        default_factory=list,
        description="per-layer rules, first match wins; layers no rule picks use linear/embedding",
    )

    method: _choice("rtn", "gptq", "awq") = Field(  # type: ignore[valid-type]
        "rtn", description="rtn: round each weight to its grid (HQQ scales); gptq: choose the "
        "affine linears' codes by GPTQ on calibration text, so the layers' outputs move least; "
        "awq: scale the affine linears' input channels by their activations (AWQ, folded into "
        "the preceding norm or linear: Llama, Mistral, Qwen2, Qwen3) before rounding")
    calibration: Calibration | None = Field(
        None, description="what gptq calibrates on (default: see Calibration)")

    @field_validator("rules", mode="before")
    @classmethod
    def rules_null(cls, v: Any) -> Any:
        return [] if v is None else v

    @model_validator(mode="after")
    def check_method(self) -> "Scheme":
        if self.calibration is not None and self.method == "rtn":
            raise _Issue(("calibration",), "calibration is only read by method: gptq or awq")
        return self

    @model_serializer(mode="wrap")
    def drop_unused(self, handler) -> dict:
        # A scheme without rules dumps (and so hashes into cache keys and records) as it
        # did before rules existed; a rule dumps only the selectors it uses. Likewise
        # method and calibration only when GPTQ or AWQ is asked for.
        out = handler(self)
        if out.get("method") == "rtn":
            out.pop("method", None)
        if out.get("calibration") is None:
            out.pop("calibration", None)
        if not out.get("rules"):
            out.pop("rules", None)
        else:
            out["rules"] = [{k: v for k, v in r.items() if v is not None or k not in RULE_SELECTORS}
                            for r in out["rules"]]
        return out

    @model_validator(mode="after")
    def check_activations(self) -> "Scheme":
        if self.embedding is not None and self.embedding.activations != "none":
            raise _Issue(
                ("embedding", "activations"),
                "activation quantization is only allowed on 'linear', not 'embedding'",
            )
        return self

    def layer(self, kind: str) -> LayerQuant | None:
        """The quantization for 'linear' or 'embedding', or None if unquantized."""
        if kind not in ("linear", "embedding"):
            raise KeyError(f"unknown layer kind {kind!r}; expected 'linear' or 'embedding'")
        lq = getattr(self, kind)
        return lq if lq is not None and lq.quantized else None

    @property
    def is_empty(self) -> bool:
        """True if nothing gets quantized."""
        return (self.layer("linear") is None and self.layer("embedding") is None
                and not any(r.quantized for r in self.rules))


class QualityGate(_Model):
    """Thresholds a target's quality figures must meet to be published (mlxbuild.quality);
    unset fields keep the default for the scheme's narrowest bit width."""

    max_kld: Annotated[float, Field(ge=0)] | None = Field(
        None, description="highest mean KL divergence (nats) of next-token distributions "
        "against the unquantized model")
    min_top1: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="lowest fraction of positions whose most likely next token is the "
        "unquantized model's")
    max_ppl_increase: Annotated[float, Field(ge=0)] | None = Field(
        None, description="highest relative perplexity increase on the evaluation text "
        "(0.1 = 10%)")


class QualitySpec(QualityGate):
    """How targets are measured against the unquantized model, and the gate they meet."""

    enabled: StrictBool = Field(True, description="measure and gate quality (false: neither)")
    dataset: NonEmptyStr | None = Field(
        None, description="evaluation text: a .txt or .jsonl file (its 'text' fields), relative "
        "to the manifest, or hf:OWNER/NAME[:SPLIT] (a Hugging Face dataset through `datasets`, "
        "honouring HF_DATASETS_OFFLINE); default: the text that ships with mlxbuild. Models "
        "without a tokenizer are scored on seeded token sequences instead")
    sequences: StrictInt = Field(4, ge=1, le=256, description="evaluation sequences")
    seq_len: StrictInt | None = Field(
        None, ge=2, description="tokens per sequence (default min(64, export.max_context_length))")
    schemes: dict[SchemeRef, QualityGate] = Field(
        default_factory=dict, description="per-scheme thresholds (over the manifest-wide ones)")
    measure_speed: StrictBool = Field(
        False, description="also record prefill/decode tokens per second on the build host "
        "(as `doit build --measure-speed`)")

    @field_validator("schemes", mode="before")
    @classmethod
    def schemes_null(cls, v: Any) -> Any:
        return _none_to_empty(v)


def _target_schema_extra(schema: dict[str, Any]) -> None:
    rules = []
    for b in capabilities.SUPPORTED_BACKENDS:
        opts = capabilities.options_model(b).model_json_schema()
        if "$defs" in opts:  # keep the schema self-contained; fall back to a plain object
            opts = {"type": "object"}
        opts.pop("title", None)
        rules.append(
            {
                "if": {"properties": {"backend": {"const": b}}, "required": ["backend"]},
                "then": {"properties": {"options": opts}},
            }
        )
    schema["allOf"] = rules



class Target(_Model):
    """One artifact to build: a backend plus a quantization scheme."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_target_schema_extra)

    name: Slug
    backend: Backend
    quantization: SchemeRef = Field(
        NO_QUANTIZATION, description="a scheme name from `quantization`, or 'none'"
    )
    options: FreeDict = Field(default_factory=dict, description="backend-specific options")
    dtype: Dtype | None = Field(
        None, description="this target's dtype, overriding model.dtype (the weights are written once "
        "in model.dtype; each scheme and dtype is quantized and exported once, shared by the "
        "targets that need it)")
    etrecord: bool = Field(
        False,
        description="write ExecuTorch's ETRecord beside the artifact (<stem>.etrecord), which "
        "the devtools Inspector reads with an ETDump to map runtime events back to the model's "
        "ops and source lines. Off by default: it holds the exported and the lowered program "
        "with their weights, and keeping them while lowering took a Qwen3-0.6B-sized lower "
        "step from 2.9 to 10.4 GB of memory (benchmarks/results/step-process-2026-12-05-*.json)",
    )

    quality: QualityGate | None = Field(
        None, description="this target's quality thresholds (over the scheme's and the manifest's)")

    def backend_options(self) -> capabilities.BackendOptions:
        """``options`` parsed with the backend's options model (already validated)."""
        return capabilities.options_model(self.backend).model_validate(self.options)




def _check_remote_cache(v: Any) -> Any:
    if not isinstance(v, str):
        raise _Issue((), f"expected an s3://bucket[/prefix] URL string, got {_describe(v)}")
    try:
        return str(parse_url(v))
    except ValueError as e:
        raise _Issue((), str(e)) from None


class Settings(_Model):
    """How this manifest is built; nothing here changes an artifact or a cache key."""

    remote_cache: Annotated[
        str, StringConstraints(pattern=REMOTE_URL_PATTERN), BeforeValidator(_check_remote_cache)
    ] | None = Field(
        None,
        description="a shared cache in an S3-compatible bucket, s3://bucket[/prefix]; "
        "endpoint and credentials from the AWS_* environment; "
        "MLXBUILD_REMOTE_CACHE overrides it",
    )


class Manifest(_Model):
    """A whole manifest. Build with :func:`load_manifest` to get file positions in errors."""

    model_config = ConfigDict(
        extra="forbid", title="mlxbuild manifest"
    )

    name: Slug = Field(description="project slug")
    version: SemVer = Field(description="semantic version of this build")
    model: ModelSpec
    export: ExportSpec
    quantization: dict[SchemeName, Scheme] = Field(
        default_factory=dict, description="named quantization schemes"
    )
    targets: list[Target] = Field(min_length=1, description="artifacts to build")
    quality: QualitySpec = Field(default_factory=QualitySpec,
                                 description="measure every target against the unquantized model")
    settings: Settings = Field(default_factory=Settings, description="how to build (not what)")

    _manifest_path: Path | None = PrivateAttr(None)
    _positions: dict = PrivateAttr(default_factory=dict)  # YAML positions of its fields

    def error_at(self, field: tuple, message: str) -> ManifestError:
        """A one-line error at ``field`` (e.g. ``("model", "source", "path")``): the
        manifest's file:line:col of that field, as validation errors have."""
        line, col = (1, 1)
        for n in range(len(field), -1, -1):
            if field[:n] in self._positions:
                line, col = self._positions[field[:n]]
                break
        return ManifestError(str(self._manifest_path or "<string>"), line, col,
                             ".".join(map(str, field)) or None, message)

    @field_validator("settings", mode="before")
    @classmethod
    def settings_null(cls, v: Any) -> Any:
        return _none_to_empty(v)

    @field_validator("quantization", mode="before")
    @classmethod
    def quantization_null(cls, v: Any) -> Any:
        return _none_to_empty(v)

    @field_validator("quality", mode="before")
    @classmethod
    def quality_null(cls, v: Any) -> Any:
        return _none_to_empty(v)

    @model_validator(mode="after")
    def check_quality(self) -> "Manifest":
        q = self.quality
        for name in q.schemes:
            if name != NO_QUANTIZATION and name not in self.quantization:
                defined = ", ".join([*self.quantization, NO_QUANTIZATION])
                raise _Issue(("quality", "schemes", name),
                             f"unknown quantization scheme {name!r}; defined: {defined}")
        if q.seq_len is not None and q.seq_len > self.export.max_context_length:
            raise _Issue(("quality", "seq_len"),
                         f"{q.seq_len} tokens do not fit the KV cache "
                         f"(export.max_context_length: {self.export.max_context_length})")
        return self

    def quality_gate(self, target: "Target") -> dict:
        """The thresholds ``target`` meets: the default for its scheme's narrowest width,
        then the manifest's, the scheme's and the target's own, field by field."""
        from mlxbuild import quality

        scheme = self.scheme_for(target).model_dump(mode="json")
        per_scheme = self.quality.schemes.get(target.quantization)
        return quality.thresholds(scheme, self.quality.model_dump(),
                                  per_scheme.model_dump() if per_scheme else None,
                                  target.quality.model_dump() if target.quality else None)

    @model_validator(mode="after")
    def check_targets(self) -> "Manifest":
        seen: dict[str, int] = {}
        defined = ", ".join([*self.quantization, NO_QUANTIZATION])
        for i, t in enumerate(self.targets):
            at = ("targets", i)
            if t.name in seen:
                raise _Issue(
                    (*at, "name"),
                    f"duplicate target name {t.name!r} (already used by targets[{seen[t.name]}])",
                )
            seen[t.name] = i
            caps = capabilities.get(t.backend)
            if not caps.supported:
                raise _Issue((*at, "backend"), capabilities.unsupported_message(t.backend))
            synthetic = self.model.source.synthetic
            why = synthetic and families.refusal(synthetic.architecture, t.backend)
            if why:
                raise _Issue((*at, "backend"), f"architecture {synthetic.architecture!r} cannot be built "
                                               f"for {t.backend!r}: {why}")
            try:
                options = caps.options.model_validate(t.options)
            except ValidationError as e:
                err = e.errors()[0]
                loc = tuple(err["loc"])
                if err["type"] == "extra_forbidden":
                    allowed = ", ".join(caps.options.model_fields) or "none (it takes no options)"
                    msg = f"unknown option {loc[-1]!r} for backend {t.backend!r}; allowed: {allowed}"
                else:
                    msg = _translate(err)
                raise _Issue((*at, "options", *loc), msg) from None
            if t.quantization != NO_QUANTIZATION and t.quantization not in self.quantization:
                raise _Issue(
                    (*at, "quantization"),
                    f"unknown quantization scheme {t.quantization!r}; defined: {defined}",
                )
            scheme = self.quantization.get(t.quantization)
            dtype = self.dtype_for(t)
            problem = options.dtype_problem(dtype)
            if problem:
                raise _Issue((*at, "options", problem[0]), problem[1])
            for fld, msg in capabilities.check(t.backend, scheme, dtype):
                if fld == "dtype" and t.dtype is not None:
                    raise _Issue((*at, "dtype"), msg)
                if fld in ("dtype", "backend"):
                    raise _Issue((*at, "backend"), msg)
                raise _Issue(
                    (*at, "quantization"),
                    f"scheme {t.quantization!r} is not compatible with backend "
                    f"{t.backend!r}: {fld}: {msg}",
                )
            if scheme is not None:
                _check_rules(t, i, scheme, dtype)
        return self

    @model_validator(mode="after")
    def check_runner_contract(self) -> "Manifest":
        # ExecuTorch's TextLLMRunner (extension/llm/runner: text_llm_runner.cpp,
        # text_prefiller.cpp) prefills in chunks of get_max_seq_len and, when that is below
        # get_max_context_len, takes the model for a ring-buffer one: it budgets
        # max_new_tokens against the whole context from position 0 and stops checking the
        # position, which runs a static cache past its end. The one contract every text
        # model meets is a forward that takes the whole context in one call.
        # Sliding-window models (Gemma 3) included: their ring caches are sized for a
        # whole-context chunk (window + chunk - 1 slots, at most the context).
        from mlxbuild.families import windows

        exp = self.export
        problem = windows.runner_contract_problem(exp.max_prefill_chunk, exp.max_context_length)
        if self.model.task == "text-generation" and problem:
            raise _Issue(("export", "max_prefill_chunk"), problem)
        return self

    # -- lookups ---------------------------------------------------------------

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.targets]

    def target(self, name: str) -> Target:
        """The target called ``name`` (KeyError listing the defined names otherwise)."""
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(f"no target named {name!r}; defined: {', '.join(self.target_names)}")

    def dtype_for(self, target: Target | str) -> str:
        """The dtype a target is built in: its own, else the model's."""
        t = self.target(target) if isinstance(target, str) else target
        return t.dtype or self.model.dtype

    def scheme_for(self, target: Target | str) -> Scheme:
        """The quantization scheme of a target (an empty Scheme for 'none')."""
        t = self.target(target) if isinstance(target, str) else target
        if t.quantization == NO_QUANTIZATION:
            return Scheme()
        return self.quantization[t.quantization]

    # -- paths -----------------------------------------------------------------

    @property
    def manifest_path(self) -> Path | None:
        """Absolute path of the manifest file (None if built from a dict)."""
        return self._manifest_path

    @manifest_path.setter
    def manifest_path(self, value: str | os.PathLike | None) -> None:
        self._manifest_path = None if value is None else Path(value).resolve()

    @property
    def source_file(self) -> Path | None:
        """Alias of :attr:`manifest_path`."""
        return self._manifest_path

    @property
    def base_dir(self) -> Path:
        """Directory relative paths resolve against (manifest dir, else cwd)."""
        if self._manifest_path is not None:
            return self._manifest_path.parent
        return Path.cwd()

    def resolve(self, p: str | os.PathLike) -> Path:
        """``p`` made absolute against :attr:`base_dir` (``~`` expanded)."""
        return _resolve(p, self.base_dir)

    @property
    def source_path(self) -> Path | None:
        """Absolute checkpoint path for a ``path`` source, else None."""
        return self.model.source.resolved_path(self.base_dir)

    @property
    def tokenizer_path(self) -> Path | None:
        """Absolute tokenizer path, or None if not given."""
        return None if self.model.tokenizer is None else self.resolve(self.model.tokenizer)


def _check_rules(target: Target, index: int, scheme: Scheme, dtype: str) -> None:
    """Backend support of each per-layer rule, reported at the rule's own field."""
    for j, rule in enumerate(scheme.rules):
        quant = rule.quant
        layer_view = SimpleNamespace(**{k: quant if k in rule.kinds else None for k in LAYER_KINDS})
        for fld, msg in capabilities.check(target.backend, layer_view, dtype):
            if fld in ("dtype", "backend"):
                continue  # the scheme's own check has reported these at the target
            kind, _, attr = fld.partition(".")
            hint = ""
            if len(rule.kinds) > 1:
                other = next(k for k in LAYER_KINDS if k != kind)
                hint = f" (the rule applies to linear and embedding layers; add layers: {other} to limit it)"
            raise _Issue(
                ("quantization", target.quantization, "rules", j, attr or "format"),
                f"not supported by backend {target.backend!r} of targets[{index}] "
                f"({target.name!r}) for {kind} layers: {msg}{hint}",
            )


def _resolve(p: str | os.PathLike, base_dir: str | os.PathLike | None) -> Path:
    path = Path(p).expanduser()
    if not path.is_absolute():
        path = Path(base_dir if base_dir is not None else Path.cwd()) / path
    return Path(os.path.normpath(path))


def json_schema() -> dict[str, Any]:
    """JSON schema of the manifest (what ``schema/manifest.schema.json`` contains)."""
    schema = Manifest.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "Generated by `python -m mlxbuild.manifest --write-schema`; do not edit.",
        **schema,
    }


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
