"""Which targets a build covers: `--target GLOB` and `--backend NAME`, each repeatable.

A target is kept when its name matches one of the globs (the bare target name,
``mlx-*``, or the qualified ``qwen3-tiny/mlx-*``) and its backend is one of the
backends; an empty list keeps everything. Filtering happens before planning, so
the steps of the other targets are neither planned nor run (a shared upstream
step still runs once if a kept target needs it).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from mlxbuild.errors import UsageError


@dataclass(frozen=True)
class TargetFilter:
    names: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.names or self.backends)

    def keeps(self, manifest_name: str, target) -> bool:
        qualified = f"{manifest_name}/{target.name}"
        name_ok = not self.names or any(
            fnmatchcase(target.name, g) or fnmatchcase(qualified, g) for g in self.names)
        return name_ok and (not self.backends or target.backend in self.backends)

    def apply(self, manifests: list[tuple[str, object]]) -> list[tuple[str, object]]:
        """(path, manifest) pairs with only the kept targets; a filter that keeps nothing
        anywhere is a usage error (one line)."""
        if not self:
            return manifests
        kept = [(path, m.model_copy(update={"targets": [t for t in m.targets if self.keeps(m.name, t)]}))
                for path, m in manifests]
        if not any(m.targets for _, m in kept):
            known = ", ".join(f"{m.name}/{t.name} ({t.backend})" for _, m in manifests for t in m.targets)
            raise UsageError(f"{self.describe()} matches no target; the manifests have: {known}")
        return kept

    def describe(self) -> str:
        return " ".join([f"--target {g!r}" for g in self.names] + [f"--backend {b}" for b in self.backends])
