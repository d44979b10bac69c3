"""Manifest → plan: the build's steps, each with a content key, and nothing run yet.

A step's key hashes everything that can change its output: the manifest fields
it reads, its upstream keys (so checkpoint hashes flow down), and the versions
of the tools it runs. Shared work is shared by construction: two targets or two
manifests that need the same (weights, scheme, flavour) plan the same export
key, and so one export task.

This module must not import torch: planning is what a no-op build runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import backends
from mlxbuild import families, sources
from mlxbuild.errors import BuildError
from mlxbuild import __version__
from mlxbuild.fingerprint import FileHasher, code_hash, stable_hash, tool_versions
from mlxbuild.families.text_generation import VERIFY_DECODE_STEPS, VERIFY_PROMPT  # noqa: F401  (tests read them here)
from mlxbuild.steps import PARAMS, Params, StepKind
from mlxbuild.families.audio import FILES as PREPROCESSOR_FILES
from mlxbuild.tokenizer import SYNTHETIC_FILES
from mlxbuild.tolerance import active_rules, tolerance


@dataclass
class Step:
    kind: StepKind
    name: str  # the doit task name
    key: str
    deps: list[str]
    params: Params  # the kind's model (mlxbuild.steps.PARAMS[kind])
    label: str
    dependents: list[str] = field(default_factory=list)
    memory: int = 0  # estimated peak bytes (mlxbuild.memory); not an input, so not in the key

    def __post_init__(self):
        self.kind = StepKind(self.kind)
        if isinstance(self.params, dict):
            self.params = PARAMS[self.kind](**self.params)
        if type(self.params) is not PARAMS[self.kind]:
            raise TypeError(f"{self.kind} step with {type(self.params).__name__} params")


@dataclass
class Plan:
    steps: dict[str, Step] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)  # manifest path -> package steps
    remote_cache: str | None = None  # the shared remote cache's URL (settings.remote_cache)

    def add(self, step: Step) -> Step:
        known = self.steps.get(step.name)
        if known is not None:
            if known.key != step.key:
                # Same manifest name and target, different inputs: two builds would race
                # for one artifact path.
                raise BuildError(f"{step.label}: two manifests define this target differently; "
                                 "give them different names")
            return known
        self.steps[step.name] = step
        for dep in step.deps:
            self.steps[dep].dependents.append(step.name)
        return step


def _versions(*names: str, code: tuple[str, ...] = ()) -> dict:
    from importlib import metadata

    v = tool_versions()
    return {**{n: v[n] if n in v else metadata.version(n) for n in names}, "mlxbuild": __version__,
            "code": code_hash(*code)}


def step_code(kind: StepKind | str, *, task: str | None = None, flavour: str | None = None,
              backend: str | None = None, calibrated: bool = False) -> tuple[str, ...]:
    """The modules whose code decides a step's bytes (``mlxbuild.fingerprint``'s rule): the
    stage, and what it combines: the task's family modules, the export flavour, the
    backend and, for verification, the backend's runtime and the structural check."""
    kind = StepKind(kind)
    roots = [f"mlxbuild.stages.{kind.value}"]
    if kind in ("export", "reference", "lower", "verify"):
        roots += families.modules_of(task)
    if kind in ("export", "lower"):
        roots.append(backends.flavour_module_name(flavour or backends.backend(backend).FLAVOUR))
    if kind in ("lower", "verify"):
        roots.append(f"backends.{backend}")
    if kind == "verify":
        roots += ["backends.structural", *filter(None, [backends.runtime_module_name(backend)])]
    if kind in ("baseline", "quality"):
        roots += families.modules_of(task)
    if kind == "quality":
        roots += [f"backends.{backend}", *filter(None, [backends.runtime_module_name(backend)])]
    if kind == "package":
        roots = ["mlxbuild.artifacts"]
    if kind == "tokenizer":
        roots.append("mlxbuild.tokenizer")
    if kind == "quantize" and calibrated:  # imported by name where a GPTQ/AWQ scheme runs them
        roots += ["mlxbuild.gptq", "mlxbuild.awq", "mlxbuild.evaluation"]  # (+ what they import)
    if kind == "preprocessor":
        roots.append("backends.xnnpack")  # the stage's BACKEND
    return tuple(roots)


