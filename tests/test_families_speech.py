"""Speech-to-text (Whisper): the tiny synthetic manifest builds, verifies and runs.

One build (a subprocess `doit build`, as a user runs it) of manifests/whisper.yaml with
its MLX and portable targets runs once for the module (~1 min on 2 cores); the XNNPACK
target's lowering alone takes about as long again, so the full manifest is `slow`.
The numerical check here is independent of the build's verify step: the artifact's
greedy transcription loop against transformers' own `generate` on the same features,
and the artifact's logits against the eager model's along that transcription.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import buildlog
from buildlog import build, eager_model, run_json as _run_json
import yaml

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "manifests" / "whisper.yaml"
NAME, VERSION = "whisper-tiny-synthetic", "0.1.0"
FAST_TARGETS = ("mlx-4w", "portable-fp32")


def write_manifest(root: Path, targets) -> Path:
    return buildlog.write_manifest(root, MANIFEST, targets)


@pytest.fixture(scope="module")
def built(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("whisper")
    p = build(root, subprocess_env, write_manifest(root, FAST_TARGETS))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root


def artifact(root: Path, target: str) -> tuple[Path, dict]:
    return buildlog.artifact(root, NAME, VERSION, target)


@pytest.mark.parametrize("target", FAST_TARGETS)
def test_build_verifies_encoder_and_decoder(built, target):
    _, record = artifact(built, target)
    check = record["verification"]
    assert check["passed"] and check["executed"], check
    assert check["encoder"]["passed"] and check["encoder"]["max_rel_error"] <= check["tolerance"]["max_rel_error"]
    assert check["positions"] == 4 + 8  # prompt (start id + seeded fill) + greedy decode steps
    assert check["max_rel_error"] <= check["tolerance"]["max_rel_error"]
    assert set(record["delegation"]) == {"encoder", "text_decoder"}
    if target.startswith("mlx"):
        assert check["structure"]["passed"], check["structure"]
        for method in ("encoder", "text_decoder"):
            assert record["delegation"][method]["delegates"] == ["MLXBackend"]
            assert record["delegation"][method]["portable_ops"] == {}


def test_pte_has_both_methods_and_runner_constants(built):
    from mlxbuild.pte_inspect import inspect_pte

    for target in FAST_TARGETS:
        info = inspect_pte(artifact(built, target)[0])
        assert set(info["methods"]) == {"encoder", "text_decoder"}
        enc = info["methods"]["encoder"]["inputs"]
        assert [i["sizes"] for i in enc] == [[1, 80, 100]]
        dec = info["methods"]["text_decoder"]["inputs"]
        assert len(dec) == 3 and dec[1]["sizes"] == [1, 50, 64]  # ids, encoder output, cache_position
        c = info["constant_methods"]
        assert c["get_decoder_start_ids"] == [1] and c["decoder_start_token_id"] == 1
        assert c["get_eos_ids"] == [2]
        assert (c["get_num_mel_bins"], c["get_num_frames"], c["get_encoder_seq_len"]) == (80, 100, 50)
        assert (c["get_max_seq_len"], c["get_prefill_chunk_size"], c["get_vocab_size"]) == (32, 8, 256)


@pytest.mark.parametrize("target", FAST_TARGETS)
def test_transcription_matches_transformers_generate(built, target):
    import torch

    from mlxbuild.families import whisper_modules
    from mlxbuild.families import speech_to_text, whisper
    from backends import open_program
    from mlxbuild.families.common import as_numpy

    pte, record = artifact(built, target)
    model = eager_model(built, record)
    program = open_program(pte)
    for seed in (1, 2):  # not the verify step's seed-0 input
        feats = whisper_modules.synthetic_features(model.config, seed)
        got = speech_to_text.transcribe(program, feats.numpy(), max_new_tokens=10)
        with torch.no_grad():
            want = model.generate(feats, max_new_tokens=10, do_sample=False, num_beams=1)[0].tolist()
        assert got["prompt"] == [1]
        assert got["tokens"] == want, (seed, got["tokens"], want)
        assert len(set(want)) > 1  # the weights are wide enough for the input to matter
        # And the logits along that transcription, on the artifact's own encoder output.
        tokens = [1] + want
        hidden = program.run("encoder", [feats])[0]
        rows = whisper.decode_rows(program, hidden, tokens, prompt=1)
        with torch.no_grad():
            ref = model(input_features=feats, decoder_input_ids=torch.tensor([tokens])).logits[0].numpy()
            ref_hidden = model.get_encoder()(feats).last_hidden_state[0].numpy()
        assert np.abs(as_numpy(hidden)[0] - ref_hidden).max() / np.abs(ref_hidden).max() < 1e-4
        assert np.abs(rows - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.parametrize("target", FAST_TARGETS)
def test_verification_drove_the_asr_runners_call_sequence(built, target):
    """ExecuTorch's Seq2SeqRunner loop (one start token, one token per decoder call, as many
    tokens as the decoder's cache holds) on the artifact, token for token against eager."""
    _, record = artifact(built, target)
    runner = record["verification"]["asr_runner"]
    assert runner["passed"], runner
    assert runner["decoder_start_token_id"] == 1 and runner["max_new_tokens"] == 32
    assert runner["new_tokens"] == runner["expected_new_tokens"] > 8
    assert runner["matched"] == runner["new_tokens"] or "near tie" in runner.get("note", "")


