#!/usr/bin/env python
"""Verify a lowered XNNPACK text-generation artifact kept from an earlier build (a copy of its
cache: weights, quantize and lower entries) against a reference computed with today's code:
the logits part of the reference and verify stages (scales as XNNPACK stores them, the
precise pass, the comparison), without building again. For the 3B benchmark, whose whole
build takes most of an hour on 2 cores.

    python benchmarks/reverify_cache.py KEPT_CACHE OUT_DIR [--tol 0.05]

Prints the verification record's figures as JSON. A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tol", type=float, default=0.05)
    args = ap.parse_args()

    import backends
    from mlxbuild.cache import Cache
    from mlxbuild.families import text_generation
    from mlxbuild.stages.quantize import quantized_model
    from mlxbuild.stages.reference import round_dynamic_int4_scales

    (weights,), (quantized,) = ([p.name for p in (args.cache / kind).glob("*/*")] for kind in ("weights", "quantize"))
    (pte,) = (args.cache / "lower").glob("*/*/model.pte")
    model = quantized_model(Cache(args.cache), SimpleNamespace(weights=weights, quantized=quantized, dtype="fp32"))
    round_dynamic_int4_scales(model, backends.backend("xnnpack").REFERENCE_SCALES)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = text_generation.verify_spec(1024, 1024)
    text_generation.reference(model, {"max_context_length": 1024, **spec}, args.out)
    result = text_generation.verify(backends.open_program(pte, "xnnpack", ()), args.out, spec,
                                    {"max_rel_error": args.tol, "min_top1_agreement": 1.0})
    keys = ("passed", "reason", "max_rel_error", "allowed_rel_error", "precise_reference",
            "top1_agreement", "top1_agreement_decisive")
    print(json.dumps({k: result.get(k) for k in keys}, indent=1))


if __name__ == "__main__":
    main()
