"""Quality against the float model: every runnable target's artifact, through its own
runtime, against the unquantized model of the same checkpoint on the evaluation
sequences (KL divergence, top-1, perplexity), and the gate that keeps a target that
misses its thresholds from being published."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from buildlog import STEP_LINE, doit_command
from mlxbuild import quality
from mlxbuild.manifest import parse_manifest

# A tiny Qwen3 whose weights are drawn wide (initializer_range 0.3): its next-token
# distributions are peaked, as a trained model's are, so rounding its weights moves them
# measurably (the default init gives near-uniform outputs that no width disturbs).
BITS = """\
name: quality-bits
version: 0.1.0
model:
  source:
    synthetic:
      architecture: qwen3
      seed: 0
      config: {vocab_size: 512, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
               num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16, tie_word_embeddings: true,
               initializer_range: 0.3, bos_token_id: 1, eos_token_id: 2}
  dtype: fp32
export: {max_context_length: 64}
quality:
  sequences: 2
  seq_len: 32
  dataset: eval.txt
  schemes:
    w2: {max_kld: 100, min_top1: 0, max_ppl_increase: 100}
    w4: {max_kld: 100, min_top1: 0, max_ppl_increase: 100}
    a8w4: {max_kld: 100, min_top1: 0, max_ppl_increase: 100}
    w4g: {max_kld: 100, min_top1: 0, max_ppl_increase: 100}
    w4a: {max_kld: 100, min_top1: 0, max_ppl_increase: 100}
    a8w4g: {max_kld: 100, min_top1: 0, max_ppl_increase: 100}
    mix: {max_kld: 100, min_top1: 0, max_ppl_increase: 100}
quantization:
  w8: {linear: {bits: 8, group_size: 32}}
  w4: {linear: {bits: 4, group_size: 32}}
  w2: {linear: {bits: 2, group_size: 32}}
  a8w4: {linear: {bits: 4, group_size: 32, activations: int8_dynamic}}
  w4g: {linear: {bits: 4, group_size: 32}, method: gptq, calibration: {samples: 8, seq_len: 64}}
  a8w4g: {linear: {bits: 4, group_size: 32, activations: int8_dynamic}, method: gptq}
  w4a: {linear: {bits: 4, group_size: 32}, method: awq}
  mix: {linear: {bits: 2, group_size: 32}, rules: [{blocks: [0], bits: 8}]}
targets:
  - {name: mlx-fp32, backend: mlx}
  - {name: mlx-w8, backend: mlx, quantization: w8}
  - {name: mlx-w4, backend: mlx, quantization: w4}
  - {name: mlx-w2, backend: mlx, quantization: w2}
  - {name: xnnpack-a8w4, backend: xnnpack, quantization: a8w4}
  - {name: mlx-w4g, backend: mlx, quantization: w4g}
  - {name: xnnpack-a8w4g, backend: xnnpack, quantization: a8w4g}
  - {name: mlx-w4a, backend: mlx, quantization: w4a}
  - {name: coreml-fp32, backend: coreml}
  - {name: mlx-mix, backend: mlx, quantization: mix}
