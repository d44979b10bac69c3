"""Which targets a build covers: `--target GLOB` and `--backend NAME`, each repeatable, and
`--shard I/N`.

A target is kept when its name matches one of the globs (the bare target name,
``mlx-*``, or the qualified ``qwen3-tiny/mlx-*``) and its backend is one of the
backends; an empty list keeps everything. Filtering happens before planning, so
the steps of the other targets are neither planned nor run (a shared upstream
step still runs once if a kept target needs it).

``--shard I/N`` then keeps the I-th of N deterministic shares of what is left, for a CI
matrix of N jobs. Targets that share a quantized model (same manifest, scheme and dtype)
stay in one share, so its quantize step runs in one job only; the groups go, largest
first, to the share with the fewest targets so far (ties to the lowest index). Steps that
shares still have in common (the weights, a baseline) run once where a remote cache is
configured: its write-once entries let the first job's result serve the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from mlxbuild.errors import UsageError


def parse_shard(text: str) -> tuple[int, int] | None:
    """``"2/3"`` -> (2, 3); empty -> None. Raises UsageError for anything else."""
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise UsageError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. --shard 2/3")
    return i, n


def shares(manifests: list[tuple[str, object]], n: int) -> list[list[tuple[str, str]]]:
    """The N shares of every (manifest path, target name): targets sharing a quantized model
    together, groups largest first to the share with the fewest targets."""
    groups: dict[tuple, list[tuple[str, str]]] = {}
    for path, m in manifests:
        for t in m.targets:
            key = (m.name, t.quantization or "", m.dtype_for(t))
            groups.setdefault(key, []).append((path, t.name))
    out: list[list[tuple[str, str]]] = [[] for _ in range(n)]
    for key in sorted(groups, key=lambda k: (-len(groups[k]), k)):
        smallest = min(range(n), key=lambda i: (len(out[i]), i))
        out[smallest].extend(groups[key])
    return out


@dataclass(frozen=True)
class TargetFilter:
    names: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()
    shard: tuple[int, int] | None = None

    def __bool__(self) -> bool:
        return bool(self.names or self.backends or self.shard)

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
        kept = manifests
        if self.names or self.backends:
            kept = [(path, m.model_copy(update={"targets": [t for t in m.targets if self.keeps(m.name, t)]}))
                    for path, m in manifests]
            if not any(m.targets for _, m in kept):
                known = ", ".join(f"{m.name}/{t.name} ({t.backend})" for _, m in manifests for t in m.targets)
                raise UsageError(f"{self.describe()} matches no target; the manifests have: {known}")
        if self.shard:
            mine = set(shares(kept, self.shard[1])[self.shard[0] - 1])
            # A share may be empty (more jobs than targets): that job builds nothing.
            kept = [(path, m.model_copy(update={"targets": [t for t in m.targets if (path, t.name) in mine]}))
                    for path, m in kept]
        return kept

    def describe(self) -> str:
        return " ".join([f"--target {g!r}" for g in self.names] + [f"--backend {b}" for b in self.backends]
                        + ([f"--shard {self.shard[0]}/{self.shard[1]}"] if self.shard else []))