def plan_manifest(manifest, plan: Plan, hasher: FileHasher, artifacts_root: Path,
                  measure_speed: bool = False) -> list[str]:
    """Add one manifest's steps to `plan`; return its package step names. ``measure_speed``
    (``doit build --measure-speed``) adds build-host speed to every quality step."""
    manifest_dir = Path(manifest.source_file).parent if manifest.source_file else Path.cwd()
    src = sources.located(manifest, manifest_dir, hasher)
    dtype = manifest.model.dtype
    exp = manifest.export
    task = manifest.model.task
    export_spec = {"max_context_length": exp.max_context_length,
                   "max_prefill_chunk": exp.max_prefill_chunk, "task": task}

    weights = plan.add(Step(
        kind=StepKind.WEIGHTS, name=f"weights:{_short(stable_hash(src['identity'], dtype))}",
        key=stable_hash("weights", src["identity"], dtype, _versions("torch", "transformers", code=step_code("weights"))),
        deps=[], params={"load": src["load"], "dtype": dtype}, label=f"{manifest.name} ({dtype})"))

    tok = sources.tokenizer_of(manifest, src, hasher)
    tokenizer = None
    if tok is not None:
        # A copied tokenizer's bytes are its files'; a generated one's also depend on the
        # tokenizers release that trains it.
        tools = _versions("tokenizers", code=step_code("tokenizer")) if "synthetic" in tok["params"] \
            else _versions(code=step_code("tokenizer"))
        tok_key = stable_hash("tokenizer", tok["identity"], tools)
        tokenizer = plan.add(Step(
            kind=StepKind.TOKENIZER, name=f"tokenizer:{_short(tok_key)}", key=tok_key, deps=[],
            params=tok["params"], label=f"{manifest.name} tokenizer"))
    tok_files = sorted(tok["params"].get("files") or SYNTHETIC_FILES) if tok else []

    pre = sources.preprocessor_of(src, hasher)
    preprocessor = None
    if pre is not None:
        pre_key = stable_hash("preprocessor", pre["identity"],
                              _versions("torch", "executorch", "transformers", code=step_code("preprocessor")))
        preprocessor = plan.add(Step(
            kind=StepKind.PREPROCESSOR, name=f"preprocessor:{_short(pre_key)}", key=pre_key, deps=[],
            params=pre["params"], label=f"{manifest.name} preprocessor"))

    evaluation = _evaluation(manifest, manifest_dir, hasher, tokenizer)
    measure_speed = measure_speed or manifest.quality.measure_speed

    packages = []
    for target in manifest.targets:
        backend = backends.backend(target.backend)
        scheme_name = target.quantization
        scheme = manifest.scheme_for(target).model_dump(mode="json")
        # A target's own dtype: the weights (written once, in the model's dtype) are converted
        # when quantizing, and each (scheme, dtype) is quantized, exported and referenced once.
        # The model's dtype is already in the weights' key, so only another one is hashed again
        # (keys of manifests without per-target dtypes stay as they were).
        tdtype = manifest.dtype_for(target)
        other = [tdtype] if tdtype != dtype else []
        tag = f"{scheme_name}-{tdtype}" if other else scheme_name

        # GPTQ's codes depend on its calibration text (by content, through the tokenizer that
        # encodes it), not on where the manifest says the file lies.
        calib = _calibration(manifest, manifest_dir, hasher, tokenizer, scheme_name) \
            if scheme.get("method") in ("gptq", "awq") else None
        calib_tok = tokenizer if calib and calib["text"] else None
        hashed = {k: v for k, v in scheme.items() if k != "calibration"}
        extra = [calib["identity"], calib_tok.key if calib_tok else None] if calib else []
        quant = plan.add(Step(
            kind=StepKind.QUANTIZE,
            name=f"quantize:{tag}.{_short(stable_hash(weights.key, hashed, *other, *extra))}",
            key=stable_hash("quantize", weights.key, hashed, *other, *extra,
                            _versions("torch", "torchao", code=step_code("quantize", calibrated=bool(calib)))),
            deps=[weights.name, *([calib_tok.name] if calib_tok else [])],
            params={"weights": weights.key, "scheme": scheme, "dtype": tdtype,
                    "calibration": calib["params"] if calib else None,
                    "tokenizer": calib_tok.key if calib_tok else None},
            label=f"{manifest.name} {scheme_name}" + (f" ({tdtype})" if other else "")))

        flavour = backends.flavour_of(target.backend, target.options)
        # The export runs the flavour's module, not the target's backend: backends that share
        # a flavour (vulkan and xnnpack, coreml and portable) share one export.
        export_key = stable_hash("export", quant.key, flavour, export_spec,
                                 _versions("torch", "executorch", "transformers",
                                           code=step_code("export", task=task, flavour=flavour)))
        export = plan.add(Step(
            kind=StepKind.EXPORT, name=f"export:{tag}.{flavour}.{_short(export_key)}", key=export_key,
            deps=[quant.name],
            params={"weights": weights.key, "quantized": quant.key, "flavour": flavour,
                    "dtype": tdtype, **export_spec},
            label=f"{manifest.name} {tag}/{flavour}"))

        verify_spec = families.get(task).verify_spec(exp.max_context_length, exp.max_prefill_chunk)
        if tokenizer is not None and verify_spec.get("runner_prompt"):
            # The runner check (ExecuTorch's TextLLMRunner on the artifact) needs the eager
            # continuation of a prompt the tokenizer writes. Every reference computes it, so
            # a scheme's one reference serves all its targets whichever are selected.
            verify_spec["tokenizer"] = tokenizer.key
        else:
            verify_spec.pop("runner_prompt", None)
        # A backend that stores 4-bit scales under dynamic activations rounded has a reference
        # of its own computing with them so; other references (and their keys) are unchanged.
        scales = getattr(backend, "REFERENCE_SCALES", None) if _dynamic_int4(scheme) else None
        ref_key = stable_hash("reference", quant.key, export_spec, verify_spec,
                              *([{"scales": scales}] if scales else []),
                              _versions("torch", "transformers", "executorch",
                                        code=step_code("reference", task=task)))
        reference = plan.add(Step(
            kind=StepKind.REFERENCE, name=f"reference:{tag}{f'.{scales}-scales' if scales else ''}.{_short(ref_key)}", key=ref_key,
            deps=[quant.name, *([tokenizer.name] if "tokenizer" in verify_spec else [])],
            params={"weights": weights.key, "quantized": quant.key, "dtype": tdtype,
                    **export_spec, **verify_spec, **({"scales": scales} if scales else {})},
            label=f"{manifest.name} {tag}"))

        tname = f"{manifest.name}/{target.name}"
        lower_params = {"export": export.key, "weights": weights.key, "backend": target.backend,
                        "options": target.options, "constant_methods": exp.constant_methods,
                        "etrecord": target.etrecord, **export_spec}
        lower = plan.add(Step(
            kind=StepKind.LOWER, name=f"lower:{tname}",
            key=stable_hash("lower", export.key, lower_params,
                            _versions("executorch", code=step_code("lower", task=task, flavour=flavour, backend=target.backend))),
            deps=[export.name], params=lower_params, label=tname))

        tol = tolerance(tdtype, scheme, (target.options or {}).get("kv_cache", "static"))
        # Where ExecuTorch's own LLM runner runs the artifact here, verification drives it too.
        runner = "tokenizer" in verify_spec and getattr(backend, "LLM_RUNNER", False)
        verify = plan.add(Step(
            kind=StepKind.VERIFY, name=f"verify:{tname}",
            key=stable_hash("verify", lower.key, reference.key, tol, backend.VERIFY,
                            tokenizer.key if runner else None,
                            _versions("executorch", code=step_code("verify", task=task, backend=target.backend))),
            deps=[lower.name, reference.name, *([tokenizer.name] if runner else [])],
            params={"lower": lower.key, "reference": reference.key, "backend": target.backend,
                    "tolerance": tol, "task": task, "tokenizer": tokenizer.key if runner else None},
            label=tname))

        quality, quality_note = None, _quality_skipped(manifest, backend, task)
        gate = manifest.quality_gate(target) if quality_note is None else None
        if quality_note is None:
            # The float model of this dtype on the evaluation sequences, shared by every scheme
            # and backend; the file's path is where to read it, its sha256 what it is.
            base_key = stable_hash("baseline", weights.key, *other, export_spec, evaluation["identity"],
                                   tokenizer.key if evaluation["text"] else None,
                                   _versions("torch", "transformers", code=step_code("baseline", task=task)))
            baseline = plan.add(Step(
                kind=StepKind.BASELINE, name=f"baseline:{tdtype}.{_short(base_key)}", key=base_key,
                deps=[weights.name, *([tokenizer.name] if evaluation["text"] else [])],
                params={"weights": weights.key, "dtype": tdtype, "evaluation": evaluation["params"],
                        "tokenizer": tokenizer.key if evaluation["text"] else None, **export_spec},
                label=f"{manifest.name} ({tdtype})"))
            quality_params = {"lower": lower.key, "baseline": baseline.key, "backend": target.backend,
                              "task": task, "max_prefill_chunk": exp.max_prefill_chunk, "gate": gate,
                              "speed": measure_speed}
            if scheme.get("rules"):  # mixed precision: also what each rule costs on its own
                quality_params["rules"] = {"weights": weights.key, "scheme": scheme, "dtype": tdtype,
                                           "max_context_length": exp.max_context_length}
            quality = plan.add(Step(
                kind=StepKind.QUALITY, name=f"quality:{tname}",
                key=stable_hash("quality", quality_params,
                                _versions("executorch", "torchao",
                                          code=step_code("quality", task=task, backend=target.backend))),
                deps=[lower.name, baseline.name, *([weights.name] if scheme.get("rules") else [])],
                params=quality_params, label=tname))

        out_dir = artifacts_root / manifest.name / manifest.version
        record = {
            "name": manifest.name, "version": manifest.version, "target": target.name,
            "backend": target.backend, "scheme": scheme_name, "quantization": scheme,
            "dtype": tdtype, "source": src["identity"] if "synthetic" in src["identity"]
            else {k: v for k, v in src["load"].items() if k != "path"} or {"path": src["load"].get("path")},
            "checkpoint_sha256": src["checkpoint"], "tool_versions": tool_versions(),
            # Beside the artifact, relative to it: the files a runner loads as its tokenizer.
            "tokenizer": {"files": tok_files} if tok else None,
            # Beside it too, for speech models: the audio preprocessor program and its config.
            "preprocessor": {"files": list(PREPROCESSOR_FILES)} if preprocessor else None,
            # Measured against the unquantized model (figures added when published), or why not.
            "quality_gate": gate, "quality_skipped": quality_note,
            "keys": {"weights": weights.key, "quantize": quant.key, "export": export.key,
                     "lower": lower.key, "verify": verify.key,
                     **({"quality": quality.key} if quality else {}),
                     **({"tokenizer": tokenizer.key} if tokenizer else {}),
                     **({"preprocessor": preprocessor.key} if preprocessor else {})},
            # Per step, the hash of the code that decides its bytes (the keys hold them too):
            # a release lock names the step whose code changed, and an upgrade that changes
            # none of them leaves a release rebuildable as it is.
            "code": {"weights": code_hash(*step_code("weights")), "quantize": code_hash(*step_code("quantize", calibrated=bool(calib))),
                     **({"tokenizer": code_hash(*step_code("tokenizer"))} if tokenizer else {}),
                     **({"preprocessor": code_hash(*step_code("preprocessor"))} if preprocessor else {}),
                     "export": code_hash(*step_code("export", task=task, flavour=flavour)),
                     "reference": code_hash(*step_code("reference", task=task)),
                     "lower": code_hash(*step_code("lower", task=task, flavour=flavour, backend=target.backend)),
                     "verify": code_hash(*step_code("verify", task=task, backend=target.backend)),
                     **({"baseline": code_hash(*step_code("baseline", task=task)),
                         "quality": code_hash(*step_code("quality", task=task, backend=target.backend))}
                        if quality else {}),
                     "package": code_hash(*step_code("package"))},
        }
        package = plan.add(Step(
            kind=StepKind.PACKAGE, name=f"package:{tname}",
            key=stable_hash("package", record),
            # publish reads the lowered program, the verification and the quantize entry's
            # layers.json: all three are inputs (so none is skipped as not needed).
            deps=[verify.name, quant.name, lower.name, *([quality.name] if quality else []),
                  *([tokenizer.name] if tokenizer else []),
                  *([preprocessor.name] if preprocessor else [])],
            params={"lower": lower.key, "verify": verify.key, "quantize": quant.key,
                    "tokenizer": tokenizer.key if tokenizer else None,
                    "preprocessor": preprocessor.key if preprocessor else None,
                    "quality": quality.key if quality else None,
                    "out_dir": str(out_dir),
                    "stem": f"{manifest.name}-{target.name}", "record": record},
            label=tname))
        packages.append(package.name)
    return packages


