"""`mlxbuild cache gc` on both tiers: entries made through the real Cache (and pushed to a
real S3 server, SeaweedFS), aged by their markers' times, then collected by the command.
The end-to-end case on a real release is in tests/test_release.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from s3server import BUCKET

from mlxbuild.cache import COMPLETE, Cache
from mlxbuild.cli import main
from mlxbuild import remote as remote_mod

DAY = 86400


def _entry(cache: Cache, kind: str, key: str, size: int, age_days: float) -> None:
    with cache.writing(kind, key) as out:
        (out / "data.bin").write_bytes(os.urandom(size))
    t = time.time() - age_days * DAY
    os.utime(cache.path(kind, key) / COMPLETE, (t, t))


def _lock(path: Path, keys: dict[str, str]) -> Path:
    """A release lock in the form mlxbuild.lock writes (targets → inputs → keys)."""
    path.write_text(json.dumps({"format": 1, "targets": {"mlx-4w": {"inputs": {"keys": keys}}}}))
    return path


def _present(cache: Cache) -> set[str]:
    return {f"{p.parent.parent.name}/{p.name}" for p in cache.root.glob("*/*/*") if (p / COMPLETE).exists()}


def _gc(*args) -> int:
    return main(["cache", "gc", *map(str, args)])


def test_local_gc_by_age_size_and_references(tmp_path, capsys):
    cache = Cache(tmp_path / "cache")
    _entry(cache, "export", "a" * 64, 1000, age_days=40)   # old, referenced by the lock
    _entry(cache, "lower", "b" * 64, 1000, age_days=40)    # old: goes
    _entry(cache, "lower", "c" * 64, 3000, age_days=5)     # recent, least recently used of the recent
    _entry(cache, "verify", "d" * 64, 2000, age_days=1)    # recent
    lock = _lock(tmp_path / "release.lock.json", {"export": "a" * 64})

    assert _gc("--cache", cache.root, "--keep", lock, "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"  would remove lower/{'b' * 12}" in out and "unused for 40 days" in out
    assert len(_present(cache)) == 4  # a dry run removes nothing

    assert _gc("--cache", cache.root, "--keep", lock) == 0
    assert _present(cache) == {f"export/{'a' * 64}", f"lower/{'c' * 64}", f"verify/{'d' * 64}"}
    assert "removed 1 entries" in capsys.readouterr().out

    # Over the size limit: the least recently used unreferenced entry goes first.
    assert _gc("--cache", cache.root, "--keep", lock, "--max-size", "3500B") == 0
    assert _present(cache) == {f"export/{'a' * 64}", f"verify/{'d' * 64}"}
    # Reading an entry makes it recent again: its marker's time is the last use.
    cache.read("verify", "d" * 64)
    assert _gc("--cache", cache.root, "--keep", lock, "--older-than", "0.5") == 0
    assert f"verify/{'d' * 64}" in _present(cache)


def test_an_entry_a_build_holds_is_skipped(tmp_path, capsys):
    cache = Cache(tmp_path / "cache")
    _entry(cache, "lower", "e" * 64, 100, age_days=90)
    with cache.lock("lower", "e" * 64):  # a build repairing it now
        assert _gc("--cache", cache.root, "--keep", _lock(tmp_path / "l.json", {"x": "y"})) == 0
    assert f"lower/{'e' * 64}" in _present(cache)
    assert f"skipped lower/{'e' * 12}: a build is using it" in capsys.readouterr().out


def test_bad_keep_and_size_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "notes.json").write_text('{"hello": 1}')
    assert _gc("--cache", tmp_path, "--keep", tmp_path / "notes.json") == 2
    assert _gc("--cache", tmp_path, "--keep", tmp_path / "missing.json") == 2
    assert _gc("--cache", tmp_path, "--max-size", "lots") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: --keep {tmp_path / 'notes.json'}: names no step keys (not a release lock, a published "
        "record or a build report)",
        f"error: --keep {tmp_path / 'missing.json'}: no such file or folder",
        "error: --max-size lots: 'lots': expected a size such as 12G, 800M or 75%"]


def test_remote_gc_keeps_what_a_lock_references(s3, tmp_path, monkeypatch, capsys):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{BUCKET}/gc"
    cache = Cache(tmp_path / "cache", remote=remote_mod.connect(url))
    for kind, ch in (("export", "1"), ("lower", "2"), ("verify", "3")):
        _entry(cache, kind, ch * 64, 500, age_days=0)
        assert cache.push(kind, ch * 64) is not None
    # An archive whose upload never got its marker (a killed uploader), long ago: junk.
    s3.client().put_object(Bucket=BUCKET, Key=f"gc/v1/lower/{'4' * 64}/{'f' * 64}.tar", Body=b"x")
    lock = _lock(tmp_path / "release.lock.json", {"lower": "2" * 64})

    # Nothing on the remote is old yet: only the marker-less archive is younger than a day too.
    assert _gc("--remote-only", "--remote", url, "--keep", lock) == 0
    assert len([k for k in s3.keys("gc/") if k.endswith("entry.json")]) == 3

    assert _gc("--remote-only", "--remote", url, "--keep", lock, "--older-than", "0", "--dry-run") == 0
    assert len([k for k in s3.keys("gc/") if k.endswith("entry.json")]) == 3
    assert _gc("--remote-only", "--remote", url, "--keep", lock, "--older-than", "0") == 0
    left = s3.keys("gc/")
    assert {k.split("/")[3] for k in left} == {"2" * 64, "4" * 64}  # the referenced one, and the young junk
    marker = json.loads(s3.get(f"gc/v1/lower/{'2' * 64}/entry.json"))
    assert f"gc/v1/lower/{'2' * 64}/{marker['archive']}" in left
    assert "remote cache s3://mlxbuild-ci/gc: removed 2 entries" in capsys.readouterr().out
    # The local tier was not touched (--remote-only).
    assert len(_present(cache)) == 3


def test_remote_gc_without_a_remote_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLXBUILD_REMOTE_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert _gc("--remote-only", "--cache", tmp_path) == 2
    assert capsys.readouterr().err.startswith("error: --remote: no remote cache is set")
