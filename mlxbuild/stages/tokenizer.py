"""The tokenizer that travels with a manifest's artifacts: the checkpoint's (or the
manifest's ``model.tokenizer``) files copied unchanged, or, for a synthetic model, the
generated one (``mlxbuild.tokenizer``). Its own step, so a tokenizer edit re-packages the
artifacts without touching weights, exports or lowerings."""

from __future__ import annotations

import shutil
from pathlib import Path

from mlxbuild import tokenizer
from mlxbuild.steps import TokenizerParams


def run(params: TokenizerParams, cache, out: Path) -> dict:
    if params.synthetic is not None:
        names = tokenizer.write_synthetic(params.synthetic, out)
    else:
        for name, src in sorted(params.files.items()):
            shutil.copyfile(src, out / name)
        names = sorted(params.files)
    return {"files": names}
