"""The multimodal task kind (multimodal-text-to-text) on Voxtral (audio) and LLaVA (images):
each tiny synthetic manifest builds, verifies, runs through ExecuTorch's MultimodalRunner and
through `mlxbuild run`.

One build per family (a subprocess `doit build`, as a user runs it) with its MLX (encoder
8-bit, decoder 4-bit) and portable targets runs once for the module (~1.5 min each on 2
cores); the whole manifests, XNNPACK included, are `slow` (~3 min each). The checks here are
independent of the build's verify step: `mlxbuild run --audio` / `--image` against
transformers' own `generate` on the same file.
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
MANIFEST = REPO / "manifests" / "voxtral-tiny.yaml"
NAME, VERSION = "voxtral-tiny", "0.1.0"
FAST_TARGETS = ("mlx-enc8-dec4", "portable-fp32")
AUDIO_TOKENS = 25  # 200 frames -> 100 encoder positions -> 25 embeddings






@pytest.fixture(scope="module")
def built(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("voxtral")
    p = build(root, subprocess_env, write_manifest(root, FAST_TARGETS))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root






def write_manifest(root: Path, targets, manifest: Path = MANIFEST) -> Path:
    return buildlog.write_manifest(root, manifest, targets)


def artifact(root: Path, target: str, name: str = NAME) -> tuple[Path, dict]:
    return buildlog.artifact(root, name, VERSION, target)


def write_wav(path: Path, seconds: float = 2.0, rate: int = 16000) -> None:
    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * np.sin(2 * np.pi * 330 * t * (1 + 2 * t)) + 0.05 * np.random.default_rng(3).standard_normal(len(t))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.mark.parametrize("target", FAST_TARGETS)
def test_build_verifies_as_the_multimodal_runner_drives_it(built, target):
    from mlxbuild.families import multimodal

    _, record = artifact(built, target)
    check = record["verification"]
    assert check["passed"] and check["executed"], check
    # BOS, the audio window, 3 text tokens, then 8 greedy tokens
    assert check["positions"] == 1 + AUDIO_TOKENS + multimodal.VERIFY_SUFFIX + multimodal.VERIFY_DECODE_STEPS
    assert check["max_rel_error"] <= check["tolerance"]["max_rel_error"]
    assert check["greedy"] == {"passed": True, "matched": multimodal.VERIFY_DECODE_STEPS}
    assert set(record["delegation"]) == {"audio_encoder", "token_embedding", "text_decoder"}
    if target == "portable-fp32":
        # ExecuTorch's own MultimodalRunner, with the tokenizer that ships beside the artifact
        assert check["runner"]["passed"] and check["runner"]["matched"] == multimodal.RUNNER_NEW_TOKENS, check
    else:
        for method in record["delegation"]:
            assert record["delegation"][method]["delegates"] == ["MLXBackend"]


def test_per_method_rules_put_the_encoder_at_8_bits_and_the_decoder_at_4(built):
    _, record = artifact(built, "mlx-enc8-dec4")
    layers = record["layer_quantization"]["layers"]
    encoder = {k: v for k, v in layers.items() if k.startswith("model.audio_tower.layers.")}
    decoder = {k: v for k, v in layers.items() if k.startswith("model.language_model.layers.")}
    assert encoder and all(v["bits"] == 8 for v in encoder.values())
    assert decoder and all(v["bits"] == 4 for v in decoder.values())
    assert all(v["bits"] == 8 for k, v in layers.items() if k.startswith("model.multi_modal_projector."))


def test_the_audio_preprocessor_and_tokenizer_travel_with_the_artifact(built):
    out = built / "artifacts" / NAME / VERSION
    for name in ("preprocessor.pte", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    _, record = artifact(built, "portable-fp32")
    assert record["preprocessor"]["features"] == [1, 32, 200]
    assert record["preprocessor"]["max_abs_error_vs_transformers"] <= record["preprocessor"]["bound"]


def test_constant_methods_name_the_audio_window(built):
    from mlxbuild.pte_inspect import inspect_pte

    info = inspect_pte(artifact(built, "mlx-enc8-dec4")[0])
    assert [i["sizes"] for i in info["methods"]["audio_encoder"]["inputs"]] == [[1, 32, 200]]
    c = info["constant_methods"]
    assert (c["get_num_mel_bins"], c["get_num_frames"], c["get_audio_tokens"]) == (32, 200, AUDIO_TOKENS)
    assert (c["get_bos_id"], c["get_eos_ids"], c["audio_token_id"]) == (1, [2], 5)
    assert (c["get_max_context_len"], c["get_prefill_chunk_size"]) == (64, 32)


@pytest.mark.parametrize("target", FAST_TARGETS)
def test_run_audio_matches_transformers_generate(built, target, tmp_path, capsys):
    """`mlxbuild run --audio x.wav --ids ...`: BOS, the wav's log-mel window, the ids, then
    greedy tokens, equal to transformers' generate() with the audio placeholders."""
    import torch

    from mlxbuild.families import voxtral, whisper_modules

    pte, record = artifact(built, target)
    wav = tmp_path / "sweep.wav"
    write_wav(wav)
    rc, result, err = _run_json(capsys, pte, "--audio", wav, "--ids", "7 8 9", "--max-new-tokens", 16, "--no-eos")
    assert rc == 0, err
    assert result["prompt_segments"] == [["text", 1], ["audio_encoder", [1, 32, 200]], ["text", 3]]
    model = eager_model(built, record)
    feats = torch.from_numpy(whisper_modules.log_mel(wav, 32, 200))
    inputs = voxtral.with_prompt(model, {"media": feats}, [1], [7, 8, 9])
    ids = voxtral.eager_generate(model, inputs, 16)
    assert result["tokens"] == ids[len(inputs["prompt_ids"]):]
    assert len(set(result["tokens"])) >= 2


