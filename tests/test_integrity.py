"""A cache and an artifacts tree that can't lie: a corrupted cache entry is evicted, named in
one line and rebuilt, never published; verification stands for the bytes it checked; a
published file that no longer matches its record is noticed by the next (no-op) build and by
`mlxbuild check`."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from buildlog import STEP_LINE, doit_command

NAME = "integ"
STEM = f"{NAME}-portable-fp32"
MANIFEST = """\
name: integ
version: 0.1.0
model:
  source:
    synthetic:
      architecture: qwen3
      seed: 0
      config: {vocab_size: 128, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
               num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16,
               max_position_embeddings: 256, tie_word_embeddings: true, bos_token_id: 1,
               eos_token_id: 2}
  dtype: fp32
export: {max_context_length: 32, max_prefill_chunk: 16}
quantization:
  e8:
    embedding: {bits: 8, group_size: per_channel}
targets:
  - {name: portable-fp32, backend: portable, quantization: e8}
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Ws:
    def __init__(self, root: Path, make_env):
        self.root, self.make_env = root, make_env
        self.cache, self.art = root / "cache", root / "artifacts" / NAME / "0.1.0"

    def build(self):
        p = subprocess.run([*doit_command(), "build", "m.yaml"], cwd=self.root, capture_output=True, text=True,
                           env=self.make_env(MLXBUILD_CACHE=self.cache, MLXBUILD_ARTIFACTS=self.root / "artifacts"),
                           timeout=900)
        p.ran = {(m.group(2), m.group(3)) for m in map(STEP_LINE.match, p.stdout.splitlines())
                 if m and m.group(1) == ".  "}
        return p

    def check(self):
        return subprocess.run([str(Path(sys.executable).with_name("mlxbuild")), "check",
                               str(self.root / "artifacts")], capture_output=True, text=True)

    def entry(self, kind: str) -> Path:
        [path] = [p for p in (self.cache / kind).glob("*/*") if (p / ".complete").exists()]
        return path

    def record(self) -> dict:
        return json.loads((self.art / f"{STEM}.json").read_text())

    def unpublish(self):
        for p in self.art.glob(f"{STEM}*"):
            p.unlink()


@pytest.fixture(scope="module")
def clean(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("integ-clean")
    (root / "m.yaml").write_text(MANIFEST)
    ws = Ws(root, subprocess_env)
    p = ws.build()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return ws


@pytest.fixture
def ws(clean, tmp_path):
    shutil.copytree(clean.root, tmp_path / "ws", symlinks=True)
    return Ws(tmp_path / "ws", clean.make_env)


def flip(path: Path, at: float = 0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_entries_record_their_files(clean):
    for kind in ("weights", "quantize", "export", "reference", "lower", "verify"):
        entry = clean.entry(kind)
        files = json.loads((entry / ".complete").read_text())["files"]
        on_disk = {p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file() and p.name != ".complete"}
        assert set(files) == on_disk and on_disk, kind
        for rel, info in files.items():
            assert info == {"sha256": sha256(entry / rel), "size": (entry / rel).stat().st_size}


# Each kind of entry, damaged by a flipped byte or cut in half, while the artifact is not
# published: the step reading it says so in one line, it is rebuilt, and the bytes published are
# the clean build's.
CASES = [("weights", "model.safetensors", flip), ("quantize", "state.pt", truncate),
         ("export", "forward.pt2", flip), ("reference", "logits.npy", flip),
         ("lower", "model.pte", flip), ("lower", "model.pte", truncate), ("verify", "verify.json", truncate)]


@pytest.mark.parametrize("kind,file,damage", CASES, ids=[f"{k}-{f}-{d.__name__}" for k, f, d in CASES])
def test_a_damaged_entry_is_rebuilt_not_published(ws, clean, kind, file, damage):
    entry = ws.entry(kind)
    target = entry / file if (entry / file).exists() else next(p for p in entry.iterdir() if p.suffix != ".json"
                                                               and p.name != ".complete")
    damage(target)
    ws.unpublish()
    # The steps downstream of the damaged entry are gone too, so the damaged entry is read.
    downstream = {"weights": ["quantize", "export", "reference", "lower", "verify"],
                  "quantize": ["export", "reference", "lower", "verify"], "export": ["lower", "verify"],
                  "reference": ["verify"], "lower": [], "verify": []}[kind]
    for k in downstream:
        shutil.rmtree(ws.entry(k))
    p = ws.build()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    warnings = [ln for ln in p.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, p.stderr
    assert f"cache entry {kind}/{entry.name[:12]} is corrupt: {target.name}: " in warnings[0], warnings
    assert warnings[0].endswith("evicted, rebuilding it")
    assert sha256(ws.art / f"{STEM}.pte") == sha256(clean.art / f"{STEM}.pte")
    assert ws.record()["verification"]["passed"] is True
    assert ws.check().returncode == 0


def test_verification_stands_for_the_bytes_it_checked(ws, clean):
    """A lowered program whose bytes changed (its entry internally consistent) is verified
    again before it is published; the record names the sha256 it verified."""
    record = clean.record()
    assert record["verification"]["artifact_sha256"] == record["sha256"]
    lower = ws.entry("lower")
    other = bytearray((lower / "model.pte").read_bytes())
    other[len(other) // 2] ^= 0x01  # a different program that still deserializes, maybe
    (lower / "model.pte").write_bytes(bytes(other))
    marker = json.loads((lower / ".complete").read_text())
    marker["files"]["model.pte"] = {"sha256": sha256(lower / "model.pte"), "size": len(other)}
    (lower / ".complete").write_text(json.dumps(marker))
    ws.unpublish()
    p = ws.build()
    assert ("verify", f"{NAME}/portable-fp32") in p.ran, p.stdout
    if p.returncode == 0:  # the flipped byte was harmless: what is published was verified
        assert ws.record()["verification"]["artifact_sha256"] == sha256(ws.art / f"{STEM}.pte")
    else:  # or it was caught, and nothing was published
        assert not (ws.art / f"{STEM}.pte").exists()


def test_a_tampered_published_artifact_is_noticed_and_republished(ws, clean):
    pte = ws.art / f"{STEM}.pte"
    flip(pte, 0.3)
    c = ws.check()
    assert c.returncode == 4 and f"mismatch: {pte}: sha256" in c.stderr, c
    p = ws.build()
    assert p.returncode == 0, p.stderr
    assert ("package", f"{NAME}/portable-fp32") in p.ran and len(p.ran) == 1, p.stdout
    assert f"warning: {pte}: sha256" in p.stderr and "republishing it from the cache" in p.stderr
    assert sha256(pte) == sha256(clean.art / f"{STEM}.pte")
    assert ws.check().returncode == 0
    again = ws.build()
    assert again.returncode == 0 and not again.ran, again.stdout  # a no-op once more


def test_check_names_missing_files_and_refuses_an_empty_tree(ws):
    (ws.art / f"{STEM}.pte").unlink()
    c = ws.check()
    assert c.returncode == 4 and f"mismatch: {ws.art / (STEM + '.pte')}: missing" in c.stderr, c
    empty = ws.root / "empty"
    empty.mkdir()
    nothing = subprocess.run([str(Path(sys.executable).with_name("mlxbuild")), "check", str(empty)],
                             capture_output=True, text=True)
    assert nothing.returncode == 2 and "no published artifacts" in nothing.stderr
