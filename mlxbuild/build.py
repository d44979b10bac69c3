"""Read manifests and plan them together, so shared steps appear once."""

from __future__ import annotations

import backends
from backends.errors import BackendError
from mlxbuild.errors import BuildError
from mlxbuild.fingerprint import FileHasher
from mlxbuild import lock, toolchain
from mlxbuild.manifest import load_manifest
from mlxbuild.plan import Plan, plan_manifest
from mlxbuild.selection import TargetFilter
from mlxbuild.settings import Roots, remote_cache


def plan_manifests(paths, roots: Roots, select: TargetFilter | None = None,
                   measure_speed: bool = False, gpu_elsewhere: bool = False) -> Plan:
    """``gpu_elsewhere``: the steps run on other hosts (a Ray cluster), so a backend that
    needs a GPU host (``NEEDS_GPU``) is checked there, not here."""
    toolchain.check()  # a version known to break refuses the build before any step
    from mlxbuild import child

    child.mode()  # a bad MLXBUILD_STEP_PROCESS is a usage error before any step
    from mlxbuild import memory

    try:
        memory.budget()  # ... and so is a bad MLXBUILD_MEMORY_BUDGET
    except ValueError as e:
        from mlxbuild.errors import UsageError

        raise UsageError(f"{memory.BUDGET_ENV}: {e}") from None
    manifests = [(p, load_manifest(p)) for p in paths]  # every manifest valid before any work
    remote = remote_cache([m for _, m in manifests])  # a bad URL is an error before any work
    if select:  # --target / --backend: the other targets are not planned at all
        manifests = select.apply(manifests)
    preflight({t.backend for _, m in manifests for t in m.targets}, gpu_elsewhere)
    hasher = FileHasher(roots.hash_state)
    plan = Plan()
    plan.remote_cache = remote
    for path, manifest in manifests:
        plan.groups[path] = plan_manifest(manifest, plan, hasher, roots.artifacts, measure_speed)
    hasher.save()
    memory.annotate(plan)
    # A released version is immutable: refuse changed inputs now, before any work.
    lock.check_plan(plan)
    return plan


def preflight(names, gpu_elsewhere: bool = False) -> None:
    """Each backend that cannot lower on this host says so now, not after hours of quantizing."""
    for backend in sorted(names):
        if gpu_elsewhere and getattr(backends.backend(backend), "NEEDS_GPU", False):
            continue
        try:
            backends.preflight(backend)
        except BackendError as e:
            raise BuildError(str(e)) from None
