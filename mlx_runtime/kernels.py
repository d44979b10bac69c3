"""ExecuTorch's own custom Metal kernels, computed with mlx ops where there is no Metal.

A ``MetalKernelNode`` carries a kernel's Metal source, which only an Apple GPU can run.
The kernels below are recognised by name and by the sha256 of their header and source as
ExecuTorch 1.5.1 emits them; each is computed with the same math in mlx ops (what the
kernel's own eager reference in ExecuTorch computes), so programs that use them are
verified on Linux. A kernel whose name or source differs is not recognised: it keeps
failing with the node named (``nodes/control.py``), never run as something else.

- ``tq_norm``, ``tq4_compress``, ``tq_dequant``: the TurboQuant KV cache
  (``executorch.backends.mlx.custom_kernel_ops``): per-vector L2 norm (accumulated in
  fp32), bucketize against 15 boundaries and nibble-pack (high nibble the even element),
  and unpack + codebook lookup times the vector's norm.
- ``gated_delta_step``: the fused gated delta recurrence of ``mlx::gated_delta_rule``
  (``custom_kernel_ops/gated_delta_rule.py``, from mlx-lm), which the ``mlx`` flavour uses
  for gated delta net layers (``mlxbuild.families.gated_delta``).
"""

from __future__ import annotations

import hashlib

import mlx.core as mx


def digest(source: str, header: str = "") -> str:
    return hashlib.sha256(f"{header}\0{source}".encode()).hexdigest()


def _tq_norm(inputs, template, shapes, dtypes):
    (x,) = inputs
    norms = mx.sqrt(mx.sum(mx.square(x.astype(mx.float32)), axis=-1, keepdims=True))
    return [norms.astype(dtypes[0]).reshape(shapes[0])]


def _tq4_compress(inputs, template, shapes, dtypes):
    values, boundaries = inputs
    # the kernel counts the boundaries each value is above, in fp32
    index = mx.sum(values.astype(mx.float32)[..., None] > boundaries.astype(mx.float32), axis=-1)
    index = index.astype(mx.uint8)
    packed = mx.left_shift(index[..., 0::2], mx.array(4, mx.uint8)) | index[..., 1::2]
    return [packed.astype(dtypes[0]).reshape(shapes[0])]


def _tq_dequant(inputs, template, shapes, dtypes):
    packed, norms, centroids = inputs
    high = mx.right_shift(packed, mx.array(4, mx.uint8)) & mx.array(0x0F, mx.uint8)
    low = packed & mx.array(0x0F, mx.uint8)
    index = mx.stack([high, low], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    out = mx.take(centroids, index.astype(mx.int32)) * norms
    return [out.astype(dtypes[0]).reshape(shapes[0])]


def _gated_delta_step(inputs, template, shapes, dtypes):
    # q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]; state [B, Hv, Dv, Dk]. Each
    # v head reads k head hv // (Hv / Hk); the state is carried in fp32, each step's output
    # and the final state cast to the declared dtype.
    q, k, v, g, beta, state = inputs[:6]
    hk, hv = int(template["Hk"]), int(template["Hv"])
    if hv != hk:
        q, k = mx.repeat(q, hv // hk, axis=2), mx.repeat(k, hv // hk, axis=2)
    s = state.astype(mx.float32)
    ys = []
    for t in range(q.shape[1]):
        s = s * g[:, t, :, None, None]
        remembered = mx.sum(s * k[:, t, :, None, :], axis=-1)
        delta = (v[:, t] - remembered) * beta[:, t, :, None]
        s = s + k[:, t, :, None, :] * delta[..., None]
        ys.append(mx.sum(s * q[:, t, :, None, :], axis=-1).astype(dtypes[0]))
    y = mx.stack(ys, axis=1) if ys else mx.zeros(shapes[0], dtype=dtypes[0])
    return [y.reshape(shapes[0]), s.astype(dtypes[1]).reshape(shapes[1])]


# (name, digest(source, header)) -> computation(inputs, template, output shapes, output dtypes)
KNOWN = {
    ("tq_norm", "30299e83d5b02bfc0a2afb7fb0c3e88c92c0d044d2c2fe369d6eca7fb8da3161"): _tq_norm,
    ("tq4_compress", "263b92bf71bd80b84dda6e608ee0127ca2f48315ae4c8a20097e69e409f3ceaf"): _tq4_compress,
    ("tq_dequant", "574a760608045d8f6dd116af694fd663b01dfc6295e4fec017c714887532ce2c"): _tq_dequant,
    ("gated_delta_step", "1d4bc39618726f3e567f8c8406d5d924dd14034d571f3ce501528a032a9bedac"): _gated_delta_step,
}


def known(name: str, source: str, header: str = ""):
    """The mlx computation of a recognised kernel, or None."""
    return KNOWN.get((name, digest(source, header)))
