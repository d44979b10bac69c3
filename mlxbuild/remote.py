"""A shared remote tier for the cache: entries as tar archives in an S3-compatible bucket.

Layout under ``s3://bucket/prefix/``::

    v1/<kind>/<key>/<sha256>.tar    the entry's files, one deterministic tar
    v1/<kind>/<key>/entry.json      written last: names the archive, its sha256 and size

A reader trusts an entry only through its ``entry.json``, and only after the
archive it names hashes to the sha256 it records, so a half-uploaded archive
(no marker yet), a truncated or corrupted object, or a marker whose archive is
gone is a miss, never a bad entry. Two machines writing the same entry at once
each upload their archive under its own content-derived name, then create the
marker with ``If-None-Match: *``: the first marker stays, and each marker only
ever names an archive that was complete before it was written.

The remote must never fail a build: the first network or permission error
prints one warning and turns the remote off for the rest of the process.
Endpoint and credentials come from the standard AWS environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``AWS_REGION``, ...), read by boto3; boto3 is imported only
when a build first needs the remote, so a no-op build never loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FORMAT = 1
LAYOUT = f"v{FORMAT}"
MARKER = "entry.json"
SKIP = {".complete"}  # the local completion flag, recreated by Cache.writing

# Short timeouts: a remote that does not answer quickly is treated as absent.
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 30.0
ATTEMPTS = 2

# S3 bucket names: 3-63 lowercase letters, digits, dots and hyphens, alphanumeric at both ends.
URL_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^?#\s]*)?$"
_URL_RE = re.compile(URL_PATTERN)
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_CONFLICT_CODES = ("PreconditionFailed", "ConditionalRequestConflict")


@dataclass(frozen=True)
class RemoteUrl:
    bucket: str
    prefix: str  # no leading or trailing slash; may be empty

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def parse_url(text: str) -> RemoteUrl:
    """``s3://bucket[/prefix]`` → RemoteUrl; ValueError with a one-line reason otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("expected an s3://bucket[/prefix] URL")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme != "s3":
        raise ValueError(f"{text!r} is not an s3:// URL; expected s3://bucket[/prefix]")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"{bucket!r} is not a valid bucket name; expected 3-63 lowercase letters, "
                         "digits, '.' and '-', starting and ending with a letter or digit")
    if any(c in prefix for c in "?#") or any(c.isspace() for c in prefix):
        raise ValueError(f"{text!r}: the prefix may not contain '?', '#' or spaces")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"{text!r}: the prefix may not contain '.' or '..' segments")
    return RemoteUrl(bucket, "/".join(parts))


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class RemoteError(Exception):
    """A housekeeping call (listing, deleting) failed: for `mlxbuild cache gc`, an error."""


class _Unavailable(Exception):
    """The remote cannot be used (network, permissions, missing bucket)."""


class _Invalid(Exception):
    """One remote entry is not usable (bad marker, missing or corrupt archive)."""


class _NotFound(Exception):
    """The object does not exist (a plain miss)."""


class _Conflict(Exception):
    """A conditional write found the object already there."""


@dataclass
class Transfer:
    """What a fetch or push moved, for the step's note."""

    size: int
    seconds: float


