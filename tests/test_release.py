"""Releases: an immutable version (release.lock.json), its reproducible bundle, and
`mlxbuild check-bundle` catching tampering.

One release of a two-target tiny manifest (mlx-4w, portable-fp32) runs once per
session (`released_once`, shared with tests/test_inspect.py); every test that changes
anything works on its own copy of that working directory. Commands run as
subprocesses against the source frozen at session start (conftest.py).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "manifests/tiny.yaml"
NAME, VERSION = "qwen3-tiny", "0.1.0"
TARGETS = ("mlx-4w", "portable-fp32")
BUNDLE = f"artifacts/{NAME}/{NAME}-{VERSION}.tar.gz"
TOP = f"{NAME}-{VERSION}"
STEP = re.compile(r"^(\.  |-- )(weights|tokenizer|quantize|export|reference|lower|verify|package) ", re.M)


def tiny_manifest() -> str:
    """manifests/qwen.yaml with its targets cut to mlx-4w and portable-fp32."""
    text = (REPO / "manifests/qwen.yaml").read_text()
    # One decoder layer: half the lowering time, and still every kind of node.
    assert text.count("num_hidden_layers: 2\n") == 1, "manifests/qwen.yaml changed shape; update this test"
    text = text.replace("num_hidden_layers: 2\n", "num_hidden_layers: 1\n")
    head, sep, _ = text.partition("\ntargets:\n")
    assert sep, "manifests/qwen.yaml has no targets list; update this test"
    return head + sep + "".join(f"  - name: {t}\n    backend: {t.split('-')[0]}\n    quantization: "
                                f"{t.split('-')[1] if t != 'portable-fp32' else 'none'}\n" for t in TARGETS)


def tool(name: str) -> list[str]:
    script = Path(sys.executable).with_name(name)
    return [str(script)] if script.exists() else [sys.executable, "-m", {"doit": "doit", "mlxbuild": "mlxbuild.cli"}[name]]


class Workspace:
    def __init__(self, root: Path, make_env):
        self.root, self._make_env = Path(root), make_env

    def run(self, name: str, *args: str) -> subprocess.CompletedProcess:
        env = self._make_env(MLXBUILD_CACHE=self.root / "cache", MLXBUILD_ARTIFACTS=self.root / "artifacts")
        return subprocess.run(tool(name) + list(args), cwd=self.root, env=env, capture_output=True,
                              text=True, timeout=900)

    def clone(self, dest: Path) -> "Workspace":
        shutil.copytree(self.root, dest, symlinks=True)
        return Workspace(dest, self._make_env)

    @property
    def out_dir(self) -> Path:
        return self.root / "artifacts" / NAME / VERSION

    @property
    def bundle(self) -> Path:
        return self.root / BUNDLE

    def lock(self) -> dict:
        return json.loads((self.out_dir / "release.lock.json").read_text())

    def pte(self, target: str) -> Path:
        return self.out_dir / f"{NAME}-{target}.pte"


def show(p: subprocess.CompletedProcess) -> str:
    return f"$ {' '.join(map(str, p.args))} (exit {p.returncode})\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"


def released_once(tmp_path_factory, subprocess_env) -> Workspace:
    """`doit release` of the tiny manifest, run once per session (also for test_inspect.py)."""
    root = tmp_path_factory.getbasetemp() / "released-tiny"
    ws = Workspace(root, subprocess_env)
    if not (root / ".released").exists():
        shutil.rmtree(root, ignore_errors=True)
        (root / "manifests").mkdir(parents=True)
        (root / MANIFEST).write_text(tiny_manifest())
        p = ws.run("doit", "release", MANIFEST)
        assert p.returncode == 0, show(p)
        (root / ".release-output").write_text(p.stdout)
        (root / ".released").write_text("")
    return ws


@pytest.fixture(scope="module")
def released(tmp_path_factory, subprocess_env) -> Workspace:
    return released_once(tmp_path_factory, subprocess_env)


@pytest.fixture
def ws(released, tmp_path) -> Workspace:
    """A private copy of the released working directory."""
    return released.clone(tmp_path / "ws")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the release


def test_release_locks_every_target(released):
    out = (released.root / ".release-output").read_text()
    assert re.search(rf"^released {NAME} {VERSION}: .*{re.escape(BUNDLE)} \(\d+ bytes, sha256 [0-9a-f]{{64}}\)$",
                     out, re.M), out
    lock = released.lock()
    assert (lock["name"], lock["version"]) == (NAME, VERSION)
    assert lock["manifest"]["name"] == NAME and lock["manifest_file"] == "tiny.yaml"
    assert sorted(lock["targets"]) == sorted(TARGETS)
    for target, entry in lock["targets"].items():
        record = json.loads((released.out_dir / f"{NAME}-{target}.json").read_text())
        pte = released.pte(target)
        # The lock names the published bytes, and the inputs the package key hashes.
        assert entry["files"][pte.name] == {"sha256": sha256(pte), "size": pte.stat().st_size}
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(entry["files"])
        assert all(sha256(released.out_dir / n) == f["sha256"] for n, f in entry["files"].items())
        assert entry["package_key"] == record["package_key"]
        assert entry["inputs"] == {k: record[k] for k in entry["inputs"]}
        assert entry["inputs"]["keys"] == record["keys"]
        assert (entry["backend"], entry["scheme"]) == (record["backend"], record["scheme"])
        assert entry["verification"]["passed"] is True
        assert entry["verification"]["max_rel_error"] == record["verification"]["max_rel_error"]
        assert entry["settings"]["export"]["max_context_length"] == 128
        fwd = entry["methods"]["forward"]
        assert [(v["dtype"], v["sizes"]) for v in fwd["inputs"]] == [("int64", [1, 128]), ("int64", [128])]
        assert fwd["outputs"][0]["dtype"] == "float32" and fwd["outputs"][0]["sizes"][-1] == 512
    assert lock["tool_versions"]["executorch"] == lock["targets"]["mlx-4w"]["inputs"]["tool_versions"]["executorch"]


def test_bundle_is_sorted_with_fixed_metadata(released):
    raw = released.bundle.read_bytes()
    assert raw[4:8] == b"\0\0\0\0", "gzip header carries a timestamp"
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in members if m.isfile()}
    assert names == [TOP] + sorted(f"{TOP}/{n}" for n in files)
    assert sorted(files) == sorted(["README.md", "SHA256SUMS", "release.lock.json", "tokenizer.json",
                                    "tokenizer_config.json", f"{NAME}-portable-fp32.bpte"]
                                   + [f"{NAME}-{t}.pte" for t in TARGETS])
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(315532800, 0, 0, "", "")}
    for name in (f"{NAME}-{t}.pte" for t in TARGETS):
        assert files[name] == released.pte(name[len(NAME) + 1:-4]).read_bytes()
    sums = dict(reversed(line.split("  ", 1)) for line in files["SHA256SUMS"].decode().splitlines())
    assert sums == {n: hashlib.sha256(b).hexdigest() for n, b in files.items() if n != "SHA256SUMS"}
    assert json.loads(files["release.lock.json"]) == released.lock()


def test_model_card(released):
    card = (released.out_dir / "README.md").read_text()
    lock = released.lock()
    assert card.startswith(f"# {NAME} {VERSION}\n")
    for section in ("## Targets", "## Quantization", "## Verification", "## Quality", "## Speed", "## Loading",
                    "### Python (`executorch.runtime`)", "### C++ (`Module`)", "### iOS and macOS (Swift)",
                    "### Android (Java)", "## Licence"):
        assert f"\n{section}\n" in card, section
    for t in TARGETS:
        entry = lock["targets"][t]
        assert re.search(rf"^\| `{t}` \| [^|]*`{NAME}-{t}\.pte`[^|]* \| [^|]+ \| fp32 \| {entry['scheme']} \| [\d.]+ KB \|$",
                         card, re.M), t
        assert f"- `{t}`: not measured" in card  # the records carry no speed
        q = entry["quality"]  # the lock holds each target's quality figures; the card shows them
        assert q["passed"] is True and q["gate"] and q["positions"] == 256, q
        kld = f"{q['kld_mean']:.3g}"
        assert re.search(rf"^\| `{t}` \| {re.escape(kld)} \(", card, re.M), t
        err = f"{entry['verification']['max_abs_error']:.3g}"
        assert re.search(rf"^\| `{t}` \| [^|]+ \| {re.escape(err)} \|", card, re.M), t
    assert "- `mlx-4w` (scheme `4w`): linear: affine 4-bit, group 32; embedding: affine 4-bit, group 32" in card
    assert "Apple silicon" in card and "no licence file" in card  # a synthetic model has no licence


def test_release_again_is_a_noop_with_the_same_bytes(ws):
    before = {p.name: (sha256(p), p.stat().st_mtime_ns) for p in ws.out_dir.iterdir()}
    bundle = ws.bundle.read_bytes()
    ws.bundle.unlink()
    p = ws.run("mlxbuild", "release", MANIFEST)
    assert p.returncode == 0, show(p)
    assert not [m for m in STEP.findall(p.stdout) if m[0] == ".  "], show(p)  # nothing built
    assert ws.bundle.read_bytes() == bundle
    after = {p.name: (sha256(p), p.stat().st_mtime_ns) for p in ws.out_dir.iterdir()}
    assert after["release.lock.json"] == before["release.lock.json"]  # the lock is never rewritten
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}


# --------------------------------------------------------------------------- immutability


def test_changed_input_is_refused_before_any_work(ws):
    manifest = ws.root / MANIFEST
    text = manifest.read_text()
    new = text.replace("linear: {bits: 4, group_size: 32}\n", "linear: {bits: 4, group_size: 64}\n", 1)
    assert new != text
    manifest.write_text(new)
    before = {p: sha256(p) for p in ws.out_dir.iterdir()}
    for cmd in (("doit", "build", MANIFEST), ("mlxbuild", "release", MANIFEST)):
        p = ws.run(*cmd)
        assert p.returncode != 0, show(p)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, show(p)
        assert re.fullmatch(
            rf"error: {re.escape(MANIFEST)}: {NAME} {VERSION} is released \(.*release\.lock\.json\) and its inputs "
            r"changed: target mlx-4w: quantization\.linear\.group_size \(32 -> 64\); bump `version` in the "
            r"manifest to build them", lines[0]), show(p)
        assert not STEP.search(p.stdout), show(p)
    assert {p: sha256(p) for p in ws.out_dir.iterdir()} == before

    # A new version is a new release: planning it is accepted.
    manifest.write_text(new.replace(f"version: {VERSION}\n", "version: 0.2.0\n"))
    p = ws.run("mlxbuild", "plan", MANIFEST)
    assert p.returncode == 0, show(p)


def test_deleted_files_are_rebuilt_to_the_locked_bytes(ws):
    locked = ws.lock()["targets"]["mlx-4w"]["files"]
    ws.pte("mlx-4w").unlink()
    (ws.out_dir / f"{NAME}-mlx-4w.json").unlink()
    p = ws.run("doit", "build", MANIFEST)
    assert p.returncode == 0, show(p)
    assert ("package", ) == tuple(sorted({k for m, k in STEP.findall(p.stdout) if m == ".  "})), show(p)
    assert {"sha256": sha256(ws.pte("mlx-4w")), "size": ws.pte("mlx-4w").stat().st_size} \
        == locked[ws.pte("mlx-4w").name]


def test_cache_gc_keeps_what_the_lock_references(ws):
    """`mlxbuild cache gc --older-than 0` removes every entry the lock does not name; the
    release can still be republished from what stays, without building anything else."""
    def entries():
        return sorted(p.relative_to(ws.root / "cache").as_posix()
                      for p in (ws.root / "cache").glob("*/*/*") if (p / ".complete").exists())

    before = entries()
    lock = ws.out_dir / "release.lock.json"
    dry = ws.run("mlxbuild", "cache", "gc", "--older-than", "0", "--keep", str(lock), "--dry-run")
    assert dry.returncode == 0, show(dry)
    assert entries() == before
    named = {k for t in ws.lock()["targets"].values() for k in t["inputs"]["keys"].values()}
    would = [ln.split()[2] for ln in dry.stdout.splitlines() if ln.startswith("  would remove ")]
    assert would and all(w.split("/")[1] not in {k[:12] for k in named} for w in would), show(dry)
    p = ws.run("mlxbuild", "cache", "gc", "--older-than", "0", "--keep", str(lock))
    assert p.returncode == 0, show(p)
    after = entries()
    assert len(after) == len(before) - len(would) and {e.split("/")[2] for e in after} <= named
    assert {"reference", "baseline"} & {w.split("/")[0] for w in would}, show(dry)

    ws.pte("mlx-4w").unlink()
    (ws.out_dir / f"{NAME}-mlx-4w.json").unlink()
    b = ws.run("doit", "build", MANIFEST)
    assert b.returncode == 0, show(b)
    assert {k for m, k in STEP.findall(b.stdout) if m == ".  "} == {"package"}, show(b)
    assert sha256(ws.pte("mlx-4w")) == ws.lock()["targets"]["mlx-4w"]["files"][ws.pte("mlx-4w").name]["sha256"]


def test_rebuilt_bytes_that_differ_from_the_lock_are_not_published(ws):
    # Stand in for a non-reproducible build: the lock vouches for other bytes than the
    # ones the (unchanged) inputs produce.
    lock_file = ws.out_dir / "release.lock.json"
    lock = ws.lock()
    name = f"{NAME}-portable-fp32.pte"
    lock["targets"]["portable-fp32"]["files"][name]["sha256"] = "0" * 64
    lock_file.write_text(json.dumps(lock))
    ws.pte("portable-fp32").unlink()
    p = ws.run("doit", "build", MANIFEST)
    assert p.returncode != 0, show(p)
    assert re.search(rf"{NAME}/portable-fp32: rebuilt {re.escape(name)} does not match the release lock "
                     r"\(sha256 [0-9a-f]{12} size \d+ != locked 000000000000 size \d+\)", p.stdout + p.stderr), show(p)
    assert not ws.pte("portable-fp32").exists()


# --------------------------------------------------------------------------- check-bundle


def test_check_bundle_round_trip(released):
    p = released.run("mlxbuild", "check-bundle", BUNDLE)
    assert p.returncode == 0, show(p)
    assert p.stderr.strip() == "", show(p)
    assert f"ok: {BUNDLE}: 8 files; SHA256SUMS and release.lock.json match the contents" in p.stdout
    assert f"{NAME}-mlx-4w.pte: deserializes and runs (mlxbuild MLX runtime)" in p.stdout, show(p)
    assert f"{NAME}-portable-fp32.pte: deserializes and runs (executorch.runtime)" in p.stdout, show(p)


def _rewrite(bundle: Path, dest: Path, edit) -> Path:
    """A copy of `bundle` whose {name: bytes} went through `edit`."""
    with tarfile.open(bundle, mode="r:gz") as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar if m.isfile()}
    edit(files)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{TOP}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest.write_bytes(gzip.compress(buf.getvalue()))
    return dest


def _flip_byte(files):
    data = bytearray(files[f"{NAME}-mlx-4w.pte"])
    data[len(data) // 2] ^= 0x01
    files[f"{NAME}-mlx-4w.pte"] = bytes(data)


def _drop_file(files):
    del files[f"{NAME}-portable-fp32.pte"]


def _add_file(files):
    files["notes.txt"] = b"not part of the release\n"


def _edit_lock(files):
    # Claim another size in the lock, and make SHA256SUMS agree with the edited lock, so
    # only the lock-against-contents check can notice.
    lock = json.loads(files["release.lock.json"])
    entry = lock["targets"]["mlx-4w"]["files"][f"{NAME}-mlx-4w.pte"]
    entry["size"] += 1
    files["release.lock.json"] = json.dumps(lock).encode()
    files["SHA256SUMS"] = "".join(f"{hashlib.sha256(b).hexdigest()}  {n}\n" for n, b in sorted(files.items())
                                  if n != "SHA256SUMS").encode()


TAMPER = {
    "flipped-byte": (_flip_byte, [rf"^{NAME}-mlx-4w\.pte: sha256 [0-9a-f]{{12}} does not match SHA256SUMS \([0-9a-f]{{12}}\)$",
                                  rf"^{NAME}-mlx-4w\.pte: sha256 [0-9a-f]{{12}} does not match release\.lock\.json"]),
    "missing-file": (_drop_file, [rf"^{NAME}-portable-fp32\.pte: listed in SHA256SUMS but missing from the bundle$",
                                  rf"^{NAME}-portable-fp32\.pte: in release\.lock\.json \(target portable-fp32\) "
                                  r"but missing from the bundle$"]),
    "extra-file": (_add_file, [r"^notes\.txt: not listed in SHA256SUMS$", r"^notes\.txt: not in release\.lock\.json$"]),
    "edited-lock": (_edit_lock, [rf"^{NAME}-mlx-4w\.pte: size (\d+) does not match release\.lock\.json \((\d+)\)$"]),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_check_bundle_catches_tampering(released, tmp_path, case):
    from mlxbuild.bundle import check_bundle

    edit, expected = TAMPER[case]
    bad = _rewrite(released.bundle, tmp_path / f"{case}.tar.gz", edit)
    # Control: the same rewrite without an edit passes (the check is about contents, not tar bytes).
    assert check_bundle(_rewrite(released.bundle, tmp_path / "same.tar.gz", lambda f: None), run=False)[0] == []
    problems, _ = check_bundle(bad, run=False)
    for pattern in expected:
        assert any(re.match(pattern, p) for p in problems), (pattern, problems)
    if case == "edited-lock":
        assert len(problems) == 1, problems  # checksums agree: only the lock check fires


def test_check_bundle_command_reports_one_line_per_problem(released, tmp_path, capsys):
    from mlxbuild.cli import main

    bad = _rewrite(released.bundle, tmp_path / "bad.tar.gz", lambda f: (_flip_byte(f), _add_file(f)))
    assert main(["check-bundle", "--no-run", str(bad)]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) >= 4 and all(ln.startswith(f"error: {bad}: ") for ln in lines), err
    assert out == ""


def test_check_bundle_rejects_paths_outside_its_folder(tmp_path):
    from mlxbuild.bundle import check_bundle

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(buf.getvalue()))
    problems, _ = check_bundle(bad)
    assert problems == [f"{bad}: not a readable bundle: unsafe entry '../escape.txt'"]
    assert not (tmp_path.parent / "escape.txt").exists()
    assert not os.path.exists(tmp_path / "escape.txt")


# --------------------------------------------------------------------------- the checkpoint's licence


def test_licence_of_a_path_checkpoint_goes_into_the_bundle(released, tmp_path):
    from types import SimpleNamespace

    from mlxbuild import model_card, release
    from mlxbuild.bundle import check_bundle, write_bundle
    from mlxbuild.lock import write_lock

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "LICENSE").write_text("Apache License\nVersion 2.0, January 2004\n")
    (ckpt / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# A model\n")
    manifest = SimpleNamespace(model=SimpleNamespace(source=SimpleNamespace(path="ckpt", hf=None)),
                               source_path=ckpt)
    out_dir = tmp_path / "artifacts" / NAME / VERSION
    shutil.copytree(released.out_dir, out_dir)
    lic = release._license(manifest, out_dir)
    assert lic == {"file": "LICENSE", "sha256": sha256(ckpt / "LICENSE"), "size": 41, "title": "Apache License",
                   "name": "apache-2.0"}
    assert (out_dir / "LICENSE").read_bytes() == (ckpt / "LICENSE").read_bytes()

    lock = released.lock()
    lock["license"] = lic
    write_lock(out_dir, lock)
    card = model_card.render(lock)
    assert "names the licence: **apache-2.0**" in card and "included as `LICENSE` (Apache License)" in card
    (out_dir / "README.md").write_text(card)
    bundle = write_bundle(out_dir, lock)
    with tarfile.open(bundle["path"]) as tar:
        assert f"{TOP}/LICENSE" in tar.getnames()
    assert check_bundle(bundle["path"], run=False)[0] == []
    # A bundle whose lock names a licence file it does not carry fails the check.
    (out_dir / "LICENSE").write_text("changed\n")
    assert any(p.startswith("LICENSE: sha256 ") and p.endswith(f"does not match release.lock.json "
                                                                  f"({lic['sha256'][:12]})")
               for p in check_bundle(write_bundle(out_dir, lock)["path"], run=False)[0])


@pytest.mark.parametrize("text, expected", [
    ("---\nlicense: mit\n---\n", "mit"),
    ("---\nlicense: other\nlicense_name: llama3\n---\nbody", "other (llama3)"),
    ("---\nlicense: [mit, apache-2.0]\n---\n", "mit, apache-2.0"),
    ("# no front matter\nlicense: mit\n", None),
    ("---\nlicense: [unclosed\n---\n", None),
])
def test_front_matter_license(tmp_path, text, expected):
    from mlxbuild.release import front_matter_license

    (tmp_path / "README.md").write_text(text)
    assert front_matter_license(tmp_path / "README.md") == expected
