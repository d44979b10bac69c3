"""The model card (README.md) of a release bundle, rendered from its lock alone.

Nothing here reads the clock or the host: the same lock renders the same bytes,
so a bundle is reproducible.
"""

from __future__ import annotations

import json

# What each backend's artifact is for, and what runs it.
DEVICES = {
    "mlx": "Apple silicon GPUs (M1 or later) through MLX, on macOS; needs an ExecuTorch runtime built "
           "with the MLX delegate",
    "xnnpack": "Arm64 and x86-64 CPUs (Android, iOS, macOS, Linux, Windows) through XNNPACK",
    "portable": "any CPU ExecuTorch runs on (portable kernels: the reference, not the fast path)",
    "coreml": "Apple Neural Engine / GPU / CPU through Core ML (iOS, macOS)",
    "vulkan": "GPUs with Vulkan (Android)",
    "cuda": "NVIDIA GPUs through CUDA",
}


def render(lock: dict) -> str:
    name, version = lock["name"], lock["version"]
    targets = lock["targets"]
    out = [f"# {name} {version}", ""]
    out += [f"ExecuTorch programs (`.pte`) of {_source(lock)}, built and verified by mlxbuild "
            f"{lock.get('tool_versions', {}).get('mlxbuild', '?')} from `{lock.get('manifest_file') or 'a manifest'}`. "
            "`release.lock.json` records every input; `SHA256SUMS` the bytes of every file "
            "(`sha256sum -c SHA256SUMS`).", ""]

    out += ["## Targets", "", "| target | file | for | dtype | quantization | size |", "|---|---|---|---|---|---|"]
    for t, e in sorted(targets.items()):
        out.append(f"| `{t}` | {', '.join(f'`{f}`' for f in sorted(e['files']))} | {DEVICES.get(e['backend'], e['backend'])} "
                   f"| {e.get('dtype')} | {e.get('scheme')} | {_size(_program_size(e))} |")
    out.append("")

    out += ["## Quantization", ""]
    for t, e in sorted(targets.items()):
        out.append(f"- `{t}` (scheme `{e.get('scheme')}`): {_scheme(e.get('quantization') or {})}")
        summary = e.get("layer_quantization")
        if summary:
            counts = ", ".join(f"{n} × {fmt}" for fmt, n in sorted((summary.get("counts") or {}).items()))
            line = f"  - per layer: {summary.get('layers', '?')} layers: {counts or 'none quantized'}"
            tied = summary.get("tied") or {}
            if tied:
                line += "; tied: " + ", ".join(f"`{a}` = `{b}`" for a, b in sorted(tied.items()))
            out.append(line)
    out.append("")

    out += ["## Verification", "",
            "Each program was run on the build host like an LLM runner runs it (a prefill, then "
            "single-token decode steps through the KV cache) and compared with the eager PyTorch model "
            "quantized the same way.", "",
            "| target | runtime | max abs error | relative to the largest logit (allowed) | top-1 agreement | passed |",
            "|---|---|---|---|---|---|"]
    for t, e in sorted(targets.items()):
        v = e.get("verification") or {}
        if v.get("executed") is False:
            out.append(f"| `{t}` | not run (structural check only) | — | — | — | {v.get('passed')} |")
            continue
        allowed = (v.get("tolerance") or {}).get("max_rel_error")
        runtime = v.get("runtime") or ("mlxbuild MLX runtime (mlx.core)" if e["backend"] == "mlx"
                                       else "executorch.runtime")
        out.append(f"| `{t}` | {runtime} | {_num(v.get('max_abs_error'))} | {_num(v.get('max_rel_error'))} "
                   f"({_num(allowed)}) | {_pct(v.get('top1_agreement'))} | {v.get('passed')} |")
    out.append("")

    out += ["## Quality", "",
            "Each program's next-token distributions on the evaluation sequences, run through its own "
            "runtime, against the unquantized model of the same checkpoint and dtype (KL divergence in "
            "nats; perplexity where the sequences are text). A target below its gate is not published.", "",
            "| target | KLD mean (p99) | top-1 vs float (where decisive) | perplexity (float → program) | gate | evaluated on |",
            "|---|---|---|---|---|---|"]
    for t, e in sorted(targets.items()):
        q = e.get("quality") or {}
        if q.get("kld_mean") is None:
            out.append(f"| `{t}` | not measured: {q.get('reason') or 'no figures in the record'} | — | — | — | — |")
            continue
        ppl = (f"{q['ppl_float']:.2f} → {q['ppl']:.2f} ({q['ppl_increase']:+.1%})"
               if q.get("ppl") is not None else "—")
        gate = ", ".join(f"{k} {v:g}" for k, v in sorted((q.get("gate") or {}).items()) if v is not None)
        ev = q.get("evaluation") or {}
        where = f"{ev.get('sequences')} × {ev.get('seq_len')} tokens of {ev.get('source')}" if ev else "—"
        out.append(f"| `{t}` | {_num(q['kld_mean'])} ({_num(q.get('kld_p99'))}) | {_pct(q.get('top1'))} "
                   f"({_pct(q.get('top1_decisive'))} of {q.get('decisive_positions', '—')}) | "
                   f"{ppl} | {gate} | {where} |")
    out.append("")
    ruled = [(t, e["quality"]["rules"]) for t, e in sorted(targets.items()) if (e.get("quality") or {}).get("rules")]
    if ruled:
        out += ["Per rule of a mixed-precision scheme: the float model with only that rule's layers "
                "quantized (eager torch), so the rule that costs the most stands out.", "",
                "| target | rule | layers | quantization | KLD mean | top-1 vs float |", "|---|---|---|---|---|---|"]
        for t, rules in ruled:
            for r in rules.values():
                out.append(f"| `{t}` | {r['rule']} | {r['layers']} | {r['quantization']} | "
                           f"{_num(r['kld_mean'])} | {_pct(r.get('top1'))} |")
        out.append("")

    out += ["## Speed", ""]
    for t, e in sorted(targets.items()):
        out.append(f"- `{t}`: {_speed(e.get('speed'))}")
    out.append("")

    out += _loading(name, targets, lock.get("tool_versions") or {})

    out += ["## Licence", ""]
    lic = lock.get("license")
    if not lic:
        out.append("The checkpoint's folder has no licence file and its README names none: check the "
                   "licence of the original weights before shipping.")
    else:
        if lic.get("name"):
            out.append(f"The checkpoint's model card names the licence: **{lic['name']}**.")
        if lic.get("file"):
            out.append(f"The checkpoint's licence file is included as `{lic['file']}` ({lic.get('title', '')}).")
    out.append("")

    out += ["## Build inputs", "", "| | |", "|---|---|"]
    for tool, v in sorted((lock.get("tool_versions") or {}).items()):
        out.append(f"| {tool} | {v} |")
    checkpoint = next(iter(targets.values()), {}).get("inputs", {}).get("checkpoint_sha256") or {}
    for f, sha in sorted(checkpoint.items()):
        out.append(f"| checkpoint `{f}` | sha256 `{sha}` |")
    out.append("")
    return "\n".join(out)


