"""Run a plan's steps on a Ray cluster: ``doit build --executor ray[=ADDRESS]``.

doit still drives the build: it walks the same task graph, runs the same up-to-date
checks and its reporter prints the same progress lines and writes the same reports. Only
a step's action changes: instead of running the stage here, it submits the step as a Ray
task and waits for it (doit's thread runner, one waiting thread per running step, so the
driver stays a small process that never imports torch). A step starts once doit has seen
its inputs finish, so dependencies are cache keys, not object references.

Steps exchange their results through the content-addressed remote cache (the S3 tier,
``mlxbuild.remote``): a worker fetches the entries its step reads, builds, and pushes the
entry it made before the step counts as done, so workers need no shared filesystem; each
node keeps its own local cache (``MLXBUILD_CACHE`` in the environment ``ray start`` ran in).
Package steps run on the driver: it fetches the lowered program and its verification from
the remote cache and publishes them as a local build does, so the artifacts are the same
bytes.

Resources each Ray task asks for, from the plan: 1 CPU; the step's memory estimate
(``mlxbuild.memory``) as Ray's ``memory`` resource, so Ray never packs more estimated memory
onto a node than it has; and ``GPU: 1`` for the lower and verify steps of a backend that
needs a GPU host (``backends.<name>.NEEDS_GPU``: CUDA). A step no node can ever hold fails
before the build starts, naming it.

Faults: a worker (or its node) dying mid-step is retried, at most ``MAX_RETRIES`` times,
wherever Ray places it (each try says so on the terminal; the report counts attempts).
Nothing half-written reaches a cache: entries appear by rename on the worker and in the
remote cache only through their write-once markers. A step that failed on its own (a
crash in the stage, a failed verification) is not retried: it would fail again. If the
driver dies, its Ray tasks are cancelled with it; a rerun finds every finished step in the
remote cache.

Every node must run the same mlxbuild and toolchain as the driver (the plan's keys are the
driver's); a worker that does not refuses the step, naming what differs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mlxbuild.errors import UsageError
from mlxbuild.steps import StepKind

EXECUTOR_ENV = "MLXBUILD_EXECUTOR"
MODES = ("local", "ray", "auto")
MAX_RETRIES = 2  # tries after the first, for a step whose worker or node died
CONNECT_TIMEOUT = 5.0  # seconds to reach the cluster's address before calling it unreachable
GPU_STEPS = (StepKind.LOWER, StepKind.VERIFY)
# The driver's settings that change what a step does, passed to every worker (the cache
# and artifact folders and the remote's credentials are each node's own).
PASSED_ENV = ("MLXBUILD_STEP_PROCESS", "MLXBUILD_TRACEBACK", "MLXBUILD_DEBUG", "MLXBUILD_PLAIN",
              "MLXBUILD_REMOTE_CACHE_READONLY")


@dataclass(frozen=True)
class ExecutorSpec:
    mode: str = "local"  # local | ray | auto
    address: str | None = None  # a Ray cluster address (host:port, ray://host:port, auto)


def parse(text: str | None) -> ExecutorSpec:
    """``local``, ``ray``, ``ray=ADDRESS``, ``auto`` or ``auto=ADDRESS``."""
    text = (text or "local").strip()
    mode, _, address = text.partition("=")
    if mode not in MODES or (mode == "local" and address) or (_ and not address.strip()):
        raise UsageError(f"--executor {text!r}: expected local, ray[=ADDRESS] or auto[=ADDRESS]")
    return ExecutorSpec(mode, address.strip() or None)


class ClusterUnreachable(UsageError):
    pass


def start(spec: ExecutorSpec, plan) -> "RayExecutor | None":
    """The executor for ``spec``: None to build here. ``auto`` builds here (saying so) when
    no cluster answers; ``ray`` makes that an error."""
    if spec.mode == "local":
        return None
    if plan.remote_cache is None:
        if spec.mode == "auto":
            print("note: --executor auto: no remote cache is set, so building on this machine",
                  file=sys.stderr)
            return None
        raise UsageError("--executor ray: Ray workers exchange results through the remote cache; "
                         "set settings.remote_cache in the manifest or MLXBUILD_REMOTE_CACHE")
    try:
        return RayExecutor(spec.address, plan)
    except ClusterUnreachable as e:
        if spec.mode == "auto":
            print(f"note: --executor auto: {e}; building on this machine", file=sys.stderr)
            return None
        raise


@functools.lru_cache(maxsize=None)
def identity() -> str:
    """What a worker must share with the driver for the plan's keys to describe its bytes:
    the tool versions and the source of our packages."""
    from mlxbuild.fingerprint import stable_hash, tool_versions

    h = hashlib.sha256()
    for package in ("mlxbuild", "backends", "mlx_runtime"):
        root = Path(importlib.import_module(package).__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(f.relative_to(root.parent).as_posix().encode())
            h.update(f.read_bytes())
    return stable_hash(tool_versions(), sys.version_info[:2], h.hexdigest())


def _worker_versions() -> dict:
    from mlxbuild.fingerprint import tool_versions

    return {**tool_versions(), "python": "%d.%d" % sys.version_info[:2]}


def _run_on_worker(step, plan, expected: str, versions: dict):
    """A Ray task: one step on this node, its entry pushed to the remote cache.
    Returns (run_step's result, where it ran)."""
    import ray

    from mlxbuild import remote, settings, tasks
    from mlxbuild.cache import Cache

    began = time.time()
    where = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"
    if identity() != expected:
        mine = _worker_versions()
        differ = [f"{k} {mine.get(k)} here, {v} on the driver" for k, v in versions.items()
                  if mine.get(k) != v] or ["mlxbuild's source files"]
        return tasks.StepFailed(f"{step.kind} {step.label}: the Ray worker on {where} runs other code "
                                f"than the driver ({'; '.join(differ)}); install the same mlxbuild "
                                "and requirements/lock.txt on every node"), where
    if step.kind in GPU_STEPS:
        import backends
        from backends.errors import BackendError

        try:
            backends.preflight(step.params.backend)
        except BackendError as e:
            return tasks.StepFailed(f"{step.kind} {step.label}: on {where}: {e}"), where
    # A worker process outlives its tasks: what its remote connection remembered missing
    # then may have been pushed since by another node.
    connection = remote.connect(plan.remote_cache)
    if connection is not None:
        connection.forget()
    roots = settings.roots()
    result = tasks.run_step(step, roots, plan)
    if tasks.succeeded(result):
        cache = Cache(roots.cache, remote=remote.connect(plan.remote_cache))
        if not cache.remote_has(step.kind, step.key):
            # (a local hit on this node, made by an earlier build that could not upload it)
            sent = remote.push_entry(cache, step.kind, step.key)
            if isinstance(result, dict) and sent:
                result["remote_up_bytes"] = sent
        if not cache.remote_has(step.kind, step.key):
            return tasks.StepFailed(f"{step.kind} {step.label}: built on {where}, but the remote cache "
                                    f"{plan.remote_cache} did not take the entry, so no other machine "
                                    "can read it (see the worker's log for the remote's warning)"), where
        if isinstance(result, dict):
            result["task_began"] = began  # (the driver counts the distribution's cost from it)
    return result, where


class RayExecutor:
    def __init__(self, address: str | None, plan):
        import logging

        address = address or os.environ.get("RAY_ADDRESS") or "auto"
        _reachable(address)
        try:
            import ray
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install 'ray[default]' "
                             "(requirements/lock.txt has the tested version)") from None
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR,
                     namespace="mlxbuild", runtime_env={"env_vars": env} if env else None)
        except Exception as e:  # ConnectionError, a refused or timed-out GCS, a version mismatch
            raise ClusterUnreachable(f"cannot reach a Ray cluster at {address}: "
                                     f"{_first_line(e)}") from None
        self.ray, self.plan, self.address = ray, plan, address
        self._check_resources(plan)
        self._identity, self._versions = identity(), _worker_versions()
        self._plan_ref = ray.put(plan)
        self._task = ray.remote(_run_on_worker)
        self._running: dict[int, object] = {}
        self._lock = threading.Lock()

    # -- what doit runs for each step
    def run(self, step, roots, plan):
        from mlxbuild import remote, tasks
        from mlxbuild.cache import Cache
        from mlxbuild.errors import MlxbuildError

        cache = Cache(roots.cache, remote=remote.connect(plan.remote_cache))
        if step.kind is StepKind.PACKAGE:
            # The driver publishes: what the package reads comes down from the remote cache.
            try:
                tasks.make_inputs(plan, step, roots, cache)
            except MlxbuildError as e:
                return tasks.StepFailed(f"{step.kind} {step.label}: {e}")
            return tasks.run_step(step, roots, plan)
        if cache.remote_has(step.kind, step.key):
            # Finished by an earlier build (or another machine): whoever reads it fetches it.
            return {"cache": "remote"}
        last = None
        for attempt in range(1 + MAX_RETRIES):
            ref = self._task.options(name=f"{step.kind} {step.label}", max_retries=0,
                                     retry_exceptions=False, **self.resources(step)).remote(
                step, self._plan_ref, self._identity, self._versions)
            with self._lock:
                self._running[id(ref)] = ref
            try:
                result, where = self.ray.get(ref)
            except self.ray.exceptions.TaskCancelledError:
                return tasks.StepFailed(f"{step.kind} {step.label}: cancelled")
            except (self.ray.exceptions.WorkerCrashedError, self.ray.exceptions.NodeDiedError,
                    self.ray.exceptions.OutOfMemoryError, self.ray.exceptions.ObjectLostError,
                    self.ray.exceptions.LocalRayletDiedError) as e:
                last = _first_line(e)
                if attempt < MAX_RETRIES:
                    _say(f"   {step.kind} {step.label}: its Ray worker died ({last}); "
                         f"retrying ({attempt + 2} of {1 + MAX_RETRIES})")
                continue
            except self.ray.exceptions.RayError as e:
                return tasks.StepFailed(f"{step.kind} {step.label}: Ray: {_first_line(e)}")
            finally:
                with self._lock:
                    self._running.pop(id(ref), None)
            if tasks.succeeded(result):
                got = time.time()
                connection = remote.connect(plan.remote_cache)
                if connection is not None:
                    connection.forget()  # its miss for this entry, remembered before the step ran
                figures = result if isinstance(result, dict) else {}
                figures.update(node=where, attempts=attempt + 1)
                began = figures.pop("task_began", None)
                if began is not None and figures.get("work_s") is not None:
                    # What distributing the step cost, beside its work: fetching its inputs
                    # from the remote cache, pushing its entry, the checks, the reply (not the
                    # wait for a free worker, which a local build has too).
                    figures["overhead_s"] = round(max(0.0, got - began - figures["work_s"]), 3)
                return figures
            return result
        return tasks.StepFailed(f"{step.kind} {step.label}: its Ray worker died {1 + MAX_RETRIES} times "
                                f"(the first try and {MAX_RETRIES} retries); last: {last}")

    def resources(self, step) -> dict:
        import backends

        asked = {"num_cpus": 1}
        if step.memory > 0:
            asked["memory"] = int(step.memory)
        backend = getattr(step.params, "backend", None)
        if step.kind in GPU_STEPS and backend and getattr(backends.backend(backend), "NEEDS_GPU", False):
            asked["num_gpus"] = 1
        return asked

    def slots(self) -> int:
        """doit threads: enough that Ray, not doit, decides how many steps run at once."""
        return max(2, min(256, len(self.plan.steps)))

    def cancel(self) -> None:
        with self._lock:
            refs = list(self._running.values())
        for ref in refs:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:
                pass

    def shutdown(self) -> None:
        self.cancel()
        self.ray.shutdown()  # disconnects this driver; the cluster keeps running

    # -- before any step
    def _check_resources(self, plan) -> None:
        from mlxbuild.memory import shown

        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        if not any(r.get("CPU", 0) >= 1 for r in nodes):
            raise UsageError(f"the Ray cluster at {self.address} has no node with a CPU to run steps on")
        for step in plan.steps.values():
            if step.kind is StepKind.PACKAGE:
                continue
            need = self.resources(step)
            fits = [r for r in nodes if r.get("CPU", 0) >= need["num_cpus"]
                    and r.get("GPU", 0) >= need.get("num_gpus", 0)]
            if need.get("num_gpus") and not fits:
                raise UsageError(f"{step.kind} {step.label}: needs a GPU node, and the Ray cluster at "
                                 f"{self.address} has none")
            largest = max((r.get("memory", 0) for r in fits), default=0)
            if need.get("memory", 0) > largest:
                raise UsageError(f"{step.kind} {step.label}: needs an estimated {shown(need['memory'])}, "
                                 f"more than any Ray node offers (largest: {shown(largest)})")


def _reachable(address: str) -> None:
    """Fail fast on a host:port nothing answers at (Ray itself retries for a minute)."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or address, int(port or 6379)), timeout=CONNECT_TIMEOUT).close()
    except (OSError, ValueError) as e:
        raise ClusterUnreachable(f"cannot reach a Ray cluster at {address}: "
                                 f"{getattr(e, 'strerror', None) or e}") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _say(text: str) -> None:
    # doit swaps sys.stderr for a capture buffer around actions; this is the driver's own line.
    print(text, file=sys.__stderr__, flush=True)