class RemoteCache:
    """One bucket prefix. Methods never raise for remote trouble: they warn and report a miss."""

    def __init__(self, url: RemoteUrl, read_only: bool = False):
        self.url = url
        self.read_only = read_only
        self._client = None
        self._client_pid = 0
        self._down: str | None = None  # why the remote was turned off, once it was
        self._markers: dict[tuple[str, str], dict | None] = {}
        self._suspect: set[tuple[str, str]] = set()  # entries found bad here; overwrite them

    @property
    def available(self) -> bool:
        """False once a failure turned the remote off for this process."""
        return self._down is None

    def forget(self) -> None:
        """Drop what lookups remembered (a long-lived process that wants fresh answers)."""
        self._markers.clear()

    # -- object names

    def _object(self, kind: str, key: str, name: str) -> str:
        parts = [self.url.prefix, LAYOUT, kind, key, name]
        return "/".join(p for p in parts if p)

    # -- reading

    def has(self, kind: str, key: str) -> bool:
        """Whether a complete entry is announced (one small GET, remembered for the process)."""
        return self._marker(kind, key) is not None

    def fetch(self, kind: str, key: str, dest: Path, scratch: Path) -> Transfer | None:
        """Download, check and unpack the entry into ``dest``.

        None on a miss or a bad entry, when ``dest`` may hold part of it: discard it.
        """
        marker = self._marker(kind, key)
        if marker is None:
            return None
        start = time.monotonic()
        archive = _temp_file(scratch, "fetch-")
        try:
            self._download(self._object(kind, key, marker["archive"]), archive, marker)
            _unpack(archive, dest, marker["files"])
        except _Invalid as e:
            self._discard(kind, key, str(e))
            return None
        except _Unavailable as e:
            self._turn_off(str(e))
            return None
        except OSError as e:  # this machine's disk, not the remote: build the step instead
            warn(f"could not unpack {kind}/{key[:12]} from {self.url} ({e}); building it locally")
            return None
        finally:
            archive.unlink(missing_ok=True)
        return Transfer(marker["size"], time.monotonic() - start)

    def _marker(self, kind: str, key: str) -> dict | None:
        if self._down is not None:
            return None
        if (kind, key) in self._markers:
            return self._markers[(kind, key)]
        marker = None
        try:
            raw = self._get_small(self._object(kind, key, MARKER))
            if raw is not None:
                marker = _check_marker(raw, kind, key)
        except _Invalid as e:
            self._discard(kind, key, str(e))
        except _Unavailable as e:
            self._turn_off(str(e))
        self._markers[(kind, key)] = marker
        return marker

    def _discard(self, kind: str, key: str, why: str) -> None:
        warn(f"remote cache entry {kind}/{key[:12]} in {self.url} is unusable ({why}); "
             "discarded, building it locally")
        self._markers[(kind, key)] = None
        self._suspect.add((kind, key))

    # -- writing

    def push(self, kind: str, key: str, entry: Path, scratch: Path) -> Transfer | None:
        """Upload a finished local entry unless the remote already has a good one."""
        if self._down is not None or self.read_only:
            return None
        overwrite = (kind, key) in self._suspect
        if not overwrite and self.has(kind, key):
            return None
        if self._down is not None:
            return None
        start = time.monotonic()
        archive = _temp_file(scratch, "push-")
        try:
            digest, size, files = _pack(entry, archive)
            name = f"{digest}.tar"
            self._upload_file(archive, self._object(kind, key, name))
            marker = {"format": FORMAT, "kind": kind, "key": key, "archive": name,
                      "sha256": digest, "size": size, "files": files,
                      "host": socket.gethostname(), "created": time.time()}
            body = json.dumps(marker, indent=1, sort_keys=True).encode()
            won = self._put_marker(self._object(kind, key, MARKER), body, overwrite)
            if not won:
                # Another machine announced this entry first; keep theirs and drop our
                # archive unless it is the very object their marker names.
                theirs = self._get_small(self._object(kind, key, MARKER))
                if theirs is None or f'"{name}"' not in theirs.decode("utf-8", "replace"):
                    self._delete(self._object(kind, key, name))
                self._markers.pop((kind, key), None)
                return None
        except _Unavailable as e:
            self._turn_off(str(e))
            return None
        except OSError as e:  # packing on this machine failed: the build itself is fine
            warn(f"could not upload {kind}/{key[:12]} to {self.url} ({e})")
            return None
        finally:
            archive.unlink(missing_ok=True)
        self._markers[(kind, key)] = marker
        self._suspect.discard((kind, key))
        return Transfer(size, time.monotonic() - start)

    # -- the S3 calls, with every failure mapped to _Unavailable or a miss

    def _s3(self):
        if self._client is not None and self._client_pid != os.getpid():
            self._client = None  # clients do not survive a fork (doit -n N workers)
        if self._client is None:
            self._client_pid = os.getpid()
            try:
                import boto3
                from botocore.config import Config
            except ImportError as e:  # a broken install must not fail the build either
                raise _Unavailable(f"boto3 is not installed ({e})") from None
            config = Config(connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                            retries={"total_max_attempts": ATTEMPTS, "mode": "standard"})
            try:
                self._client = boto3.session.Session().client("s3", config=config)
            except Exception as e:  # bad AWS_* settings, unknown profile, ...
                raise _Unavailable(_reason(e)) from None
        return self._client

    def _call(self, op: str, **kwargs):
        try:
            return getattr(self._s3(), op)(Bucket=self.url.bucket, **kwargs)
        except _Unavailable:
            raise
        except Exception as e:
            if _status(e) == 404 and _code(e) != "NoSuchBucket":
                raise _NotFound() from None
            if _status(e) == 412 or _code(e) in _CONFLICT_CODES:
                raise _Conflict() from None
            raise _Unavailable(_reason(e)) from None

    def _get_small(self, name: str) -> bytes | None:
        try:
            return self._call("get_object", Key=name)["Body"].read()
        except _NotFound:
            return None
        except (OSError, ValueError) as e:
            raise _Unavailable(_reason(e)) from None

    def _download(self, name: str, dest: Path, marker: dict) -> None:
        digest = hashlib.sha256()
        size = 0
        try:
            body = self._call("get_object", Key=name)["Body"]
            with open(dest, "wb") as f:
                for chunk in body.iter_chunks(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
        except _NotFound:
            raise _Invalid(f"its archive {marker['archive']} is missing") from None
        except _Unavailable:
            raise
        except Exception as e:  # a connection dropped mid-body
            raise _Unavailable(_reason(e)) from None
        if size != marker["size"] or digest.hexdigest() != marker["sha256"]:
            raise _Invalid(f"archive is {size} bytes with sha256 {digest.hexdigest()[:12]}, "
                           f"expected {marker['size']} bytes with sha256 {marker['sha256'][:12]}")

    def _upload_file(self, path: Path, name: str) -> None:
        try:
            self._s3().upload_file(str(path), self.url.bucket, name)
        except _Unavailable:
            raise
        except Exception as e:
            raise _Unavailable(_reason(e)) from None

    def _put_marker(self, name: str, body: bytes, overwrite: bool) -> bool:
        """Create the marker; False if another writer's marker is already there."""
        if not overwrite:
            try:
                self._call("put_object", Key=name, Body=body, IfNoneMatch="*",
                           ContentType="application/json")
                return True
            except _Conflict:
                return False
            except _Unavailable as e:
                if "NotImplemented" not in str(e):
                    raise
                # A store without conditional writes: last writer wins, which is still
                # safe since every marker names an archive that was complete before it.
        self._call("put_object", Key=name, Body=body, ContentType="application/json")
        return True

    def _delete(self, name: str) -> None:
        try:
            self._call("delete_object", Key=name)
        except (_NotFound, _Conflict, _Unavailable):
            pass  # an orphan archive only costs storage

    # -- housekeeping (`mlxbuild cache gc`): here a remote failure is an error, not a miss

    def objects(self) -> list[tuple[str, str, str, int, float]]:
        """(kind, key, name, size, modified epoch seconds) of every object of this layout."""
        top = "/".join(p for p in (self.url.prefix, LAYOUT) if p) + "/"
        found = []
        try:
            pages = self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.url.bucket, Prefix=top)
            for page in pages:
                for o in page.get("Contents", []):
                    parts = o["Key"][len(top):].split("/")
                    if len(parts) == 3:
                        found.append((parts[0], parts[1], parts[2], int(o["Size"]),
                                      o["LastModified"].timestamp()))
        except _Unavailable as e:
            raise RemoteError(f"remote cache {self.url}: {e}") from None
        except Exception as e:
            raise RemoteError(f"remote cache {self.url}: cannot list it ({_reason(e)})") from None
        return found

    def delete_entry(self, kind: str, key: str, names: list[str]) -> None:
        """Remove an entry: its marker first, so no reader ever sees a marker without its archive."""
        ordered = sorted(names, key=lambda n: n != MARKER)
        for name in ordered:
            try:
                self._call("delete_object", Key=self._object(kind, key, name))
            except _NotFound:
                pass
            except (_Unavailable, _Conflict) as e:
                raise RemoteError(f"remote cache {self.url}: cannot delete {kind}/{key[:12]}/{name} "
                                  f"({e})") from None
        self._markers.pop((kind, key), None)

    def _turn_off(self, why: str) -> None:
        if self._down is None:
            self._down = why
            warn(f"remote cache {self.url} unavailable ({why}); building locally without it")