def test_asr_runner_loop_follows_the_runner_and_catches_a_wrong_token(built, tmp_path):
    import torch

    from backends import open_program
    from mlxbuild.families import asr_runner, whisper_modules

    pte, record = artifact(built, "portable-fp32")
    model = eager_model(built, record)
    feats = whisper_modules.synthetic_features(model.config, 3).numpy()
    program = open_program(pte)
    got = asr_runner.transcribe(program, feats, 1, [2], 12)
    with torch.no_grad():
        want = model.generate(torch.from_numpy(feats), max_new_tokens=12, do_sample=False, num_beams=1)[0].tolist()
    assert got == want[:len(got)]  # generate() returns the tokens after the start token
    ref = asr_runner.runner_reference(model, feats, 12, 1, [2])
    assert ref["tokens"] == got
    (tmp_path / asr_runner.RUNNER_FILE).write_text(json.dumps(ref))
    assert asr_runner.compare(got, tmp_path, 1e-3)["passed"]
    wrong = list(got)
    wrong[3] = (wrong[3] + 1) % 256
    result = asr_runner.compare(wrong, tmp_path, 1e-6)
    assert not result["passed"] and "token 3" in result["reason"], result
    assert not asr_runner.compare(got[:5], tmp_path, 1e-3)["passed"]

    class EncoderOnly:
        method_names = ["encoder"]

    with pytest.raises(ValueError, match="Required methods not found: text_decoder"):
        asr_runner.transcribe(EncoderOnly(), feats, 1, [2], 12)


def test_audio_to_tokens_as_executorchs_whisper_example_runs_it(built):
    """The published folder as ExecuTorch's Whisper example uses it: the preprocessor program
    turns a waveform into features, the ASR runner's loop transcribes them; the tokens are
    transformers' own (its WhisperFeatureExtractor, from the shipped config, and generate)."""
    import torch
    from transformers import WhisperFeatureExtractor

    from backends import et_runtime, open_program
    from mlxbuild.families import asr_runner

    pte, record = artifact(built, "portable-fp32")
    out = pte.parent
    assert record["preprocessor"]["files"] == ["preprocessor.pte", "preprocessor_config.json"]
    assert {"preprocessor.pte", "preprocessor_config.json"} <= set(record["files"])
    assert record["preprocessor"]["features"] == [1, 80, 100]
    assert record["preprocessor"]["max_abs_error_vs_transformers"] < 1e-4
    rng = np.random.default_rng(5)
    wave = (0.2 * np.sin(np.arange(12800) * 0.05) + 0.05 * rng.standard_normal(12800)).astype(np.float32)
    features = et_runtime.load(out / "preprocessor.pte").run("forward", [torch.from_numpy(wave)])[0]
    extractor = WhisperFeatureExtractor.from_pretrained(str(out))
    want_features = extractor(wave, sampling_rate=16000, return_tensors="pt").input_features
    assert np.abs(np.asarray(features) - want_features.numpy()).max() < 1e-4
    got = asr_runner.transcribe(open_program(pte), features, 1, [2], 12)
    model = eager_model(built, record)
    with torch.no_grad():
        want = model.generate(want_features, max_new_tokens=12, do_sample=False, num_beams=1)[0].tolist()
    assert got == want[:len(got)] and len(got) >= min(12, len(want))


