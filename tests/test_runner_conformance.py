"""Artifacts as ExecuTorch's own runners load them: the tokenizer that travels beside them
(generated for synthetic models), the TextLLMRunner check inside verification (a prompt
that fills most of the context, generation to the context limit, token for token against
eager greedy), the self-testing bundled programs (.bpte), and check-bundle's checks of
both. About 3 minutes on 2 cores; the context-past-the-cache and ETRecord-reproducibility
cases are `-m slow` (~80 s more)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from buildlog import doit_command

CONFIG = ("{vocab_size: 128, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
          "num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16, max_position_embeddings: 256, "
          "tie_word_embeddings: true, bos_token_id: 1, eos_token_id: 2}")
MANIFEST = f"""\
name: runner-tiny
version: 0.1.0
model:
  source:
    synthetic: {{architecture: qwen3, seed: 0, config: {CONFIG}}}
  dtype: fp32
export: {{max_context_length: 48}}
quantization:
  8da4w:
    linear: {{bits: 4, group_size: 32, activations: int8_dynamic}}
    embedding: {{bits: 8, group_size: per_channel}}
targets:
  - {{name: xnnpack-8da4w, backend: xnnpack, quantization: 8da4w, etrecord: true}}
  - {{name: portable-fp32, backend: portable, quantization: none, etrecord: true}}
  - {{name: xnnpack-8da4w-ptd, backend: xnnpack, quantization: 8da4w, options: {{external_weights: true}}}}
  - {{name: portable-fp32-ptd, backend: portable, quantization: none, options: {{external_weights: true}}}}
