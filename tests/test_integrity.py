"""A cache and an artifacts tree that can't lie: a corrupted cache entry is evicted, named in
one line and rebuilt, never published; verification stands for the bytes it checked; a
published file that no longer matches its record is noticed by the next (no-op) build and by
`mlxbuild check`."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
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
export: {max_context_length: 32}
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
    for kind in ("weights", "tokenizer", "quantize", "export", "reference", "lower", "verify"):
        entry = clean.entry(kind)
        files = json.loads((entry / ".complete").read_text())["files"]
        on_disk = {p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file() and p.name != ".complete"}
        assert set(files) == on_disk and on_disk, kind
        for rel, info in files.items():
            assert info == {"sha256": sha256(entry / rel), "size": (entry / rel).stat().st_size}


# Each kind of entry, damaged by a flipped byte or cut in half, while the artifact is not
# published: the step reading it says so in one line, it is rebuilt, and the bytes published are
# the clean build's.
# The default run damages the export, the lowered program and the verification (what the
# measured cases hit); the other kinds run with `-m slow` (about 2 minutes).
_SLOW = pytest.mark.slow
CASES = [pytest.param("weights", "model.safetensors", flip, marks=_SLOW, id="weights-flip"),
         pytest.param("quantize", "state.pt", truncate, marks=_SLOW, id="quantize-truncate"),
         pytest.param("export", "forward.pt2", flip, id="export-flip"),
         pytest.param("reference", "logits.npy", flip, marks=_SLOW, id="reference-flip"),
         pytest.param("lower", "model.pte", flip, id="lower-flip"),
         pytest.param("lower", "model.pte", truncate, marks=_SLOW, id="lower-truncate"),
         pytest.param("verify", "verify.json", truncate, id="verify-truncate")]


@pytest.mark.parametrize("kind,file,damage", CASES)
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


# -- interruption, resources, concurrency


def _popen(ws, *args, **env):
    full = ws.make_env(MLXBUILD_CACHE=ws.cache, MLXBUILD_ARTIFACTS=ws.root / "artifacts", PYTHONUNBUFFERED="1", **env)
    # SIGINT as a terminal delivers it: a suite started as a background job (`pytest &` in a
    # script) passes SIGINT on ignored, and the build would rightly keep ignoring it.
    return subprocess.Popen([*doit_command(), "build", *args, "m.yaml"], cwd=ws.root, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _scratch(ws) -> list[str]:
    root = ws.cache / "tmp"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.mark.parametrize("signum,code,name", [
    pytest.param(signal.SIGINT, 130, "SIGINT", id="sigint"),
    pytest.param(signal.SIGTERM, 143, "SIGTERM", marks=pytest.mark.slow, id="sigterm")])
def test_an_interrupted_build_writes_its_reports_and_one_line(ws, signum, code, name):
    shutil.rmtree(ws.entry("lower"))
    shutil.rmtree(ws.entry("verify"))
    ws.unpublish()
    proc = _popen(ws, "--report", "r.json", "--junit", "j.xml")
    for line in proc.stdout:
        if line.startswith(".  lower"):
            time.sleep(1.0)  # inside the lowering
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in out + err
    assert err.strip().splitlines() == [f"interrupted by {name}: stopped lower {NAME}/portable-fp32"], err
    report = json.loads((ws.root / "r.json").read_text())
    [target] = report["manifests"][0]["targets"]
    assert report["exit_code"] == code and report["error"]["kind"] == "interrupted"
    assert target["failure"]["kind"] == "interrupted" and target["failure"]["step"] == "lower"
    assert 'type="interrupted"' in (ws.root / "j.xml").read_text()
    assert _scratch(ws) == []  # the interrupted step's scratch directory is gone
    again = ws.build()  # and the next build finishes the work
    assert again.returncode == 0 and (ws.art / f"{STEM}.pte").exists()


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(path: Path, size: str, readonly: bool = False):
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if readonly else "")
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], capture_output=True)


def test_a_full_artifacts_filesystem_is_one_line_and_leaves_no_debris(ws, tmpfs):
    shutil.rmtree(ws.root / "artifacts")
    full = tmpfs(ws.root / "artifacts", "16k")
    p = ws.build()
    assert p.returncode == 1, p.stderr
    [fail] = [ln for ln in p.stdout.splitlines() if ln.startswith("FAIL ")]
    assert fail.startswith(f"FAIL package {NAME}/portable-fp32: No space left on device: "), fail
    assert str(full) in fail and "Traceback" not in p.stdout + p.stderr
    leftovers = [q.name for q in full.rglob("*") if q.is_file()]
    assert leftovers == [], leftovers  # no .partial, no half-written artifact
    assert _scratch(ws) == []


def test_a_read_only_artifacts_directory_is_refused_before_any_step(ws, tmpfs):
    shutil.rmtree(ws.root / "artifacts")
    ro = tmpfs(ws.root / "artifacts", "1m", readonly=True)
    p = ws.build()
    assert p.returncode == 2 and not p.ran, p.stdout
    assert p.stderr.strip().splitlines() == [
        f"error: {ro}: not writable (Read-only file system); set MLXBUILD_CACHE / MLXBUILD_ARTIFACTS "
        "to folders this build can write"], p.stderr


def test_concurrent_builds_do_each_step_once(ws):
    shutil.rmtree(ws.entry("export"))
    shutil.rmtree(ws.entry("lower"))
    shutil.rmtree(ws.entry("verify"))
    ws.unpublish()
    procs = [_popen(ws) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    text = "".join(o + e for o, e in outs)
    assert text.count("lowering forward to portable") == 1, text  # one lowering, two waits
    assert text.count("torch.export") == 1, text
    assert sha256(ws.art / f"{STEM}.pte") == sha256(ws.root / "artifacts" / NAME / "0.1.0" / f"{STEM}.pte")
    assert _scratch(ws) == []


def test_scratch_left_by_a_dead_build_is_removed_a_live_one_kept(ws):
    import fcntl
    import os

    root = ws.cache / "tmp"
    root.mkdir(exist_ok=True)
    # A killed build's scratch: its owner file is there but nobody holds its lock.
    (root / "lower-dead").mkdir()
    (root / "lower-dead" / "forward.pt2").write_bytes(b"x" * 1000)
    (root / "lower-dead.owner").write_text("")
    # A running build's: this test holds the lock.
    (root / "lower-live").mkdir()
    fd = os.open(root / "lower-live.owner", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        p = ws.build()
        assert p.returncode == 0, p.stderr
        assert _scratch(ws) == ["lower-live", "lower-live.owner"]
    finally:
        os.close(fd)


@pytest.mark.slow
def test_kill_9_at_random_points_never_leaves_wrong_bytes_or_debris(clean, tmp_path):
    """20 builds killed with SIGKILL at random points (about 6 minutes): each rerun succeeds,
    publishes the clean build's bytes and leaves the scratch area empty."""
    import random

    rng = random.Random(0)
    want = sha256(clean.art / f"{STEM}.pte")
    ws = Ws(tmp_path / "ws", clean.make_env)
    shutil.copytree(clean.root, ws.root, symlinks=True)
    outcomes = []
    for trial in range(20):
        for kind in ("export", "lower", "verify"):
            if rng.random() < 0.7:
                for entry in (ws.cache / kind).glob("*/*"):
                    shutil.rmtree(entry)
        ws.unpublish()
        proc = _popen(ws)
        time.sleep(rng.uniform(0.5, 12.0))
        proc.kill()
        proc.communicate()
        again = ws.build()
        assert again.returncode == 0, (trial, again.stderr[-2000:])
        assert sha256(ws.art / f"{STEM}.pte") == want, trial
        assert ws.check().returncode == 0, trial
        assert _scratch(ws) == [], (trial, _scratch(ws))
        outcomes.append(proc.returncode)
    assert len(outcomes) == 20


def test_check_compares_a_released_version_with_its_lock(ws):
    """A file rewritten together with its record still differs from the release lock."""
    pte, record_file = ws.art / f"{STEM}.pte", ws.art / f"{STEM}.json"
    record = ws.record()
    lock = {"format": 1, "targets": {"portable-fp32": {"stem": STEM, "files": record["files"]}}}
    (ws.art / "release.lock.json").write_text(json.dumps(lock))
    assert ws.check().returncode == 0
    flip(pte, 0.4)
    record["files"][pte.name]["sha256"] = sha256(pte)  # the record made to agree: the lock does not
    record_file.write_text(json.dumps(record))
    c = ws.check()
    assert c.returncode == 4, c
    assert c.stderr.strip().splitlines() == [
        f"mismatch: {pte}: sha256 differs from release.lock.json (target portable-fp32)"], c.stderr