def test_run_prefix_ids_go_before_the_audio(built, tmp_path, capsys):
    """--prefix-ids (a chat template's tokens before the media) replace the BOS-only prefix."""
    import torch

    from mlxbuild.families import voxtral, whisper_modules

    pte, record = artifact(built, "mlx-enc8-dec4")
    wav = tmp_path / "sweep.wav"
    write_wav(wav)
    rc, result, err = _run_json(capsys, pte, "--audio", wav, "--prefix-ids", "1 9 10", "--ids", "7",
                                "--max-new-tokens", 6, "--no-eos")
    assert rc == 0, err
    assert result["prompt_segments"] == [["text", 3], ["audio_encoder", [1, 32, 200]], ["text", 1]]
    model = eager_model(built, record)
    inputs = voxtral.with_prompt(model, {"media": torch.from_numpy(whisper_modules.log_mel(wav, 32, 200))},
                                 [1, 9, 10], [7])
    assert result["tokens"] == voxtral.eager_generate(model, inputs, 6)[len(inputs["prompt_ids"]):]
    from mlxbuild import cli

    assert cli.main(["run", str(pte), "--prefix-ids", "1 x"]) == 2
    assert capsys.readouterr().err.strip() == "error: --prefix-ids '1 x': token ids separated by spaces"