def _quality_skipped(manifest, backend, task: str) -> str | None:
    """Why a target's quality is not measured, or None when it is."""
    if not manifest.quality.enabled:
        return "quality.enabled is false"
    if not hasattr(families.get(task), "score"):
        return f"no quality evaluation for the {task} task kind yet"
    if backend.VERIFY != "runtime":
        return f"no {backend.NAME} runtime on a build host: its outputs cannot be compared"
    return None


def _evaluation(manifest, manifest_dir: Path, hasher: FileHasher, tokenizer) -> dict:
    """The evaluation sequences' spec: the stage's params (with the dataset file's path) and
    the identity the baseline's key hashes (its sha256, not where it lies)."""
    from mlxbuild import quality

    q = manifest.quality
    spec = {"sequences": q.sequences, "seed": 0,
            "seq_len": q.seq_len or min(quality.DEFAULT_SEQ_LEN, manifest.export.max_context_length)}
    return _text_spec(manifest, manifest_dir, hasher, tokenizer, spec, q.dataset, quality.DEFAULT_TEXT,
                      ("quality", "dataset"))


def _calibration(manifest, manifest_dir: Path, hasher: FileHasher, tokenizer, scheme_name: str) -> dict:
    """A GPTQ or AWQ scheme's calibration sequences, as :func:`_evaluation` has the evaluation's."""
    from mlxbuild.tokenizer import CORPUS

    c = manifest.quantization[scheme_name].calibration
    samples, seq_len, dataset = (c.samples, c.seq_len, c.dataset) if c else (8, 64, None)
    spec = {"sequences": samples, "seq_len": seq_len, "seed": 1}
    return _text_spec(manifest, manifest_dir, hasher, tokenizer, spec, dataset, CORPUS,
                      ("quantization", scheme_name, "calibration", "dataset"))


