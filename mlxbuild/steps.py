"""The contract between the plan and the stages: a ``StepKind`` per stage (as ExecuTorch's
``executorch/export/types.py`` has ``StageType``), one typed params model per kind (what
the plan hands the stage) and the typed results the stages write as their sidecar JSON
files (``export.json``, ``lower.json``, ``reference.json``, ``verify.json``), read back by
the steps after them through the same models.

Torch-free: the planner builds these on every no-op build.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict


class StepKind(StrEnum):
    WEIGHTS = "weights"
    TOKENIZER = "tokenizer"
    PREPROCESSOR = "preprocessor"
    QUANTIZE = "quantize"
    EXPORT = "export"
    REFERENCE = "reference"
    LOWER = "lower"
    VERIFY = "verify"
    BASELINE = "baseline"
    QUALITY = "quality"
    PACKAGE = "package"


Dtype = Literal["fp32", "fp16", "bf16"]


class Params(BaseModel):
    """What a step's stage reads. ``label`` names the step in messages; it is not an input
    (keys are computed by the plan from the inputs, not from this model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str = ""

    def plain(self) -> dict:
        """As a plain dict, for the family functions that take one."""
        return self.model_dump(mode="json")


class ExportSpec(Params):
    max_context_length: int
    max_prefill_chunk: int
    task: str


class WeightsParams(Params):
    load: dict[str, Any]  # one of {"synthetic": ...}, {"path": ...} (+ hub identity), {"module": ...}
    dtype: Dtype


class TokenizerParams(Params):
    """Either the checkpoint's (or the manifest's) tokenizer files, {name: source path}, or
    the spec of a synthetic model's generated tokenizer (``mlxbuild.tokenizer``)."""
    files: dict[str, str] = {}
    synthetic: dict[str, Any] | None = None


class PreprocessorParams(Params):
    """A speech model's audio preprocessor (``mlxbuild.families.audio``): the feature
    extractor's settings, the checkpoint's processor config (shipped as it is) and the
    longest waveform the program takes."""
    feature: dict[str, Any]
    config_file: str | None = None
    max_audio_s: int


def streams(scheme: dict | None) -> bool:
    """Whether the quantize step reads the model a piece at a time: round-to-nearest does;
    GPTQ and AWQ run the float model on calibration tokens and cuda_int4 packs on the GPU,
    so those load it whole. The stage follows it and the memory estimate plans by it."""
    scheme = scheme or {}
    rules = [scheme.get("linear"), scheme.get("embedding"), *(scheme.get("rules") or [])]
    return (scheme.get("method") or "rtn") == "rtn" and not any((r or {}).get("format") == "cuda_int4" for r in rules)


class QuantizeParams(Params):
    weights: str
    scheme: dict[str, Any]
    dtype: Dtype
    # GPTQ's calibration sequences (``mlxbuild.evaluation``'s spec) and their tokenizer.
    calibration: dict[str, Any] | None = None
    tokenizer: str | None = None


class ExportParams(ExportSpec):
    weights: str
    quantized: str
    flavour: str
    dtype: Dtype


class ReferenceParams(ExportSpec):
    weights: str
    quantized: str
    dtype: Dtype
    prompt: int
    decode_steps: int
    seed: int
    # The runner check's prompt (tokens of the shipped corpus), when a tokenizer travels.
    tokenizer: str | None = None
    runner_prompt: int = 0
    # The dtype the targets' backend stores dynamic-activation 4-bit scales in (its
    # REFERENCE_SCALES), where it rounds them.
    scales: Dtype | None = None


class LowerParams(ExportSpec):
    export: str
    weights: str
    backend: str
    options: dict[str, Any] | None = None
    constant_methods: dict[str, Any] | None = None
    etrecord: bool = False


class VerifyParams(Params):
    lower: str
    reference: str
    backend: str
    tolerance: dict[str, float]
    task: str
    tokenizer: str | None = None


class BaselineParams(ExportSpec):
    """The unquantized model's next-token log-probabilities on the evaluation sequences:
    ``evaluation`` is their spec (the dataset's file and sha256, or the seeded tokens')."""
    weights: str
    dtype: Dtype
    evaluation: dict[str, Any]
    tokenizer: str | None = None


class RuleAblation(BaseModel):
    """A mixed scheme's rules measured one at a time: the float model with only the layers
    one rule picks quantized (``mlxbuild.stages.quality.rule_figures``)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    weights: str
    scheme: dict[str, Any]
    dtype: Dtype
    max_context_length: int


class QualityParams(Params):
    lower: str
    baseline: str
    backend: str
    task: str
    max_prefill_chunk: int
    gate: dict[str, float | None]
    speed: bool = False
    rules: RuleAblation | None = None


class PackageParams(Params):
    lower: str
    verify: str
    quantize: str
    tokenizer: str | None = None
    preprocessor: str | None = None
    quality: str | None = None
    out_dir: str
    stem: str
    record: dict[str, Any]


PARAMS: dict[StepKind, type[Params]] = {
    StepKind.WEIGHTS: WeightsParams, StepKind.TOKENIZER: TokenizerParams,
    StepKind.PREPROCESSOR: PreprocessorParams, StepKind.QUANTIZE: QuantizeParams, StepKind.EXPORT: ExportParams,
    StepKind.REFERENCE: ReferenceParams, StepKind.LOWER: LowerParams, StepKind.VERIFY: VerifyParams,
    StepKind.BASELINE: BaselineParams, StepKind.QUALITY: QualityParams, StepKind.PACKAGE: PackageParams,
}


# --------------------------------------------------------------------------- results


class Result(BaseModel):
    """A stage's sidecar file. Task kinds add their own figures (a speech family's encoder
    comparison, a text model's config), so fields beyond the declared ones are kept."""

    model_config = ConfigDict(extra="allow")
    FILE: ClassVar[str] = ""

    def write(self, entry: Path) -> None:
        (Path(entry) / self.FILE).write_text(json.dumps(self.model_dump(mode="json"), indent=1, default=str))

    @classmethod
    def read(cls, entry: Path):
        return cls.model_validate_json((Path(entry) / cls.FILE).read_text())


class ExportResult(Result):
    FILE: ClassVar[str] = "export.json"
    flavour: str
    task: str
    methods: list[str]
    graph_nodes: dict[str, int]


class LowerResult(Result):
    FILE: ClassVar[str] = "lower.json"
    constant_methods: dict[str, Any]
    delegation: dict[str, Any]
    ptd: list[str]
    etrecord: str | None = None  # the ETRecord's file name in the entry, when one was asked for
    etrecord_problem: str | None = None  # why there is none although one was asked for

    @classmethod
    def data_files(cls, entry: Path) -> list[Path]:
        """The entry's external data (.ptd) that its program is loaded with."""
        return [Path(entry) / name for name in cls.read(entry).ptd]


class ReferenceResult(Result):
    FILE: ClassVar[str] = "reference.json"
    prompt: int | None = None
    decode_steps: int | None = None


class VerifyResult(Result):
    FILE: ClassVar[str] = "verify.json"
    passed: bool
    reason: str = ""
    executed: bool = False
    artifact_sha256: str | None = None


class BaselineResult(Result):
    FILE: ClassVar[str] = "baseline.json"
    sequences: int
    seq_len: int
    text: bool  # tokenized text (perplexity is meaningful), or seeded token ids
    source: str  # what the sequences were read from, in words


class QualityResult(Result):
    """The artifact against the unquantized model (``mlxbuild.quality.figures``), the gate
    it was held to and, with ``speed``, build-host tokens per second."""
    FILE: ClassVar[str] = "quality.json"
    passed: bool
    reason: str = ""
    measured: bool = True
    gate: dict[str, float | None] = {}
    runtime: str | None = None
    speed: dict[str, Any] | None = None
    # Mixed precision: per rule, the eager float model with only that rule's layers quantized.
    rules: dict[str, Any] | None = None