"""


def _doit(root: Path, env, *args, timeout=900):
    return subprocess.run([*doit_command(), *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def released(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("runner")
    (root / "m.yaml").write_text(MANIFEST)
    env = subprocess_env(MLXBUILD_CACHE=root / "cache", MLXBUILD_ARTIFACTS=root / "artifacts")
    p = _doit(root, env, "release", "m.yaml")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root, env, root / "artifacts" / "runner-tiny"


# --------------------------------------------------------------------------- the generated tokenizer


def test_generated_tokenizer_fits_the_vocabulary_and_is_deterministic(tmp_path):
    from tokenizers import Tokenizer

    from mlxbuild import tokenizer

    spec = tokenizer.synthetic_spec({"vocab_size": 300, "bos_token_id": 5, "eos_token_id": [7, 9]})
    assert spec["special"] == {"5": "<|bos|>", "7": "<|eos|>", "9": "<|eos_1|>"}
    tokenizer.write_synthetic(spec, tmp_path / "a")
    tokenizer.write_synthetic(spec, tmp_path / "b")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "a" / "tokenizer.json") == digest(tmp_path / "b" / "tokenizer.json")
    tok = Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json"))
    assert tok.get_vocab_size() == 300
    assert tok.id_to_token(5) == "<|bos|>" and tok.id_to_token(9) == "<|eos_1|>"
    # Every id the model can emit decodes to text of its own, as a runner's callback shows it.
    pieces = tokenizer.pieces(tmp_path / "a", list(range(300)))
    assert all(p and p.isascii() for p in pieces) and len(set(pieces)) == 300
    assert tokenizer.check(tmp_path / "a", {"get_vocab_size": 300, "get_bos_id": 5, "get_eos_ids": [7, 9]}) == []
    # A vocabulary too small for the corpus's characters gets no tokenizer.
    assert tokenizer.synthetic_spec({"vocab_size": 16}) is None


def test_tokenizer_check_names_what_disagrees_with_the_program(tmp_path):
    from mlxbuild import tokenizer

    tokenizer.write_synthetic(tokenizer.synthetic_spec({"vocab_size": 128, "bos_token_id": 1,
                                                        "eos_token_id": 2}), tmp_path)
    problems = tokenizer.check(tmp_path, {"get_vocab_size": 100, "get_bos_id": 3, "get_eos_ids": [4]})
    assert any("128 tokens, the program's vocabulary has 100" in p for p in problems)
    assert any("EOS id 2, the program's get_eos_ids is [4]" in p for p in problems)
    assert any("BOS id 1, the program's get_bos_id is 3" in p for p in problems)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert "does not load as the runner loads it" in tokenizer.check(tmp_path, {})[0]


def test_runner_reference_prefills_with_the_last_rows_head_only(tmp_path):
    """The eager continuation is computed with the output head on the prefill's last row only
    (the whole prompt's logits were the reference step's largest allocation): the same tokens
    and margins as the full logits give, and the head is left as it was."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from mlxbuild import tokenizer
    from mlxbuild.families import hf, text_runner

    tokenizer.write_synthetic(tokenizer.synthetic_spec({"vocab_size": 128, "bos_token_id": 1,
                                                        "eos_token_id": 2}), tmp_path)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = Qwen3ForCausalLM(config).eval()
    seen = []
    model.lm_head.register_forward_hook(lambda _m, _a, out: seen.append(out.shape[1]))
    ref = text_runner.runner_reference(model, {"max_context_length": 40, "runner_prompt": 30}, tmp_path)
    assert seen[0] == 1 and ref["prompt_tokens"] > 1 and len(model.lm_head._forward_pre_hooks) == 0

    exportable = hf.make_exportable(model, 40).eval()
    with torch.no_grad():
        logits = exportable(input_ids=torch.tensor([ref["prompt_ids"]]),
                            cache_position=torch.arange(ref["prompt_tokens"]))
    assert logits.shape[1] == ref["prompt_tokens"]  # the hook is gone: every row again
    top = torch.topk(logits[0, -1].float(), 2)
    assert ref["tokens"][0] == int(top.indices[0])
    assert ref["margins"][0] == pytest.approx(float(top.values[0] - top.values[1]), rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- verification drives TextLLMRunner


def test_verification_ran_textllmrunner_to_the_context_limit(released):
    _, _, out = released
    version = out / "0.1.0"
    for target in ("xnnpack-8da4w", "portable-fp32"):
        record = json.loads((version / f"runner-tiny-{target}.json").read_text())
        assert record["tokenizer"] == {"files": ["tokenizer.json", "tokenizer_config.json"]}
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(record["files"])
        cm = record["constant_methods"]
        assert cm["get_max_seq_len"] == cm["get_max_context_len"] == 48
        runner = record["verification"]["runner"]
        assert runner["passed"], runner
        # A prompt of most of the context, then the runner's own budget: to the limit (or EOS).
        assert runner["prompt_tokens"] == 48 - 12
        assert runner["new_tokens"] == runner["expected_new_tokens"] <= 12
        assert runner["matched"] == runner["new_tokens"] or "near tie" in runner.get("note", "")


def test_published_tokenizer_runs_the_artifact_through_textllmrunner(released):
    """What an app does with the folder: the runner, the .pte and the tokenizer beside it."""
    from backends.et_runtime import text_llm_generate
    from mlxbuild import tokenizer

    version = released[2] / "0.1.0"
    prompt, ids = tokenizer.runner_prompt(version, 40)
    assert len(ids) == 40
    pieces = text_llm_generate(version / "runner-tiny-portable-fp32.pte", version, prompt)
    assert 1 <= len(pieces) <= 48 - 40


def test_external_weights_ship_in_a_ptd_that_the_runners_load(released, tmp_path):
    """`options: {external_weights: true}`: the weights go to a .ptd beside the .pte; the
    program alone does not run, the pair gives the same logits as the program with its
    weights inside, and TextLLMRunner and `mlxbuild run` load the pair."""
    import torch

    from backends import et_runtime
    from backends.et_runtime import text_llm_generate
    from mlxbuild import tokenizer

    version = released[2] / "0.1.0"
    inputs = [torch.tensor([[3, 4, 5]]), torch.arange(3)]
    for target, inline in (("xnnpack-8da4w-ptd", "xnnpack-8da4w"), ("portable-fp32-ptd", "portable-fp32")):
        pte, ptd = version / f"runner-tiny-{target}.pte", version / f"runner-tiny-{target}.ptd"
        record = json.loads((version / f"runner-tiny-{target}.json").read_text())
        assert record["files"][ptd.name]["sha256"] == hashlib.sha256(ptd.read_bytes()).hexdigest()
        verification = record["verification"]
        assert verification["passed"] and verification["runner"]["passed"], verification
        assert "bundled-program loader" in verification["bundled_program"]["skipped"]
        whole = version / f"runner-tiny-{inline}.pte"
        # The weights left the program: its constants and its delegate's named data are in the .ptd.
        assert weight_bytes(pte) <= 0.01 * weight_bytes(whole) and ptd.stat().st_size >= weight_bytes(whole)
        expected = et_runtime.load(whole).run("forward", inputs)[0]
        assert torch.equal(et_runtime.load(pte, [ptd]).run("forward", inputs)[0], expected), target
        alone = tmp_path / pte.name  # without the .ptd beside it
        alone.write_bytes(pte.read_bytes())
        with pytest.raises(RuntimeError):
            et_runtime.load(alone).run("forward", inputs)
        prompt, _ = tokenizer.runner_prompt(version, 8)
        assert len(text_llm_generate(pte, version, prompt, ptd)) >= 1
        run = subprocess.run([sys.executable, "-m", "mlxbuild.cli", "run", str(pte), "--max-new-tokens", "4",
                              "--json"], capture_output=True, text=True, env=released[1], timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]


def weight_bytes(pte: Path) -> int:
    """Bytes of weights inside a program: its constant segment and its named data."""
    from mlxbuild.pte_inspect import inspect_pte

    info = inspect_pte(pte)
    return (info["constant_segment"] or {}).get("bytes", 0) + (info["named_data"] or {}).get("bytes", 0)


# slow: ~50 s (a build with a context past the cache).
@pytest.mark.slow
def test_a_context_length_past_the_cache_fails_verification(released):
    """get_max_context_len overridden past the KV cache: the runner generates past it, and
    verification fails (exit 4) instead of publishing an artifact apps would crash on."""
    root, env, _ = released
    bad = MANIFEST.replace("name: runner-tiny", "name: runner-bad").replace(
        "export: {max_context_length: 48}", "export: {max_context_length: 48, constant_methods: {get_max_context_len: 96}}")
    bad = bad.replace("  - {name: xnnpack-8da4w, backend: xnnpack, quantization: 8da4w}\n", "")
    (root / "bad.yaml").write_text(bad)
    p = _doit(root, env, "build", "bad.yaml")
    assert p.returncode == 4, p.stdout[-2000:] + p.stderr[-2000:]
    assert "runner:" in p.stdout + p.stderr
    assert not (root / "artifacts" / "runner-bad" / "0.1.0" / "runner-bad-portable-fp32.pte").exists()


# --------------------------------------------------------------------------- check-bundle


def _rewrite_bundle(bundle: Path, dest: Path, edit) -> Path:
    """A copy of the bundle with one member's bytes changed by ``edit(name, data)``."""
    with tarfile.open(bundle) as src, tarfile.open(dest, "w:gz") as out:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if data is not None:
                data = edit(m.name.split("/", 1)[1], data)
                if data is None:
                    continue
                m.size = len(data)
            out.addfile(m, None if data is None else __import__("io").BytesIO(data))
    return dest


def test_bundled_programs_carry_the_verification_and_catch_a_wrong_output(released, tmp_path):
    import torch

    from backends.et_runtime import run_bundled_program, write_bundled_program

    version = released[2] / "0.1.0"
    for target in ("xnnpack-8da4w", "portable-fp32"):
        record = json.loads((version / f"runner-tiny-{target}.json").read_text())
        bundled = record["verification"]["bundled_program"]
        assert bundled["passed"] and bundled["test_cases"] == 1 and bundled["atol"] > 0
        bpte = version / f"runner-tiny-{target}.bpte"
        assert record["files"][bpte.name]["sha256"] == hashlib.sha256(bpte.read_bytes()).hexdigest()
        assert run_bundled_program(bpte, "forward", bundled["atol"], 0.0) == ""
    # The same test case with an expected output off by more than the bound fails.
    pte = version / "runner-tiny-portable-fp32.pte"
    inputs = [torch.tensor([[3, 4, 5]]), torch.arange(3)]
    from executorch.runtime import Runtime

    got = Runtime.get().load_program(str(pte)).load_method("forward").execute(inputs)[0]
    (tmp_path / "ok.bpte").write_bytes(write_bundled_program(pte, "forward", inputs, [got]))
    assert run_bundled_program(tmp_path / "ok.bpte", "forward", 1e-6, 0.0) == ""
    (tmp_path / "bad.bpte").write_bytes(write_bundled_program(pte, "forward", inputs, [got + 0.5]))
    assert "Result verification failed" in run_bundled_program(tmp_path / "bad.bpte", "forward", 1e-3, 0.0)


def test_a_program_past_a_flatbuffers_reach_is_not_bundled(released, tmp_path, monkeypatch):
    """A bundled program is one flatbuffer holding the program, which cannot pass 2 GiB: a
    larger program (Llama-3.2-3B's XNNPACK 8da4w, 2.2 GB) is verified without one, saying
    why, instead of failing its verification on flatbuffers' BuilderSizeError."""
    from mlxbuild.stages import verify

    pte = released[2] / "0.1.0" / "runner-tiny-portable-fp32.pte"
    monkeypatch.setattr(verify, "BUNDLED_MAX_PROGRAM", pte.stat().st_size - 1)
    result = verify.bundled(pte, tmp_path / "no-reference", {"max_rel_error": 1e-3}, tmp_path)
    assert result["passed"] and "flatbuffer of at most 2 GiB" in result["skipped"]
    assert not (tmp_path / verify.BUNDLED).exists()


def test_check_bundle_checks_the_tokenizer(released, tmp_path):
    from mlxbuild.bundle import check_bundle

    bundle = released[2] / "runner-tiny-0.1.0.tar.gz"
    problems, notes = check_bundle(bundle)
    assert problems == []
    assert any("TextLLMRunner with the bundle's tokenizer" in n for n in notes)
    assert any("runner-tiny-xnnpack-8da4w.bpte: its 1 bundled test passes" in n for n in notes)

    def wrong_eos(name, data):
        if name != "tokenizer_config.json":
            return data
        config = json.loads(data)
        config["eos_token"] = config["bos_token"]
        return json.dumps(config).encode()

    problems, _ = check_bundle(_rewrite_bundle(bundle, tmp_path / "eos.tar.gz", wrong_eos))
    assert any("tokenizer:" in p and "EOS id 1, the program's get_eos_ids is [2]" in p for p in problems)

    missing = _rewrite_bundle(bundle, tmp_path / "missing.tar.gz",
                              lambda name, data: None if name == "tokenizer.json" else data)
    problems, _ = check_bundle(missing)
    assert any("tokenizer.json" in p for p in problems)


# --------------------------------------------------------------------------- ETRecord


def test_published_etrecord_maps_a_runs_events_back_to_the_model(released, tmp_path):
    """The devtools workflow on a published artifact: run the .pte with ETDump on, hand the
    dump and the published ETRecord to the Inspector, and its events name the model's ops
    and the source lines they came from."""
    import torch

    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    version = released[2] / "0.1.0"
    stem = version / "runner-tiny-portable-fp32"
    record = json.loads(stem.with_suffix(".json").read_text())
    etrecord = stem.with_suffix(".etrecord")
    assert record["files"][etrecord.name]["sha256"] == hashlib.sha256(etrecord.read_bytes()).hexdigest()
    module = _load_for_executorch(str(stem.with_suffix(".pte")), enable_etdump=True)
    module.run_method("forward", (torch.tensor([[3, 4, 5, 6]]), torch.arange(4)))
    module.write_etdump_result_to_file(str(tmp_path / "run.etdump"))
    inspector = Inspector(etdump_path=str(tmp_path / "run.etdump"), etrecord=str(etrecord))
    events = [e for block in inspector.event_blocks for e in block.events if e.op_types]
    ops = {op for e in events for op in e.op_types}
    assert {"aten.mm.default", "aten.embedding.default"} & ops or any("linear" in op for op in ops), ops
    # Source lines of the model (transformers' modeling code) reach the events.
    assert any(e.stack_traces and any("modeling_qwen3" in str(t) for t in e.stack_traces.values())
               for e in events)


# slow: ~30 s (a second lowering of both targets with ETRecords).
@pytest.mark.slow
def test_etrecords_are_reproducible_and_checked_by_check_bundle(released, tmp_path):
    from mlxbuild.bundle import _check_etrecord, check_bundle
    from mlxbuild.pte_inspect import inspect_pte

    root, env, out = released
    version = out / "0.1.0"
    problems, notes = check_bundle(out / "runner-tiny-0.1.0.tar.gz")
    assert problems == []
    assert sum("etrecord: parses as the devtools Inspector reads it (methods forward)" in n for n in notes) == 2
    pte = version / "runner-tiny-xnnpack-8da4w.pte"
    damaged = tmp_path / "runner-tiny-xnnpack-8da4w.etrecord"
    damaged.write_bytes(pte.with_suffix(".etrecord").read_bytes()[:4096])
    assert "does not parse as an ETRecord" in _check_etrecord(damaged, inspect_pte(pte))
    # Lowering again in a fresh process and cache gives the same ETRecord bytes
    # (ExecuTorch's own file holds object ids and zip times; ours renumbers and pins them).
    again = subprocess_env_like(env, tmp_path)
    p = _doit(root, again, "build", "--target", "xnnpack-8da4w", "m.yaml")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rebuilt = tmp_path / "artifacts" / "runner-tiny" / "0.1.0" / "runner-tiny-xnnpack-8da4w.etrecord"
    assert rebuilt.read_bytes() == pte.with_suffix(".etrecord").read_bytes()


def subprocess_env_like(env: dict, tmp_path: Path) -> dict:
    return {**env, "MLXBUILD_CACHE": str(tmp_path / "cache"), "MLXBUILD_ARTIFACTS": str(tmp_path / "artifacts")}


def test_model_cards_textllmrunner_snippet_runs_in_the_unpacked_bundle(released, tmp_path):
    """The release's model card shows app teams ExecuTorch's own runner; its Python block,
    run as written from the unpacked bundle, generates with the bundle's tokenizer."""
    import re
    import sys

    root, env, out = released
    with tarfile.open(out / "runner-tiny-0.1.0.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    folder = tmp_path / "runner-tiny-0.1.0"
    card = (folder / "README.md").read_text()
    section = card.split("### Text generation (ExecuTorch's `TextLLMRunner`)", 1)[1]
    assert "pip install executorch==1.5.1 torch==2.13.0" in section
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'TextLLMRunner("runner-tiny-portable-fp32.pte", "tokenizer.json")' in code
    p = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    # 32 greedy tokens of the generated vocabulary (printable ASCII) reach the callback.
    assert len(p.stdout.strip()) >= 32 and p.stdout.isascii(), p.stdout
