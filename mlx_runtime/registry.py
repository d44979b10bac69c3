"""Node type → implementation, for the MLX payload interpreter.

A handler is ``fn(frame, node) -> None``: it reads its inputs from the frame,
builds lazy ``mlx.core`` arrays, and writes its outputs back to the frame. It
never calls ``mx.eval``: the interpreter evaluates once per call, so the whole
delegate call is one mlx graph.

``node`` is the flatc object-API instance of the node table (e.g. ``AddNodeT``
with ``.a``, ``.b``, ``.out``); the Frame contract handlers rely on:

- ``frame.t(tid) -> mx.array`` / ``frame.set_t(tid, array)``: tensor slots (``TidT``)
- ``frame.v(vid)`` / ``frame.set_v(vid, value)``: int/float/bool value slots (``VidT``)
- ``frame.int_(x)`` for ``IntOrVidT``, ``frame.float_(x)`` for ``FloatOrVidT``,
  ``frame.vid_or_tid(x)`` for ``VidOrTidT`` (array or scalar),
  ``frame.int_vid_tid(x)`` for ``IntOrVidOrTidT``
- ``frame.dtype(scalar_type: int) -> mx.Dtype``: ExecuTorch ScalarType codes
- ``frame.run_chain(index)``: run another instruction chain (If, Scan)
- ``frame.graph``: the ``MLXGraphT``

A node that cannot run on this host raises ``NodeUnsupported`` naming the node
and the reason (e.g. a Metal kernel on Linux).
"""

from __future__ import annotations

from typing import Callable

HANDLERS: dict[str, Callable] = {}


class NodeUnsupported(RuntimeError):
    pass


def handles(*names: str):
    def register(fn):
        for name in names:
            if name in HANDLERS:
                raise RuntimeError(f"{name} has two handlers: {HANDLERS[name].__module__} and {fn.__module__}")
            HANDLERS[name] = fn
        return fn

    return register
