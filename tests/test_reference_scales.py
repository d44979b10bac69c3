"""A backend that stores quantization scales rounded (XNNPACK keeps the scales of 4-bit
weights under dynamic int8 activations in bf16) is verified against a reference that
computes with the scales as stored, so verification measures its kernels."""

from __future__ import annotations

import torch

from buildlog import TINY_SOURCE
from test_dtype_per_target import _deps, _plan

MANIFEST = f"""\
name: scales
version: 0.1.0
model:
{TINY_SOURCE}  dtype: fp32
export: {{max_context_length: 32}}
quantization:
  8da4w: {{linear: {{bits: 4, group_size: 32, activations: int8_dynamic}}}}
  8da8w: {{linear: {{bits: 8, group_size: per_channel, activations: int8_dynamic}}}}
  4w: {{linear: {{bits: 4, group_size: 32}}}}
targets:
  - {{name: xnnpack-8da4w, backend: xnnpack, quantization: 8da4w}}
  - {{name: vulkan-8da4w, backend: vulkan, quantization: 8da4w}}
  - {{name: xnnpack-8da8w, backend: xnnpack, quantization: 8da8w}}
  - {{name: mlx-4w, backend: mlx, quantization: 4w}}
"""


def test_plan_gives_xnnpack_dynamic_int4_its_own_reference(tmp_path):
    steps = _plan(tmp_path, MANIFEST)
    ref = {t: _deps(steps, f"verify:scales/{t}", "reference")
           for t in ("xnnpack-8da4w", "vulkan-8da4w", "xnnpack-8da8w", "mlx-4w")}
    # one quantization of 8da4w, two references: XNNPACK's rounds the scales, Vulkan's
    # does not
    assert _deps(steps, ref["xnnpack-8da4w"], "quantize") == _deps(steps, ref["vulkan-8da4w"], "quantize")
    assert ref["xnnpack-8da4w"] != ref["vulkan-8da4w"]
    assert steps[ref["xnnpack-8da4w"]].params.scales == "bf16"
    assert ".bf16-scales." in ref["xnnpack-8da4w"]
    # schemes without 4-bit weights under dynamic activations keep the plain reference
    for t in ("vulkan-8da4w", "xnnpack-8da8w", "mlx-4w"):
        assert steps[ref[t]].params.scales is None, t


def _lowered_and_eager(round_scales: bool):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from mlxbuild.quantize import apply_scheme
    from mlxbuild.stages.reference import round_dynamic_int4_scales

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 128, bias=False), torch.nn.SiLU(),
                                torch.nn.Linear(128, 64, bias=False)).eval()
    apply_scheme(model, {"linear": {"bits": 4, "group_size": 32, "activations": "int8_dynamic"}})
    x = torch.randn(8, 512)
    program = to_edge_transform_and_lower(torch.export.export(model, (x,)),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    out = Runtime.get().load_program(program.buffer).load_method("forward").execute([x])[0]
    rounded = round_dynamic_int4_scales(model, "bf16") if round_scales else 0
    with torch.no_grad():
        eager = model(x)
    return out, eager, rounded


def test_reference_with_stored_scales_matches_xnnpack():
    out, eager, _ = _lowered_and_eager(round_scales=False)
    before = ((out - eager).abs().max() / eager.abs().max()).item()
    out, eager, rounded = _lowered_and_eager(round_scales=True)
    after = ((out - eager).abs().max() / eager.abs().max()).item()
    assert rounded == 2
    # fp32 scales in the eager model: the bf16 rounding shows; as stored: the kernels' own
    # float error only
    assert before > 1e-4, before
    assert after < 1e-5, after