"""
TEXT = (Path(quality.__file__).parent / "data" / "eval.txt").read_text()


def _build(folder: Path, env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*doit_command(), "build", "--plain", *args, "m.yaml"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=900)


def _records(folder: Path) -> dict:
    return {json.loads(p.read_text())["target"]: json.loads(p.read_text())
            for p in (folder / "artifacts" / "quality-bits" / "0.1.0").glob("quality-bits-*.json")}


def _ran(p: subprocess.CompletedProcess) -> set[str]:
    return {f"{m[2]} {m[3]}" for m in map(STEP_LINE.match, p.stdout.splitlines()) if m and m[1] == "ok "}


@pytest.fixture(scope="module")
def built(tmp_path_factory, subprocess_env):
    folder = tmp_path_factory.mktemp("quality")
    (folder / "m.yaml").write_text(BITS)
    (folder / "eval.txt").write_text(TEXT)
    env = subprocess_env(MLXBUILD_CACHE=folder / "cache", MLXBUILD_ARTIFACTS=folder / "artifacts")
    p = _build(folder, env, "--measure-speed", "--report", "report.json", "--junit", "report.xml")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return folder, env, p


def test_kld_is_zero_for_a_float_target_and_grows_as_bits_shrink(built):
    folder, _, _ = built
    q = {t: r["quality"] for t, r in _records(folder).items()}
    assert q["mlx-fp32"]["kld_mean"] < 1e-6 and q["mlx-fp32"]["top1"] == 1.0, q["mlx-fp32"]
    assert abs(q["mlx-fp32"]["ppl_increase"]) < 1e-5
    assert q["mlx-fp32"]["kld_mean"] < q["mlx-w8"]["kld_mean"] < q["mlx-w4"]["kld_mean"] < q["mlx-w2"]["kld_mean"]
    assert q["mlx-w8"]["top1"] >= q["mlx-w4"]["top1"] >= q["mlx-w2"]["top1"]
    # both backends' 4-bit artifacts were measured through their own runtimes
    assert q["xnnpack-a8w4"]["runtime"] == "executorch.runtime" and "MLX" in q["mlx-w4"]["runtime"]
    assert q["mlx-w4"]["positions"] == 64 and q["mlx-w4"]["evaluation"]["text"] is True
    assert q["mlx-w4"]["evaluation"]["source"] == "eval.txt"
    # the gate each was held to: the default for 8 bits, the manifest's per-scheme one for 4
    assert q["mlx-w8"]["gate"] == quality.DEFAULT_GATES["8"]
    assert q["mlx-w4"]["gate"]["max_kld"] == 100
    # Core ML has no runtime here: said, not measured
    assert q["coreml-fp32"] == {"measured": False,
                                "reason": "no coreml runtime on a build host: its outputs cannot be compared"}


def test_gptq_lowers_kl_divergence_against_rounding_at_the_same_bits(built):
    """GPTQ (on the HQQ grid plain rounding uses) against plain rounding, same bits and group
    size, on MLX and on XNNPACK (int8 dynamic activations): both verified, both closer to
    the float model."""
    folder, _, _ = built
    rec = _records(folder)
    for rtn, gptq in (("mlx-w4", "mlx-w4g"), ("xnnpack-a8w4", "xnnpack-a8w4g")):
        assert rec[gptq]["verification"]["passed"] and rec[gptq]["quality"]["measured"]
        assert rec[gptq]["quality"]["kld_mean"] < 0.95 * rec[rtn]["quality"]["kld_mean"], (rtn, gptq)
        layers = rec[gptq]["layer_quantization"]["layers"]
        assert {n for n, v in layers.items() if v.get("method") == "gptq"} == {
            n for n, v in layers.items() if v["format"] == "affine" and n != "model.embed_tokens"}
    # AWQ (scales folded into the norms and up/v projections, then the same rounding)
    assert rec["mlx-w4a"]["verification"]["passed"]
    assert rec["mlx-w4a"]["quality"]["kld_mean"] < 0.98 * rec["mlx-w4"]["quality"]["kld_mean"]
    awq = {n: v for n, v in rec["mlx-w4a"]["layer_quantization"]["layers"].items() if v.get("method") == "awq"}
    assert "model.layers.0.self_attn.q_proj" in awq and 0 <= awq["model.layers.0.self_attn.q_proj"]["awq_alpha"] < 1
    assert "model.layers.0.self_attn.o_proj" not in awq  # grouped heads: v's outputs are repeated into o
    # the same bits and group size: GPTQ changes the codes, not the format or the size
    assert rec["mlx-w4g"]["layer_quantization"]["summary"]["counts"] == \
        rec["mlx-w4"]["layer_quantization"]["summary"]["counts"]
    assert abs(rec["mlx-w4g"]["size"] - rec["mlx-w4"]["size"]) < 0.02 * rec["mlx-w4"]["size"]


def test_speed_figures_and_reports_carry_quality(built):
    folder, _, _ = built
    rec = _records(folder)["mlx-w4"]
    assert rec["speed"]["prefill_tokens_per_s"] > 0 and rec["speed"]["decode_tokens_per_s"] > 0
    assert rec["speed"]["where"] == "build host" and len(rec["speed"]["load_average"]) == 3
    report = json.loads((folder / "report.json").read_text())
    target = next(t for t in report["manifests"][0]["targets"] if t["target"] == "mlx-w2")
    assert target["quality"]["kld_mean"] == _records(folder)["mlx-w2"]["quality"]["kld_mean"]
    xml = (folder / "report.xml").read_text()
    assert 'name="quality.kld_mean"' in xml and 'name="speed.decode_tokens_per_s"' in xml


def test_a_mixed_scheme_is_measured_rule_by_rule(built):
    """Each rule of a mixed scheme on its own (the float model with only that rule's layers
    quantized): block 0 at 8 bits costs far less than the 2-bit rest."""
    folder, _, _ = built
    q = _records(folder)["mlx-mix"]["quality"]
    rules = q["rules"]
    assert set(rules) == {"rules[0]", "linear"}, rules
    assert rules["rules[0]"]["rule"] == "rules[0] (blocks [0])" and rules["rules[0]"]["layers"] == 7
    assert rules["rules[0]"]["quantization"] == "8-bit, group 32"
    assert rules["linear"]["quantization"] == "2-bit, group 32" and rules["linear"]["layers"] >= 7
    assert rules["rules[0]"]["kld_mean"] < 0.1 * rules["linear"]["kld_mean"], rules
    # the artifact's own figure is the whole scheme's: worse than its 8-bit part alone
    assert q["kld_mean"] > rules["rules[0]"]["kld_mean"]
    assert _records(folder)["mlx-w4"]["quality"]["rules"] is None  # one rule: nothing to split


def test_html_report_of_a_build_and_a_release_renders_in_chromium(built, tmp_path, subprocess_env):
    """`mlxbuild report` on the build's --report JSON and on the release's lock: each page is
    one file that loads in headless Chromium with no network and no console error, with
    every chart drawn (an SVG with its points or bars, and a screenshot that is not blank)."""
    import shutil

    page = _chromium_page()
    # A copy to release: a released version refuses the edits the tests below make.
    folder = tmp_path / "copy"
    shutil.copytree(built[0], folder, symlinks=True)
    env = subprocess_env(MLXBUILD_CACHE=folder / "cache", MLXBUILD_ARTIFACTS=folder / "artifacts")
    build_page = tmp_path / "build.html"
    p = _mlxbuild(folder, env, "report", "report.json", "-o", str(build_page))
    assert p.returncode == 0 and "wrote" in p.stdout, p.stdout + p.stderr
    rel = subprocess.run([*doit_command(), "release", "--measure-speed", "m.yaml"], cwd=folder, env=env, capture_output=True,
                         text=True, timeout=600)
    assert rel.returncode == 0, rel.stdout[-2000:] + rel.stderr[-2000:]
    p = _mlxbuild(folder, env, "report", "artifacts/quality-bits/0.1.0")
    assert p.returncode == 0, p.stdout + p.stderr
    release_page = folder / "quality-bits-0.1.0-report.html"
    assert not list((folder / "artifacts" / "quality-bits" / "0.1.0").glob("*.html"))  # not in the version

    records = _records(folder)
    measured = [t for t, r in records.items() if r["quality"].get("kld_mean") is not None]
    # build: size/quality, speed, per rule, timeline (tiny steps run in-process: no peak
    # memory chart); release: no timeline
    for html_file, charts in ((build_page, 4), (release_page, 3)):
        assert "<script src=" not in html_file.read_text()
        with page(html_file) as (view, errors):
            assert view.locator("#targets tbody tr").count() == len(records)
            assert view.locator(".js-plotly-plot").count() == charts, html_file
            view.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {charts}")
            # the size-against-quality chart has a point per measured target
            assert view.locator("#chart-0 .scatterlayer .point").count() == len(measured)
            # the per-rule chart has a bar per rule of the mixed target
            rule_chart = view.locator(".js-plotly-plot", has=view.locator(".barlayer")).nth(1)
            assert rule_chart.locator(".barlayer .point").count() >= 2
            assert _colours(view, view.locator("#chart-0").screenshot()) > 20
            assert not errors, errors
    with page(build_page) as (view, errors):
        assert "cache hit rate" in view.locator("#cache-summary").inner_text()
        assert view.locator("#steps tbody tr").count() > len(records)
        assert view.locator("#chart-3 .barlayer .point").count() == view.locator("#steps tbody tr").count()
        assert not errors, errors


def test_html_report_charts_the_peak_memory_of_child_steps():
    from mlxbuild import html_report

    steps = [{"step": "quantize", "task": "quantize:a", "label": "m 4w", "status": "ran", "cache": "built",
              "start": 0.0, "seconds": 3.0, "peak_rss_mb": 1500.0, "memory_estimate_mb": 1800.0},
             {"step": "export", "task": "export:a", "label": "m 4w", "status": "up-to-date", "cache": "hit",
              "start": 3.0, "seconds": 0.1, "waited": 2.5}]
    data = {"kind": "build", "title": "t", "subtitle": "", "targets": [], "steps": steps, "error": None,
            "source": "r.json"}
    charts = {heading: fig for heading, _, fig in html_report._figures(data)}
    assert list(charts["Peak memory per step"].data[0].y) == [1500.0]
    assert list(charts["Peak memory per step"].data[1].y) == [1800.0]
    assert {t.name for t in charts["Step timeline"].data} == {"built", "hit"}
    assert charts["Size against quality"] is None and charts["Speed on the build host"] is None
    page = html_report.render(data)
    assert "cache hit rate 50%" in page and "1500 MB" in page and "<td class='n'>2.5 s</td>" in page


def test_html_report_refuses_what_is_not_a_report(tmp_path, subprocess_env):
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    (tmp_path / "y.json").write_text("{not json")
    env = subprocess_env()
    for name, message in (("x.json", "neither a build report"), ("y.json", "not JSON"),
                          ("missing.json", "no such file"), (".", "no release.lock.json")):
        p = _mlxbuild(tmp_path, env, "report", name)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and message in p.stderr, (name, p.stderr)
        assert not list(tmp_path.glob("*.html"))


CHROMIUM = Path("/usr/bin/chromium")  # Debian's; .ci/run installs it


def _mlxbuild(folder, env, *args) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "mlxbuild.cli", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)


def _chromium_page():
    """A context manager opening a file in headless Chromium through Playwright: yields the
    page and the list of console errors and uncaught exceptions it collects."""
    import contextlib
    import os

    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")

    @contextlib.contextmanager
    def page(path: Path):
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            try:
                view = browser.new_page(viewport={"width": 1280, "height": 900})
                errors: list[str] = []
                view.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                view.on("pageerror", lambda e: errors.append(str(e)))
                # Nothing may come from the network: the page must carry all it needs.
                view.route("http*://**", lambda route: (errors.append(f"fetched {route.request.url}"),
                                                        route.abort()))
                view.goto(path.resolve().as_uri(), wait_until="load")
                yield view, errors
            finally:
                browser.close()
    return page


def _colours(view, png: bytes) -> int:
    """Distinct colours in a PNG, decoded by the browser itself (no image library needed)."""
    import base64

    return view.evaluate("""async (src) => {
        const img = new Image(); img.src = src; await img.decode();
        const c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data; const seen = new Set();
        for (let i = 0; i < d.length; i += 4) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
        return seen.size; }""", "data:image/png;base64," + base64.b64encode(png).decode())


def test_the_float_reference_is_shared_and_rekeyed_by_the_dataset(built):
    """One baseline for the dtype, whatever the scheme or backend; a changed evaluation text
    reruns the baseline and the quality steps only."""
    folder, env, _ = built
    assert not _ran(_build(folder, env, "--measure-speed"))  # the same build again does nothing
    (folder / "eval.txt").write_text(TEXT.replace("phone", "laptop"))
    p = _build(folder, env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    kinds = {line.split()[0] for line in _ran(p)}
    assert kinds == {"baseline", "quality", "package"}, _ran(p)
    assert sum(line.startswith("baseline ") for line in _ran(p)) == 1


def test_a_target_below_its_gate_fails_with_exit_4_and_keeps_the_last_good_artifact(built):
    folder, env, _ = built
    out = folder / "artifacts" / "quality-bits" / "0.1.0"
    before = (out / "quality-bits-mlx-w8.pte").read_bytes()
    text = BITS.replace("  - {name: mlx-w8, backend: mlx, quantization: w8}",
                        "  - {name: mlx-w8, backend: mlx, quantization: w8, quality: {max_kld: 1.0e-9}}")
    (folder / "m.yaml").write_text(text)
    try:
        p = _build(folder, env, "--continue")
    finally:
        (folder / "m.yaml").write_text(BITS)
    assert p.returncode == 4, p.stdout[-2000:] + p.stderr[-2000:]
    line = next(ln for ln in (p.stdout + p.stderr).splitlines() if "quality gate" in ln)
    assert "quality-bits/mlx-w8: quality gate: KL divergence" in line and "> max_kld 1e-09" in line, line
    assert (out / "quality-bits-mlx-w8.pte").read_bytes() == before
    assert json.loads((out / "quality-bits-mlx-w8.json").read_text())["quality"]["gate"]["max_kld"] != 1e-9


# --------------------------------------------------------------------------- units


def test_figures_of_identical_and_shifted_distributions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)) * 3
    tokens = rng.integers(0, 11, (2, 5))
    same = quality.figures(quality.log_softmax(logits), logits, tokens, text=True)
    assert same["kld_mean"] < 1e-12 and same["top1"] == 1.0 and abs(same["ppl_increase"]) < 1e-12
    moved = quality.figures(quality.log_softmax(logits), logits + rng.normal(size=logits.shape), tokens, text=False)
    assert moved["kld_mean"] > 0.01 and "ppl" not in moved and moved["positions"] == 10


def test_figures_a_few_rows_at_a_time_are_the_whole_blocks(tmp_path):
    """figures and the baseline's log-probabilities work ``ROWS`` positions at a time (the
    whole [L, V] block in float64 was the quality step's largest allocation): the same
    numbers as one pass over every position, with L not a multiple of ROWS."""
    rng = np.random.default_rng(2)
    n, length, vocab = 2, quality.ROWS * 2 + 5, 13
    logits = (rng.normal(size=(n, length, vocab)) * 3).astype(np.float32)
    tokens = rng.integers(0, vocab, (n, length))
    quality.save_log_probs(tmp_path / "lp.npy", list(logits))
    p_log = np.load(tmp_path / "lp.npy")
    assert p_log.shape == (n, length, vocab) and p_log.dtype == np.float32
    assert np.array_equal(p_log, quality.log_softmax(logits).astype(np.float32))
    moved = logits + rng.normal(size=logits.shape).astype(np.float32)
    fig = quality.figures(p_log, moved, tokens, text=True)
    p, q = p_log.astype(np.float64), quality.log_softmax(moved)
    kld = np.maximum((np.exp(p) * (p - q)).sum(-1), 0.0)
    nxt = tokens[:, 1:, None]
    nll_f = -np.take_along_axis(p[:, :-1], nxt, -1).mean()
    nll_q = -np.take_along_axis(q[:, :-1], nxt, -1).mean()
    assert fig["positions"] == n * length
    assert fig["kld_mean"] == pytest.approx(kld.mean(), rel=1e-12)
    assert fig["kld_p99"] == pytest.approx(np.percentile(kld, 99), rel=1e-12)
    assert fig["top1"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).mean())
    assert fig["ppl_increase"] == pytest.approx(np.exp(nll_q - nll_f) - 1, rel=1e-9)


def test_gate_defaults_follow_the_narrowest_width_and_overrides_stack():
    m = parse_manifest(BITS.replace("  schemes:\n", "  max_kld: 0.5\n  schemes:\n")
                       .replace("  - {name: mlx-w2, backend: mlx, quantization: w2}",
                                "  - {name: mlx-w2, backend: mlx, quantization: w2, quality: {min_top1: 0.2}}"),
                       "m.yaml")
    gate = {t.name: m.quality_gate(t) for t in m.targets}
    assert gate["mlx-fp32"] == {**quality.DEFAULT_GATES["none"], "max_kld": 0.5}
    assert gate["mlx-w8"] == {**quality.DEFAULT_GATES["8"], "max_kld": 0.5}
    assert gate["mlx-w2"] == {"max_kld": 100, "min_top1": 0.2, "max_ppl_increase": 100}
    assert quality.narrowest_bits({"linear": {"format": "affine", "bits": 8},
                                   "rules": [{"format": "affine", "bits": 2}]}) == "2"
    assert quality.narrowest_bits({"linear": {"format": "nvfp4"}}) == "4"
    assert quality.failures({"kld_mean": 0.3, "top1": 0.2, "top1_decisive": 0.5, "decisive_positions": 8,
                             "ppl_increase": 0.1},
                            {"max_kld": 0.25, "min_top1": 0.75, "max_ppl_increase": 0.3}) == [
        "KL divergence 0.3 > max_kld 0.25",
        "top-1 agreement 0.5 (at the 8 decisive positions) < min_top1 0.75"]
    # no decisive position (an untrained model's near-uniform outputs): nothing to hold top-1 to
    assert quality.failures({"kld_mean": 0.0, "top1": 0.1, "top1_decisive": None, "decisive_positions": 0},
                            {"min_top1": 0.75}) == []


def test_top1_is_held_only_where_the_float_model_is_decisive():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 6, 7))
    logits[0, :3, 0] += 5.0  # three decisive positions (token 0 far ahead)
    moved = logits.copy()
    moved[0, 3:] = logits[0, 3:] * -1.0  # the near-uniform rest flips
    fig = quality.figures(quality.log_softmax(logits), moved, None, text=False)
    assert fig["decisive_positions"] >= 3 and fig["top1_decisive"] >= 3 / fig["decisive_positions"] - 1e-9


@pytest.mark.parametrize("edit, message", [
    ("  dataset: eval.txt", "quality.dataset: no such file"),
    ("  seq_len: 32", "quality.seq_len: 65 tokens do not fit the KV cache (export.max_context_length: 64)"),
    ("    w2: {max_kld: 100, min_top1: 0, max_ppl_increase: 100}",
     "quality.schemes.w3: unknown quantization scheme 'w3'"),
])
def test_bad_quality_settings_are_one_line_errors(tmp_path, subprocess_env, edit, message):
    replacement = {"  dataset: eval.txt": "  dataset: missing.txt", "  seq_len: 32": "  seq_len: 65",
                   "    w2: {max_kld: 100, min_top1: 0, max_ppl_increase: 100}": "    w3: {max_kld: 1}"}[edit]
    (tmp_path / "m.yaml").write_text(BITS.replace(edit, replacement))
    env = subprocess_env(MLXBUILD_CACHE=tmp_path / "cache", MLXBUILD_ARTIFACTS=tmp_path / "artifacts")
    p = _build(tmp_path, env)
    assert p.returncode == 3, p.stdout + p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "m.yaml:" in errors[0], p.stderr
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("*.pte"))


def test_a_jsonl_dataset_reads_its_text_fields_and_names_a_bad_line(tmp_path):
    from mlxbuild.errors import BuildError
    from mlxbuild.evaluation import read_dataset, tokens

    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "first"}\n\n{"text": "second"}\n')
    assert read_dataset({"file": str(good)}) == "first\nsecond"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "first"}\n["no"]\n')
    with pytest.raises(BuildError, match=r"bad.jsonl:2: not a JSON object with a 'text' field"):
        tokens({"sequences": 1, "seq_len": 4, "dataset": {"file": str(bad)}}, tmp_path, 10)


def test_gptq_calibration_text_keys_only_the_gptq_chain(tmp_path):
    from mlxbuild.fingerprint import FileHasher
    from mlxbuild.plan import Plan, plan_manifest

    text = BITS.replace("calibration: {samples: 8, seq_len: 64}",
                        "calibration: {dataset: calib.txt, samples: 8, seq_len: 64}")
    (tmp_path / "eval.txt").write_text(TEXT)
    (tmp_path / "m.yaml").write_text(text)

    def keys(calib: str) -> dict:
        (tmp_path / "calib.txt").write_text(calib)
        plan = Plan()
        plan_manifest(parse_manifest(text, str(tmp_path / "m.yaml")), plan,
                      FileHasher(None), tmp_path / "artifacts")
        return {n: s.key for n, s in plan.steps.items()}

    before, after = keys("one calibration text"), keys("another calibration text")
    changed = {n.split(":")[0] + ":" + n.split(":")[1].split(".")[0] for n in before if before[n] != after.get(n, "")}
    assert changed == {"quantize:w4g", "export:w4g", "reference:w4g", "lower:quality-bits/mlx-w4g",
                       "verify:quality-bits/mlx-w4g", "quality:quality-bits/mlx-w4g",
                       "package:quality-bits/mlx-w4g"}, changed
    # and the quantize step reads the tokenizer that encodes it
    plan = Plan()
    plan_manifest(parse_manifest(text, str(tmp_path / "m.yaml")), plan, FileHasher(None), tmp_path / "a")
    step = next(s for n, s in plan.steps.items() if n.startswith("quantize:w4g"))
    assert any(d.startswith("tokenizer:") for d in step.deps) and step.params.calibration["dataset"]["sha256"]


def test_awq_scales_leave_the_float_model_unchanged_and_refuse_other_layouts():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mlxbuild import awq
    from mlxbuild.errors import BuildError

    def tiny(model_type, **extra):
        config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      head_dim=16, **extra)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()

    model = tiny("qwen3")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
        chosen = {n: (4, 32) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
        alphas = awq.apply(model, chosen, ids)
        after = model(input_ids=ids).logits
    # no grouped heads here, so o_proj is scaled through v too
    assert "model.layers.1.self_attn.o_proj" in alphas and "model.layers.0.mlp.down_proj" in alphas
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()  # the same function ...
    assert any(a > 0 for a in alphas.values()) and not torch.equal(q_before, model.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(BuildError, match="method awq folds its scales into the layers of llama"):
        awq.apply(tiny("gemma3_text", sliding_window=8), {}, ids)


def test_synthetic_outlier_channels_scale_the_same_channels_of_every_norm():
    import torch

    from mlxbuild.stages.weights import synthetic_tensors

    recipe = {"architecture": "qwen3", "seed": 0, "outliers": {"channels": 3, "scale": 8.0},
              "config": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}}
    tensors = dict(synthetic_tensors(recipe, torch.float32))
    norms = [t for n, t in tensors.items() if n.endswith("norm.weight") and t.shape == (32,)]
    assert len(norms) == 5  # two per layer and the final one; q/k norms are head-sized
    for w in norms:
        assert sorted(w.tolist()).count(8.0) == 3 and torch.equal(w == 8.0, norms[0] == 8.0)