def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _code(e: Exception) -> str:
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _reason(e: Exception) -> str:
    code = _code(e)
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if code and code not in text:
        text = f"{code}: {text}"
    return text[:300]


def _check_marker(raw: bytes, kind: str, key: str) -> dict:
    try:
        m = json.loads(raw)
    except ValueError:
        raise _Invalid("its entry.json is not valid JSON") from None
    ok = (isinstance(m, dict) and m.get("format") == FORMAT and m.get("kind") == kind
          and m.get("key") == key and isinstance(m.get("sha256"), str)
          and _SHA_RE.fullmatch(m["sha256"]) and m.get("archive") == f"{m['sha256']}.tar"
          and isinstance(m.get("size"), int) and m["size"] >= 0
          and isinstance(m.get("files"), dict))
    if not ok:
        raise _Invalid("its entry.json does not describe this entry")
    return m


# --------------------------------------------------------------------------- archives


def _temp_file(directory: Path, prefix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tar", dir=directory)
    os.close(fd)
    return Path(name)


class _HashingWriter:
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, f):
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)


def _pack(entry: Path, dest: Path) -> tuple[str, int, dict[str, int]]:
    """A deterministic tar of ``entry`` (sorted, no owners or times): (sha256, size, files)."""
    files: dict[str, int] = {}
    with open(dest, "wb") as f:
        out = _HashingWriter(f)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(entry.rglob("*")):
                rel = path.relative_to(entry).as_posix()
                if rel in SKIP:
                    continue
                info = tarfile.TarInfo(rel)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if path.is_dir():
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                    continue
                info.size = path.stat().st_size  # symlinks are stored as the file they point to
                info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
                with open(path, "rb") as src:
                    tar.addfile(info, src)
                files[rel] = info.size
    return out.digest.hexdigest(), out.size, files


