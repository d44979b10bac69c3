"""Streaming speech-to-text (Voxtral Realtime): the tiny synthetic manifest builds, verifies
and transcribes audio as it arrives.

One build (a subprocess ``doit build``, as a user runs it) of manifests/voxtral-realtime-tiny.yaml
with its MLX 4-bit and portable targets runs once for the module (~1.5 min on 2 cores); the
whole manifest, XNNPACK included, is ``slow`` (~3 min). The checks here are independent of
the build's verify step: the artifact streamed from a .wav in pieces against transformers'
own ``generate`` on the whole utterance, the mel frontend against transformers' extractor,
and the encoder's state across chunk calls.
"""

from __future__ import annotations

import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import yaml
import buildlog
from buildlog import build, eager_model, run_json as _run_json, validate_with_target

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "manifests" / "voxtral-realtime-tiny.yaml"
NAME, VERSION = "voxtral-realtime-tiny", "0.1.0"
FAST_TARGETS = ("mlx-4w", "portable-fp32")






@pytest.fixture(scope="module")
def built(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("voxtral-rt")
    p = build(root, subprocess_env, write_manifest(root, FAST_TARGETS))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root






def write_manifest(root: Path, targets) -> Path:
    return buildlog.write_manifest(root, MANIFEST, targets)


def artifact(root: Path, target: str) -> tuple[Path, dict]:
    return buildlog.artifact(root, NAME, VERSION, target)


def write_wav(path: Path, seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A chirp with noise as 16-bit PCM; returns the samples as the reader gives them back."""
    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * np.sin(2 * np.pi * 440 * t * (1 + t)) + 0.05 * np.random.default_rng(seed).standard_normal(len(t))
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return pcm.astype(np.float32) / 32767


# --------------------------------------------------------------------------- the build


@pytest.mark.parametrize("target", FAST_TARGETS)
def test_build_verifies_the_stream_against_transformers(built, target):
    from mlxbuild.families import voxtral_realtime

    _, record = artifact(built, target)
    check = record["verification"]
    assert check["passed"] and check["executed"], check
    assert check["positions"] == voxtral_realtime.VERIFY_TOKENS
    assert check["audio_encoder"]["passed"]
    assert check["max_rel_error"] <= check["tolerance"]["max_rel_error"]
    # the streamed greedy transcript equals generate()'s on the whole utterance
    assert check["stream"] == {"passed": True, "matched": voxtral_realtime.VERIFY_TOKENS - 4}
    assert set(record["delegation"]) == set(voxtral_realtime.METHODS)
    if target.startswith("mlx"):
        assert check["structure"]["passed"], check["structure"]
        for method in voxtral_realtime.METHODS:
            assert record["delegation"][method]["delegates"] == ["MLXBackend"]
            # Every op is the delegate's but the write-back of buffers into program state
            # (the cache wrapper's write positions; the convolution states), as in the
            # text families' MLX programs.
            assert set(record["delegation"][method]["portable_ops"]) <= {"copy_.default"}, method


def test_pte_has_the_streaming_methods_and_metadata(built):
    from mlxbuild.pte_inspect import inspect_pte

    info = inspect_pte(artifact(built, "mlx-4w")[0])
    assert set(info["methods"]) == {"encode_audio_chunk", "token_embedding", "text_decoder"}
    assert [i["sizes"] for i in info["methods"]["encode_audio_chunk"]["inputs"]] == [[1, 32, 8], [4]]
    c = info["constant_methods"]
    assert c["get_prompt_ids"] == [1, 3, 3, 3]  # BOS, then the streaming pad per delay token
    assert (c["sample_rate"], c["hop_length"], c["window_size"], c["chunk_mel_len"]) == (16000, 160, 400, 8)
    assert (c["step_samples"], c["stft_right_lookahead"], c["streaming"]) == (1280, 40, 1)
    assert (c["max_seq_len"], c["max_enc_len"], c["num_mel_bins"], c["dim"]) == (32, 128, 32, 64)


@pytest.mark.parametrize("target", FAST_TARGETS)
def test_streamed_audio_transcript_equals_generate_on_the_whole_file(built, target, tmp_path, capsys):
    """`mlxbuild run --audio x.wav --stream --chunk-ms 120`: the transcript after the last
    piece is transformers' generate() on the whole file's features, token for token; each
    partial transcript extends the one before; the file unstreamed gives the same."""
    from mlxbuild.families import streaming_mel, voxtral_realtime

    pte, record = artifact(built, target)
    wav = tmp_path / "chirp.wav"
    samples = write_wav(wav, 1.9)
    rc, streamed, err = _run_json(capsys, pte, "--audio", wav, "--stream", "--chunk-ms", 120)
    assert rc == 0, err
    rc, whole, err = _run_json(capsys, pte, "--audio", wav)
    assert rc == 0, err
    padded = np.pad(samples, (0, (-len(samples)) % 1280))
    model = eager_model(built, record)
    eager = voxtral_realtime.transcribe_eager(model, __import__("torch").from_numpy(
        streaming_mel.offline(padded, 32)))
    assert streamed["tokens"] == whole["tokens"] == eager["tokens"]
    assert len(set(eager["tokens"])) >= 3  # a transcript that says something
    assert streamed["audio_tokens"] == len(padded) // 1280
    chunks = streamed["chunks"]
    assert len(chunks) == -(-len(padded) // 1920)
    for before, after in zip(chunks, chunks[1:]):
        assert after["tokens"][:len(before["tokens"])] == before["tokens"]
    assert sum(c["audio_tokens"] for c in chunks) == streamed["audio_tokens"]


def test_stream_prints_partial_transcripts(built, tmp_path, capsys):
    from mlxbuild import cli

    pte, _ = artifact(built, "mlx-4w")
    wav = tmp_path / "chirp.wav"
    write_wav(wav, 1.0)
    assert cli.main(["run", str(pte), "--audio", str(wav), "--stream", "--chunk-ms", "250"]) == 0
    out = capsys.readouterr().out.splitlines()
    partial = [line for line in out if line.startswith("[")]
    assert len(partial) == 5 and "1040 ms]" in partial[-1]  # 1 s, padded to whole 80 ms steps
    assert any(line.startswith("transcription (") for line in out)
    assert any("latency per piece: median" in line for line in out)


def test_run_refuses_what_it_cannot_stream(built, capsys):
    pte, _ = artifact(built, "mlx-4w")
    from mlxbuild import cli

    assert cli.main(["run", str(pte), "--stream"]) == 2
    assert capsys.readouterr().err.strip() == "error: --stream feeds --audio as it arrives: give a .wav file"
    assert cli.main(["run", str(pte), "--stream", "--chunk-ms", "0", "--audio", "x.wav"]) == 2
    assert "--chunk-ms 0: must be a positive number" in capsys.readouterr().err


def test_encoder_state_is_carried_across_chunk_calls(built):
    """The convolutions' left context and the encoder's KV cache carry from call to call:
    a fresh encoder halfway (its state lost) changes every later audio token; a call at
    position 0 starts over, whatever the state held."""
    import torch

    import backends
    from mlxbuild.families import voxtral_realtime

    pte, _ = artifact(built, "portable-fp32")
    program = backends.open_program(pte, "portable")
    feats = voxtral_realtime.synthetic_features(32, 12, seed=1).numpy()

    def encode(chunks, start=0):
        return [program.run("encode_audio_chunk", [torch.from_numpy(np.ascontiguousarray(feats[:, :, 8 * i:8 * i + 8])),
                                                   torch.arange(4 * i, 4 * i + 4)])[0] for i in chunks]

    program.reset()
    whole = encode(range(12))
    program.reset()
    first = encode(range(6))
    program.reset("encode_audio_chunk")  # state lost, positions go on
    second = encode(range(6, 12))
    assert all(torch.equal(a, b) for a, b in zip(whole[:6], first))
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(whole[6:], second))
    # a new stream on the same loaded method: position 0 zeroes the convolution state
    again = encode(range(12))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, again))


def test_mel_stream_equals_the_extractor_on_the_whole_utterance():
    from mlxbuild.families import streaming_mel

    rng = np.random.default_rng(0)
    x = np.pad(0.1 * rng.standard_normal(16000 + 700).astype(np.float32), (0, 1280 - 700))
    whole = streaming_mel.offline(x, 32)
    assert whole.shape == (1, 32, len(x) // 160)
    for piece in (160, 999, 1280, len(x)):
        s = streaming_mel.MelStream(32)
        parts = [s.push(x[a:a + piece], last=a + piece >= len(x)) for a in range(0, len(x), piece)]
        got = np.concatenate(parts, axis=-1)
        assert got.shape == whole.shape
        np.testing.assert_allclose(got, whole, atol=1e-6)
    # a frame is given out only once its whole window has arrived
    s = streaming_mel.MelStream(32)
    assert s.push(x[:200]).shape[-1] == 0
    assert s.push(x[200:360]).shape[-1] == 2  # windows of frames 0 and 1 end at samples 200 and 360


def test_manifest_refuses_backends_the_stream_does_not_lower_to(tmp_path):
    code, line, path = validate_with_target(tmp_path, MANIFEST, {"name": "vulkan-fp32", "backend": "vulkan",
                                                                 "quantization": "none"})
    assert code != 0
    assert f"{path}:" in line and "targets[0].backend" in line
    assert "'voxtral_realtime' cannot be built for 'vulkan'" in line


@pytest.mark.slow
def test_whole_manifest_builds_and_verifies(tmp_path, subprocess_env):
    """Every shipped target, XNNPACK 8da4w and fp32 included (~3 min on 2 cores)."""
    data = yaml.safe_load(MANIFEST.read_text())
    p = build(tmp_path, subprocess_env, write_manifest(tmp_path, [t["name"] for t in data["targets"]]))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for t in data["targets"]:
        _, record = artifact(tmp_path, t["name"])
        assert record["verification"]["passed"] and record["verification"]["stream"]["passed"], t["name"]
