"""Where the build keeps its cache and writes artifacts (relative to the working directory)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Roots:
    cache: Path
    artifacts: Path

    @property
    def doit_db(self) -> Path:
        return self.cache / "doit-db.json"

    @property
    def hash_state(self) -> Path:
        return self.cache / "file-hashes.json"


def roots() -> Roots:
    return Roots(cache=Path(os.environ.get("MLXBUILD_CACHE", ".mlxbuild")).absolute(),
                 artifacts=Path(os.environ.get("MLXBUILD_ARTIFACTS", "artifacts")).absolute())