def _source(lock: dict) -> str:
    source = (lock.get("manifest") or {}).get("model", {}).get("source", {})
    if source.get("hf"):
        return f"`{source['hf']}`" + (f" at revision `{source['revision']}`" if source.get("revision") else "")
    if source.get("path"):
        return f"the checkpoint `{source['path']}`"
    if source.get("synthetic"):
        return f"a synthetic {source['synthetic'].get('architecture')} model (deterministic weights, seed {source['synthetic'].get('seed')})"
    if source.get("module"):
        return f"`{source['module']}`"
    return "the model"


def _scheme(q: dict) -> str:
    parts = []
    # Layer kinds in the manifest's usual order, whatever order the lock's JSON keeps.
    order = {"linear": 0, "embedding": 1}
    for kind, rule in sorted(q.items(), key=lambda kv: (order.get(kv[0], 2), kv[0])):
        if kind == "rules" and isinstance(rule, list):
            if rule:
                parts.append(f"per-layer rules (first match wins): {', '.join(_rule(r) for r in rule)}")
            continue
        if rule is None:
            parts.append(f"{kind}: not quantized")
        elif isinstance(rule, dict) and rule.get("bits"):
            fmt = rule.get("format", "affine")
            group = rule.get("group_size")
            group = "per channel" if group == "per_channel" else f"group {group}" if group else ""
            act = rule.get("activations")
            parts.append(f"{kind}: {fmt} {rule['bits']}-bit" + (f", {group}" if group else "")
                         + (f", activations {act}" if act and act != "none" else ""))
        elif isinstance(rule, dict) and rule.get("format"):
            parts.append(f"{kind}: {rule['format']}")
        else:
            parts.append(f"{kind}: {json.dumps(rule, sort_keys=True)}")
    return "; ".join(parts) or "none (full precision)"