def test_run_refuses_inputs_the_program_does_not_take(built, capsys):
    from mlxbuild import cli

    pte, _ = artifact(built, "mlx-enc8-dec4")
    assert cli.main(["run", str(pte), "--image", "x.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--image: this program has no vision_encoder" in err and "takes audio" in err
    assert cli.main(["run", str(pte), "--stream", "--audio", "x.wav"]) == 2
    assert "--stream:" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("manifest", [MANIFEST, REPO / "manifests" / "llava-tiny.yaml"], ids=lambda p: p.stem)
def test_whole_manifest_builds_and_verifies(manifest, tmp_path, subprocess_env):
    """Every shipped target, XNNPACK 8da4w included (~3 min on 2 cores each)."""
    data = yaml.safe_load(manifest.read_text())
    p = build(tmp_path, subprocess_env, write_manifest(tmp_path, [t["name"] for t in data["targets"]], manifest))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for t in data["targets"]:
        _, record = artifact(tmp_path, t["name"], data["name"])
        assert record["verification"]["passed"] and record["verification"]["greedy"]["passed"], t["name"]


# --------------------------------------------------------------------------- LLaVA

LLAVA = REPO / "manifests" / "llava-tiny.yaml"
LLAVA_NAME = "llava-tiny"
IMAGE_TOKENS = 16  # a 32 x 32 image in 8 x 8 patches


@pytest.fixture(scope="module")
def llava_built(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("llava")
    p = build(root, subprocess_env, write_manifest(root, FAST_TARGETS, LLAVA))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root


def write_png(path: Path) -> None:
    from PIL import Image

    x = np.zeros((48, 64, 3), np.uint8)
    x[:, :32], x[:, 32:], x[10:20] = [200, 30, 30], [20, 180, 240], 255
    Image.fromarray(x).save(path)


@pytest.mark.parametrize("target", FAST_TARGETS)
def test_llava_verifies_as_the_multimodal_runner_drives_it(llava_built, target):
    from mlxbuild.families import multimodal

    _, record = artifact(llava_built, target, LLAVA_NAME)
    check = record["verification"]
    assert check["passed"] and check["executed"], check
    assert check["positions"] == 1 + IMAGE_TOKENS + multimodal.VERIFY_SUFFIX + multimodal.VERIFY_DECODE_STEPS
    assert check["greedy"] == {"passed": True, "matched": multimodal.VERIFY_DECODE_STEPS}
    assert set(record["delegation"]) == {"vision_encoder", "token_embedding", "text_decoder"}
    if target == "portable-fp32":
        # ExecuTorch's own MultimodalRunner, handed the uint8 image as an app hands it over
        assert check["runner"]["passed"] and check["runner"]["matched"] == multimodal.RUNNER_NEW_TOKENS, check
    else:
        for method in record["delegation"]:
            assert record["delegation"][method]["delegates"] == ["MLXBackend"]
        layers = record["layer_quantization"]["layers"]
        assert all(v["bits"] == 8 for k, v in layers.items() if k.startswith("model.vision_tower.") and "bits" in v)
        assert all(v["bits"] == 4 for k, v in layers.items() if k.startswith("model.language_model.layers."))


@pytest.mark.parametrize("target", FAST_TARGETS)
def test_llava_run_image_matches_transformers_generate(llava_built, target, tmp_path, capsys):
    """`mlxbuild run --image x.png --ids ...`: the image resized to the tower's 32 x 32 (bicubic),
    normalised in the graph; greedy tokens equal transformers' generate() with the image
    placeholders and the processor's normalisation."""
    import torch
    from PIL import Image

    from mlxbuild.families import llava

    pte, record = artifact(llava_built, target, LLAVA_NAME)
    png = tmp_path / "x.png"
    write_png(png)
    rc, result, err = _run_json(capsys, pte, "--image", png, "--ids", "7 8 9", "--max-new-tokens", 12, "--no-eos")
    assert rc == 0, err
    assert result["prompt_segments"] == [["text", 1], ["vision_encoder", [3, 32, 32]], ["text", 3]]
    model = eager_model(llava_built, record)
    with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB").resize((32, 32), Image.BICUBIC)).transpose(2, 0, 1).copy()
    inputs = llava.with_prompt(model, {"media": torch.from_numpy(pixels)}, [1], [7, 8, 9])
    ids = llava.eager_generate(model, inputs, 12)
    assert result["tokens"] == ids[len(inputs["prompt_ids"]):]
    assert len(set(result["tokens"])) >= 3


def test_llava_run_refuses_audio_and_unreadable_images(llava_built, tmp_path, capsys):
    from mlxbuild import cli

    pte, _ = artifact(llava_built, "mlx-enc8-dec4", LLAVA_NAME)
    assert cli.main(["run", str(pte), "--audio", "x.wav"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --audio: this program has no audio_encoder (its methods: text_decoder, "
                   "token_embedding, vision_encoder); it takes images")
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    assert cli.main(["run", str(pte), "--image", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --image {bad}: not an image Pillow can read"


def test_llava_refuses_core_ml_at_validation(tmp_path):
    code, line, path = validate_with_target(tmp_path, LLAVA, {"name": "coreml-fp32", "backend": "coreml",
                                                              "quantization": "none"})
    assert code != 0
    assert f"{path}:" in line and "targets[0].backend" in line and "'llava' cannot be built for 'coreml'" in line
