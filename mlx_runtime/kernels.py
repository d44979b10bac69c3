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


# (name, digest(source, header)) -> computation(inputs, template, output shapes, output dtypes)
KNOWN = {
    ("tq_norm", "30299e83d5b02bfc0a2afb7fb0c3e88c92c0d044d2c2fe369d6eca7fb8da3161"): _tq_norm,
    ("tq4_compress", "263b92bf71bd80b84dda6e608ee0127ca2f48315ae4c8a20097e69e409f3ceaf"): _tq4_compress,
    ("tq_dequant", "574a760608045d8f6dd116af694fd663b01dfc6295e4fec017c714887532ce2c"): _tq_dequant,
}


def known(name: str, source: str, header: str = ""):
    """The mlx computation of a recognised kernel, or None."""
    return KNOWN.get((name, digest(source, header)))