def _text_spec(manifest, manifest_dir: Path, hasher: FileHasher, tokenizer, spec: dict, name,
               default: Path, field: tuple) -> dict:
    if tokenizer is None:
        return {"params": {**spec, "dataset": None}, "identity": {**spec, "dataset": None}, "text": False}
    if name and name.startswith("hf:"):
        repo, _, split = name[3:].partition(":")
        dataset = {"hf": repo, "split": split or None}
        return {"params": {**spec, "dataset": dataset}, "identity": {**spec, "dataset": dataset}, "text": True}
    path = (manifest_dir / name) if name else default
    if not path.is_file():
        raise manifest.error_at(field, f"no such file: {path}")
    if path.suffix not in (".txt", ".jsonl", ".md"):
        raise manifest.error_at(field, f"{path.name}: expected a .txt, .md or .jsonl "
                                "file, or hf:OWNER/NAME[:SPLIT]")
    digest = hasher.hash(path)
    return {"params": {**spec, "dataset": {"file": str(path.resolve()), "sha256": digest}},
            "identity": {**spec, "dataset": {"sha256": digest, "format": path.suffix}}, "text": True}


def _dynamic_int4(scheme: dict) -> bool:
    """Whether any rule of a scheme makes 4-bit weights under int8 dynamic activations."""
    return any(r.get("format", "affine") == "affine" and r.get("activations") == "int8_dynamic"
               and r.get("bits") == 4 for r in active_rules(scheme))


def _short(key: str) -> str:
    return key[:10]
