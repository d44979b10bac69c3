"""A real Ray cluster on loopback for tests and benchmarks: a head node that runs no steps
and worker nodes that behave like separate machines (each its own MLXBUILD_CACHE).

`running(root, env, workers=2)` starts it with the `ray` CLI beside this Python and yields
a `Cluster`; on exit the cluster's processes are stopped (`ray stop` stops every Ray
process of this user on the host: tests own the host's Ray while they run).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from s3server import free_ports


@dataclass
class Cluster:
    address: str
    caches: list[Path]
    env: dict = field(default_factory=dict)  # the environment its nodes were started with
    temp: Path | None = None

    def worker_pids(self, title: str) -> list[int]:
        """Ray worker processes whose title shows they run a task named ``title...``."""
        out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        rows = [line.split(None, 1) for line in out.splitlines()]
        return [int(r[0]) for r in rows if len(r) == 2 and r[1].startswith(f"ray::{title}")]


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


@contextlib.contextmanager
def running(root: Path, env: dict, workers: int = 2, memory_gb: float = 6.0):
    root = Path(root)
    # Ray's socket paths must stay short (108 bytes): its session folder lives under /tmp.
    temp = Path(tempfile.mkdtemp(prefix="rayt-", dir="/tmp"))
    (port,) = free_ports(1)
    env = {**env, "RAY_USAGE_STATS_ENABLED": "0"}
    address = f"127.0.0.1:{port}"
    log = open(root / "ray-start.log", "w")
    caches = []

    def start(*args, **extra):
        subprocess.run([_ray(), "start", *args], env={**env, **extra}, cwd=root, stdout=log,
                       stderr=subprocess.STDOUT, check=True, timeout=120)

    try:
        start("--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=0",
              "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats")
        for i in range(workers):
            cache = root / f"node-{i}" / "cache"
            cache.mkdir(parents=True)
            caches.append(cache)
            start(f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                  f"--memory={int(memory_gb * 2**30)}", f"--resources={json.dumps({f'node{i}': 1})}",
                  MLXBUILD_CACHE=str(cache), MLXBUILD_ARTIFACTS=str(root / f"node-{i}" / "artifacts"))
        _wait_for(address, env, workers)
        yield Cluster(address, caches, env, temp)
    finally:
        subprocess.run([_ray(), "stop", "--force"], env=env, stdout=log, stderr=subprocess.STDOUT,
                       timeout=120)
        log.close()


def _wait_for(address: str, env: dict, workers: int, timeout: float = 90) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR');"
             "print(int(ray.cluster_resources().get('CPU', 0)))")
    deadline = time.monotonic() + timeout
    while True:
        p = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True,
                           text=True, timeout=120)
        if p.returncode == 0 and p.stdout.strip() == str(workers):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray cluster at {address} did not come up with {workers} "
                               f"worker CPUs: {p.stdout[-500:]} {p.stderr[-1500:]}")
        time.sleep(1)