def test_mlxbuild_run_prints_a_transcription(built, subprocess_env):
    pte, _ = artifact(built, "mlx-4w")
    p = subprocess.run([sys.executable, "-m", "mlxbuild.cli", "run", str(pte), "--max-new-tokens", "6"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "decoder start (1): 1"
    line = next(x for x in lines if x.startswith("transcription ("))
    n = int(line.split("(")[1].split()[0])
    assert 1 <= n <= 6 and len(line.rsplit("): ", 1)[1].split()) == n
    assert lines[-1].startswith("encoder ") and "tok/s" in lines[-1]


def test_run_inputs_audio_features_and_backends(built, tmp_path, capsys):
    """--audio (a 16-bit 8 kHz wav, through WhisperFeatureExtractor) equals --features of the
    same log-mel; the portable artifact runs on ExecuTorch's runtime with the same loop."""
    import wave

    from mlxbuild.families.whisper_modules import log_mel

    mlx, portable = artifact(built, "mlx-4w")[0], artifact(built, "portable-fp32")[0]
    t = np.arange(8000) / 8000
    wav = tmp_path / "tone.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes((0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16).tobytes())
    feats = log_mel(wav, 80, 100)
    assert feats.shape == (1, 80, 100) and np.isfinite(feats).all() and feats.std() > 0
    np.save(tmp_path / "f.npy", feats[0])
    rc, by_audio, err = _run_json(capsys, mlx, "--audio", wav, "--max-new-tokens", 6, "--no-eos")
    assert rc == 0, err
    rc, by_features, err = _run_json(capsys, mlx, "--features", tmp_path / "f.npy", "--max-new-tokens", 6,
                                     "--no-eos")
    assert rc == 0, err
    assert by_audio["tokens"] == by_features["tokens"] and len(by_audio["tokens"]) == 6

    rc, on_et, err = _run_json(capsys, portable, "--features", tmp_path / "f.npy", "--max-new-tokens", 6,
                               "--no-eos")
    assert rc == 0, err
    import torch

    model = eager_model(built, artifact(built, "portable-fp32")[1])
    model.generation_config.eos_token_id = None  # --no-eos
    with torch.no_grad():
        want = model.generate(torch.from_numpy(feats), max_new_tokens=6, do_sample=False, num_beams=1)
    assert on_et["tokens"] == want[0].tolist()

    np.save(tmp_path / "bad.npy", np.zeros((80, 99), dtype=np.float32))
    rc, _, err = _run_json(capsys, mlx, "--features", tmp_path / "bad.npy")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "[1, 80, 100]" in err


def _manifest_text(**model) -> str:
    data = yaml.safe_load(MANIFEST.read_text())
    data["model"].update(model)
    return yaml.safe_dump(data, sort_keys=False)


def test_task_must_fit_the_architecture(tmp_path):
    from mlxbuild.errors import ManifestError
    from mlxbuild.manifest import load_manifest

    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(_manifest_text(task="text-generation"))
    with pytest.raises(ManifestError) as info:
        load_manifest(wrong)
    msg = str(info.value)
    assert "\n" not in msg and str(wrong) in msg
    assert "model.task: 'text-generation' does not fit architecture 'whisper', which is 'speech-to-text'" in msg

    qwen = yaml.safe_load((REPO / "manifests" / "qwen.yaml").read_text())
    qwen["model"]["task"] = "speech-to-text"
    other = tmp_path / "qwen.yaml"
    other.write_text(yaml.safe_dump(qwen, sort_keys=False))
    with pytest.raises(ManifestError, match="model.task: 'speech-to-text' does not fit architecture 'qwen3'"):
        load_manifest(other)


def test_validate_cli_reports_the_mismatch_on_one_line(tmp_path, capsys):
    from mlxbuild import cli

    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(_manifest_text(task="text-generation"))
    assert cli.main(["validate", str(wrong)]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model.task" in lines[0] and "whisper" in lines[0]
    assert cli.main(["validate", str(MANIFEST), str(REPO / "manifests" / "whisper-tiny.yaml")]) == 0


@pytest.mark.slow
def test_full_manifest_with_xnnpack_builds_and_verifies(tmp_path, subprocess_env):
    p = build(tmp_path, subprocess_env, MANIFEST)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _, record = artifact(tmp_path, "xnnpack-8da4w")
    assert record["verification"]["passed"] and record["verification"]["encoder"]["passed"]
    assert "XnnpackBackend" in record["delegation"]["text_decoder"]["delegates"]


# --------------------------------------------------------------------------- Parakeet TDT

PARAKEET = REPO / "manifests" / "parakeet.yaml"
PK_NAME = "parakeet-tdt-synthetic"


@pytest.fixture(scope="module")
def parakeet_built(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("parakeet")
    data = yaml.safe_load(PARAKEET.read_text())
    data["targets"] = [{**t, "etrecord": True} for t in data["targets"] if t["name"] == "mlx-fp32"]
    data["quantization"] = {}
    (root / "manifests").mkdir()
    manifest = root / "manifests" / "parakeet.yaml"
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    p = build(root, subprocess_env, manifest)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = root / "artifacts" / PK_NAME / VERSION
    return out / f"{PK_NAME}-mlx-fp32.pte", json.loads((out / f"{PK_NAME}-mlx-fp32.json").read_text()), root


def eager_tdt(model, feats, max_symbols: int = 10) -> list[int]:
    """Greedy TDT decoding written against the eager transformers modules."""
    import torch

    cfg, dec = model.config, model.decoder
    blank, durations, vocab = cfg.blank_token_id, list(cfg.durations), cfg.vocab_size

    def step(token, state):
        out, state = dec.lstm(dec.embedding(torch.tensor([[token]])), state)
        return dec.decoder_projector(out), state

    with torch.no_grad():
        f = model.get_audio_features(input_features=feats).pooler_output
        zeros = torch.zeros(cfg.num_decoder_layers, 1, cfg.decoder_hidden_size)
        g, state = step(blank, (zeros, zeros))
        tokens, t, at_frame = [], 0, 0
        while t < f.shape[1]:
            logits = model.joint(decoder_hidden_states=g, encoder_hidden_states=f[:, t:t + 1]).reshape(-1)
            k, dur = int(logits[:vocab].argmax()), durations[int(logits[vocab:].argmax())]
            if k == blank:
                t, at_frame = t + max(dur, 1), 0
                continue
            tokens.append(k)
            g, state = step(k, state)
            at_frame = at_frame + 1 if dur == 0 else 0
            if at_frame >= max_symbols:
                dur, at_frame = 1, 0
            t += dur
    return tokens


def test_parakeet_builds_with_the_transducer_runner_methods(parakeet_built):
    from mlxbuild.pte_inspect import inspect_pte

    pte, record, _ = parakeet_built
    check = record["verification"]
    assert check["passed"], check
    for part in ("encoder", "decoder_step"):
        assert check[part]["max_rel_error"] <= check["tolerance"]["max_rel_error"]
    assert check["joint_tokens"]["agreement"] == check["joint_durations"]["agreement"] == 1.0
    assert check["structure"]["passed"]
    info = inspect_pte(pte)
    assert set(info["methods"]) == {"encoder", "decoder_step", "joint"}
    for m in info["methods"].values():
        assert [d["backend_id"] for d in m["delegates"]] == ["MLXBackend"] and m["operators"] == []
    c = info["constant_methods"]
    assert (c["blank_id"], c["num_rnn_layers"], c["pred_hidden"]) == (64, 1, 32)
    assert c["get_durations"] == [0, 1, 2, 3, 4]
    # ExecuTorch's serializer refuses the encoder's dynamic-frames graph for an ETRecord: the
    # artifact still ships, and its record says why there is no ETRecord.
    assert "could not serialize the ETRecord" in record["etrecord"]["skipped"], record["etrecord"]
    assert not pte.with_suffix(".etrecord").exists() and pte.with_suffix(".etrecord").name not in record["files"]


def test_parakeet_transcription_matches_eager(parakeet_built):
    from mlxbuild.families import parakeet, speech_to_text
    from backends import open_program

    pte, record, root = parakeet_built
    model = eager_model(root, record)
    program = open_program(pte)
    seen = set()
    for seed, frames in ((1, 160), (2, 240), (3, 333)):  # the encoder's time dim is dynamic
        feats = parakeet.synthetic_features(80, frames, seed)
        got = speech_to_text.transcribe(program, feats.numpy(), max_new_tokens=1000)
        assert got["tokens"] == eager_tdt(model, feats), (seed, frames)
        assert got["encoder_frames"] == model.encoder._get_subsampling_output_length(
            __import__("torch").tensor([frames])).item()
        seen.update(got["tokens"])
    assert len(seen) > 3


def test_parakeet_refuses_non_mlx_flavours():
    from mlxbuild.errors import BuildError
    from mlxbuild.families import parakeet

    import backends

    class Config:
        model_type = "parakeet_tdt"

    class Model:
        config = Config()

    for flavour in ("plain", "et-llm-ops"):
        with pytest.raises(BuildError, match="only mlx"):
            parakeet.export(Model(), {"dtype": "fp32"}, backends.flavour(flavour))


def test_parakeet_run_from_audio(parakeet_built, tmp_path, capsys):
    import wave

    pte, _, _ = parakeet_built
    wav = tmp_path / "tone.wav"
    with wave.open(str(wav), "wb") as w:  # 1 s at 16 kHz -> 101 feature frames -> 13 encoder frames
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) * 32767).astype(np.int16).tobytes())
    rc, result, err = _run_json(capsys, pte, "--audio", wav)
    assert rc == 0, err
    assert result["encoder_frames"] == 13 and result["stopped"] in ("frames", "max_new_tokens")


def test_parakeet_verification_drove_the_tdt_runners_call_sequence(parakeet_built):
    """ExecuTorch's Parakeet example loop (SOS = blank primes decoder_step, one joint call per
    decision, to the last encoder frame) on the artifact, token for token against eager."""
    _, record, _ = parakeet_built
    runner = record["verification"]["tdt_runner"]
    assert runner["passed"], runner
    assert runner["matched"] == runner["new_tokens"] == runner["expected_new_tokens"] > 0
    assert runner["encoder_frames"] == 20 and runner["durations"] == [0, 1, 2, 3, 4]
    assert runner["calls"] == {"encoder": 1, "decoder_step": runner["new_tokens"] + 1,
                               "joint": runner["joint_calls"]}
    # What the example app loads besides: the artifact has no preprocessor method.
    assert runner["example_app_needs"]["methods"] == ["preprocessor"]


def test_parakeet_tdt_runner_loop_follows_the_runner_and_catches_a_wrong_token(parakeet_built, tmp_path):
    import copy

    from backends import open_program
    from mlxbuild.families import parakeet, tdt_runner

    pte, record, root = parakeet_built
    model = eager_model(root, record)
    program = open_program(pte)
    feats = parakeet.synthetic_features(80, 240, 4)
    got = tdt_runner.transcribe(program, feats.numpy())
    assert got["tokens"], got
    assert got["tokens"] == eager_tdt(model, feats)
    assert got["tokens"] == parakeet.transcribe(program, feats.numpy(), max_new_tokens=10_000)["tokens"]
    assert got["calls"] == {"encoder": 1, "decoder_step": len(got["tokens"]) + 1, "joint": len(got["steps"])}
    assert [s[1] for s in got["steps"] if s[1] != 64] == got["tokens"]
    ref = tdt_runner.runner_reference(model, feats)
    assert ref["steps"] == got["steps"] and ref["tokens"] == got["tokens"]
    (tmp_path / tdt_runner.RUNNER_FILE).write_text(json.dumps(ref))
    assert tdt_runner.compare(got, tmp_path, 1e-6)["passed"]

    i = next(n for n, s in enumerate(got["steps"]) if s[1] != 64)
    wrong = copy.deepcopy(got)
    wrong["steps"][i][1] = (wrong["steps"][i][1] + 1) % 64
    wrong["tokens"][0] = wrong["steps"][i][1]
    result = tdt_runner.compare(wrong, tmp_path, 1e-9)
    assert not result["passed"] and f"joint call {i} " in result["reason"] and "token" in result["reason"], result
    # The same parting at a near tie (a margin within twice the error) passes, and says so.
    assert "near tie" in tdt_runner.compare(wrong, tmp_path, 1e9)["note"]
    short = {**got, "steps": got["steps"][:-1]}
    assert not tdt_runner.compare(short, tmp_path, 1e-6)["passed"]
    other_table = {**got, "durations_table": [0, 1, 2, 4, 8]}
    assert "duration table" in tdt_runner.compare(other_table, tmp_path, 1e-6)["reason"]

    class NoJoint:
        method_names = ["encoder", "decoder_step"]
        constant_methods = program.constant_methods

    with pytest.raises(ValueError, match="Failed to load method: joint"):
        tdt_runner.transcribe(NoJoint(), feats.numpy())

    class NoBlank:
        method_names = program.method_names
        constant_methods = {k: v for k, v in program.constant_methods.items() if k != "blank_id"}

    with pytest.raises(ValueError, match="metadata method: blank_id"):
        tdt_runner.transcribe(NoBlank(), feats.numpy())

    class HalfJoint:  # the runner would reinterpret f_proj's float32 bytes as float16
        method_names, constant_methods = program.method_names, program.constant_methods
        run, reset = program.run, program.reset

        def input_dtype(self, method, index=0):
            return "float16" if method == "joint" else program.input_dtype(method, index)

    with pytest.raises(ValueError, match="copies its bytes"):
        tdt_runner.transcribe(HalfJoint(), feats.numpy())


def test_parakeet_tdt_runner_call_sequence_on_a_scripted_program():
    """The loop's rules, call for call, on a program whose joint plays a script: a blank moves
    on by max(duration, 1), a token is fed to decoder_step and moves on by its duration, and
    `max_symbols_per_step` zero-duration tokens on one frame force one frame more."""
    import torch

    from mlxbuild.families import tdt_runner

    script = iter([(3, 0), (7, 0), (7, 0), (8, 2), (3, 3)])  # (token, duration index); blank is 3
    log = {"joint": [], "decoder_step": []}

    class Scripted:
        method_names = ["encoder", "decoder_step", "joint"]
        constant_methods = {"blank_id": 3, "num_rnn_layers": 1, "pred_hidden": 2}

        def reset(self, method):
            pass

        def input_dtype(self, method, index=0):
            return "int64" if (method, index) in (("encoder", 1), ("decoder_step", 0)) else "float32"

        def run(self, method, inputs):
            if method == "encoder":
                assert inputs[0].shape == (1, 40, 80) and inputs[1].tolist() == [40]
                return [torch.arange(5.0).view(1, 5, 1).expand(1, 5, 2).contiguous(), torch.tensor([5])]
            if method == "decoder_step":
                token, h, c = inputs
                assert token.dtype == torch.long and token.shape == (1, 1) and h.shape == c.shape == (1, 1, 2)
                log["decoder_step"].append((int(token), float(h[0, 0, 0])))
                return [torch.full((1, 1, 2), float(token)), h + 1, c + 1]
            f, g = inputs
            assert f.shape == g.shape == (1, 1, 2)
            log["joint"].append((int(f[0, 0, 0]), int(g[0, 0, 0])))
            k, d = next(script)
            return [torch.tensor(k), torch.tensor(d)]

    got = tdt_runner.transcribe(Scripted(), np.zeros((1, 40, 80), np.float32), max_symbols_per_step=2)
    # (frame, token of the g it was given): SOS primes g; each emitted token replaces it.
    assert log["joint"] == [(0, 3), (1, 3), (1, 7), (2, 7), (4, 8)]
    assert log["decoder_step"] == [(3, 0.0), (7, 1.0), (7, 2.0), (8, 3.0)]  # h threaded through
    assert got["tokens"] == [7, 7, 8] and got["frames"] == [1, 1, 2] and got["durations"] == [0, 0, 2]
    assert got["forced_advances"] == 1 and got["steps"][-1] == [4, 3, 3] and got["encoder_frames"] == 5
    assert got["calls"] == {"encoder": 1, "decoder_step": 4, "joint": 5}