def _rule(r: dict) -> str:
    picks = " ".join(f"{k}={json.dumps(r[k])}" for k in ("match", "regex", "blocks", "layers") if r.get(k) is not None)
    quant = "unquantized" if r.get("format") == "none" else _scheme({"x": r})[3:]
    return f"{picks} -> {quant}"


def _speed(s) -> str:
    if not s:
        return "not measured"
    if not isinstance(s, dict):
        return str(s)
    bits = []
    for key, label in (("prefill_tokens_per_s", "prefill"), ("decode_tokens_per_s", "decode")):
        if s.get(key) is not None:
            bits.append(f"{label} {s[key]:.1f} tok/s")
    rest = {k: v for k, v in s.items() if k not in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    return ", ".join(bits + [f"{k}: {v}" for k, v in sorted(rest.items())]) or "not measured"


def _loading(name: str, targets: dict, versions: dict | None = None) -> list[str]:
    by = lambda *backends: [t for t, e in sorted(targets.items()) if e["backend"] in backends]  # noqa: E731
    cpu, mlx = by("xnnpack", "portable"), by("mlx")
    example = f"{name}-{(cpu or mlx or sorted(targets))[0]}.pte"
    e0 = targets[(cpu or mlx or sorted(targets))[0]]
    cm = e0.get("constant_methods") or {}
    methods = e0.get("methods")  # absent from locks written before it was recorded: an LLM then
    if methods and set(methods) != {"forward"}:
        out = ["## Loading", "", "Methods (the same in every target; shapes are upper bounds where dynamic):", ""]
        out += [f"- `{m}({', '.join(_sig(v) for v in sig['inputs'])}) -> {', '.join(_sig(v) for v in sig['outputs'])}`"
                for m, sig in methods.items()]
        out += ["", f"Constant methods: {', '.join(f'`{k}`' for k in sorted(cm)) or 'none'}. Below, the plain "
                "`Module` APIs with an LLM's `forward` as the example; call the methods above by name "
                "(`load_method(name)`, `module.execute(name, ...)`).", ""]
    else:
        out = ["## Loading", "",
               "Every program has `forward(input_ids: int64[1, T], cache_position: int64[T]) -> "
               f"logits: float[1, T, {cm.get('get_vocab_size', 'vocab')}]` with a KV cache kept inside the program "
               f"(T up to {cm.get('get_prefill_chunk_size', '?')} per call, {cm.get('get_max_context_len', '?')} "
               "positions in all), and the constant methods ExecuTorch's LLM runners read "
               f"({', '.join(f'`{k}`' for k in sorted(cm)) or 'none'}). For text generation use an LLM runner "
               "(C++ `TextLLMRunner`, Swift `TextLLMRunner`, Android `LlmModule`) with the model's tokenizer; "
               "below, the plain `Module` APIs.", ""]
    if any(e["files"] and len(e["files"]) > 1 for e in targets.values()):
        out += ["Targets with a `.ptd` file keep their weights there: pass it as the data file "
                "(Python `data_path=`, C++ `Module(pte, ptd)`).", ""]
    tok = (e0.get("tokenizer") or {}).get("files") or []
    runner_file = next((f for f in ("tokenizer.json", "tokenizer.model") if f in tok), None)
    if cpu and runner_file and not (methods and set(methods) != {"forward"}):
        # What app teams run: ExecuTorch's own runner (the C++ one behind the Swift and
        # Android APIs) over the folder as it is, the tokenizer beside the program.
        v = versions or {}
        et, torch_v = v.get("executorch", "<version>"), str(v.get("torch", "<version>")).split("+")[0]
        out += ["### Text generation (ExecuTorch's `TextLLMRunner`)", "",
                "From this folder, with only ExecuTorch installed (its wheel does not declare torch, "
                "which its Python runtime imports):", "", "```sh",
                f"pip install executorch=={et} torch=={torch_v}", "```", "", "```python",
                "import executorch.extension.llm.custom_ops.custom_ops  # llama::update_cache, custom_sdpa",
                "import executorch.kernels.quantized                    # quantized embedding kernels",
                "from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner", "",
                f'runner = TextLLMRunner("{name}-{cpu[0]}.pte", "{runner_file}")',
                'runner.generate("Once upon a time", GenerationConfig(temperature=0.0, max_new_tokens=32),',
                '                token_callback=lambda piece: print(piece, end="", flush=True))',
                "```", "",
                f"Prompts up to the context ({cm.get('get_max_context_len', '?')} tokens) are prefilled in "
                "one call; `max_new_tokens=-1` generates to the context limit.", ""]
    out += ["### Python (`executorch.runtime`)", "", "```python",
            "import torch",
            "import executorch.extension.llm.custom_ops.custom_ops  # LLM attention/KV-cache kernels (XNNPACK)",
            "import executorch.kernels.quantized                    # quantized embedding kernels",
            "from executorch.runtime import Runtime", "",
            f'forward = Runtime.get().load_program("{example}").load_method("forward")',
            "logits, = forward.execute([torch.tensor([[1, 15, 27]]), torch.arange(3)])",
            "```", ""]
    if mlx:
        out += [f"MLX targets ({', '.join(f'`{t}`' for t in mlx)}) run in `executorch.runtime` only where it was "
                "built with the MLX delegate (Apple silicon, `python install_executorch.py` with Xcode's Metal "
                "compiler). On any host, mlxbuild's own MLX interpreter runs them: "
                f'`import mlx_runtime; mlx_runtime.load("{name}-{mlx[0]}.pte").forward(ids, positions)`.', ""]
    out += ["### C++ (`Module`)", "", "```cpp",
            "#include <executorch/extension/module/module.h>",
            "#include <executorch/extension/tensor/tensor.h>",
            "using namespace executorch::extension;", "",
            f'Module module("{example}");',
            "std::vector<int64_t> ids = {1, 15, 27}, pos = {0, 1, 2};",
            "auto input_ids = from_blob(ids.data(), {1, 3}, executorch::aten::ScalarType::Long);",
            "auto cache_position = from_blob(pos.data(), {3}, executorch::aten::ScalarType::Long);",
            "auto logits = module.forward({input_ids, cache_position})->at(0).toTensor();",
            "```", "",
            "Link the backend each target needs: XNNPACK `xnnpack_backend`, MLX `mlxdelegate` and `mlx` "
            "(`cmake --workflow --preset mlx-release` on a Mac), and the kernels left outside the delegate "
            "(portable/optimized ops, `custom_ops`, `quantized_ops_lib`).", "",
            "### iOS and macOS (Swift)", "",
            "Add the `executorch` Swift package (branch `swiftpm-<version>`) and link `executorch`, "
            "`backend_xnnpack`, `kernels_llm`, `kernels_optimized` and `kernels_quantized`"
            + (f"; MLX targets ({', '.join(f'`{t}`' for t in mlx)}) need a runtime built from source with the MLX "
               "delegate (macOS on Apple silicon)" if mlx else "") + ".", "", "```swift",
            "import ExecuTorch", "",
            f'let module = Module(filePath: Bundle.main.path(forResource: "{example[:-4]}", ofType: "pte")!)',
            'try module.load("forward")',
            "let inputIds = Tensor<Int64>([1, 15, 27], shape: [1, 3])",
            "let positions = Tensor<Int64>([0, 1, 2], shape: [3])",
            "let logits = try Tensor<Float>(module.forward([inputIds, positions]))",
            "```", "",
            "### Android (Java)", "",
            "Depend on `org.pytorch:executorch-android` (it includes XNNPACK and the portable kernels); "
            + ("MLX targets do not run on Android. " if mlx else "") + "", "```java",
            "import org.pytorch.executorch.EValue;",
            "import org.pytorch.executorch.Module;",
            "import org.pytorch.executorch.Tensor;", "",
            f'Module module = Module.load("/data/local/tmp/{example}");',
            "Tensor ids = Tensor.fromBlob(new long[] {1, 15, 27}, new long[] {1, 3});",
            "Tensor pos = Tensor.fromBlob(new long[] {0, 1, 2}, new long[] {3});",
            "float[] logits = module.forward(EValue.from(ids), EValue.from(pos))[0].toTensor().getDataAsFloatArray();",
            "```", ""]
    return out


def _sig(v: dict) -> str:
    if v.get("dtype") is None:
        return str(v.get("kind", "?"))
    return f"{v['dtype']}[{', '.join(map(str, v.get('sizes', [])))}]"


def _program_size(entry: dict) -> int:
    """What an app loads (the .pte and its .ptd files); tokenizer, bundled program and
    ETRecord are listed, not counted."""
    return sum(f["size"] for n, f in entry["files"].items() if n.endswith((".pte", ".ptd")))


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(v) -> str:
    return "—" if v is None else f"{v:.3g}"


def _pct(v) -> str:
    return "—" if v is None else f"{v:.0%}"