def _unpack(archive: Path, dest: Path, files: dict) -> None:
    try:
        with tarfile.open(archive, mode="r:") as tar:
            # The 'data' filter refuses absolute paths, links out of dest and special files.
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise _Invalid(f"archive does not unpack: {e}") from None
    got = {p.relative_to(dest).as_posix(): p.stat().st_size for p in dest.rglob("*") if p.is_file()}
    if got != {k: v for k, v in files.items()}:
        raise _Invalid("archive contents differ from its entry.json")


# --------------------------------------------------------------------------- per process


_connections: dict[tuple[str, bool], RemoteCache] = {}


def connect(url: str | None) -> RemoteCache | None:
    """The process's one RemoteCache for ``url`` (so a warning is printed once), or None."""
    if not url:
        return None
    read_only = os.environ.get("MLXBUILD_REMOTE_CACHE_READONLY", "") not in ("", "0")
    k = (url, read_only)
    if k not in _connections:
        _connections[k] = RemoteCache(parse_url(url), read_only=read_only)
    return _connections[k]


# --------------------------------------------------------------------------- a step's view


def fetch_entry(cache, kind: str, key: str) -> int | None:
    """Try the cache's remote tier for a missing entry; say in the step's notes what happened.
    The bytes downloaded, or None when it was not there."""
    from mlxbuild import progress

    if cache.remote is None:
        return None
    got = cache.fetch(kind, key)
    if got is not None:
        progress.note(f"downloaded from remote cache ({_mb(got.size)} in {got.seconds:.1f} s)")
        return got.size
    if cache.remote.available:
        progress.note("not in remote cache; building")
    return None


def push_entry(cache, kind: str, key: str) -> int:
    """Upload an entry this machine built; the bytes sent (0: none, or another got there first)."""
    from mlxbuild import progress

    if cache.remote is None:
        return 0
    sent = cache.push(kind, key)
    if sent is not None:
        progress.note(f"uploaded to remote cache ({_mb(sent.size)} in {sent.seconds:.1f} s)")
        return sent.size
    return 0


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
