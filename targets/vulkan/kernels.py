"""Unscheduled TIR kernels for the Vulkan (WebGPU) target, scheduled by dlight, with numpy equivalents.

The weights stay in the canonical packing of :mod:`qcompile.passes.formats` (no retiling): per bit plane
of width ``pb`` a uint32 array [N, K*pb/32], code ``k`` of a row at bit ``pb*k % 32`` of word
``pb*k // 32``; float16 scales and zeros [N, K/g].  Only 32-bit integer ops: WGSL has no 64-bit ints.

The same definition as the CUDA target's ``dequant_matmul`` (same arguments): to be merged into one
generic GPU kernel module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from qcompile.passes.formats import WeightFormat

__all__ = ["dequant_matmul", "im2col", "reference_matmul"]

OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps leaves the kernel alone (FuseTIR cannot merge its buffers)


def reference_matmul(x: np.ndarray, w_deq: np.ndarray) -> np.ndarray:
    """numpy equivalent of :func:`dequant_matmul`: ``x[M, K] @ w_deq[N, K].T`` in float32."""
    return x.astype(np.float32) @ w_deq.T


def dequant_matmul(fmt: WeightFormat, k: int, n: int, m: int | None = None):
    """Unscheduled TIR (from TE) ``y[M, N] = x[M, K] @ dequantize(W)[N, K].T`` for M = ``m``, or a
    symbolic M when ``m`` is None (a static M = 1 gets dlight's GEMV schedule, a symbolic one its matmul).

    Arguments: x (float32 [M, K]), planes (uint32 [N, K*pb/32] each; a 1-plane format passes its plane
    twice), scales, zeros (float16 [N, K/g]), y (float32 [M, N]).

    numpy: ``y = x @ fmt.dequantize(q).T`` where per group ``w = float32(code) * float32(s) + float32(z)``
    and ``code = sum_p ((plane_p[n, k*pb_p // 32] >> (k*pb_p % 32)) & (2**pb_p - 1)) << shift_p``.
    """
    from tvm import te, tirx  # noqa: PLC0415

    planes, g = tuple(fmt.planes), fmt.group_size
    if k % g or k % 32:
        raise ValueError(f"dequant_matmul: K={k} must divide by the group {g} and by 32")
    i64 = lambda v: tirx.const(v, "int64")  # noqa: E731  (one index type: dlight's layout maps require it)
    m = tirx.Var("m", "int64") if m is None else i64(m)
    x = te.placeholder((m, i64(k)), "float32", name="x")
    p0, p1 = planes[0], planes[-1]
    w0 = te.placeholder((i64(n), i64(k * p0 // 32)), "uint32", name="w0")
    w1 = te.placeholder((i64(n), i64(k * p1 // 32)), "uint32", name="w1")
    s = te.placeholder((i64(n), i64(k // g)), "float16", name="s")
    z = te.placeholder((i64(n), i64(k // g)), "float16", name="z")
    ws = (w0, w1)[: len(planes)]

    def code(nn, kk):
        expr, shift = None, 0
        for w, pb in zip(ws, planes):
            word = w[nn, kk * pb // 32]
            part = (word >> ((kk * pb) % 32).astype("uint32")) & tirx.const((1 << pb) - 1, "uint32")
            if shift:
                part = part << tirx.const(shift, "uint32")
            expr = part if expr is None else expr | part
            shift += pb
        return expr

    wd = te.compute((i64(n), i64(k)), lambda nn, kk: code(nn, kk).astype("float32") * s[nn, kk // g].astype("float32")
                    + z[nn, kk // g].astype("float32"), name="dequantize")
    r = te.reduce_axis((i64(0), i64(k)), name="k")
    y = te.compute((m, i64(n)), lambda i, j: te.sum(x[i, r] * wd[j, r], axis=r), name="matmul")
    return te.create_prim_func([x, w0, w1, s, z, y]).without_attr("global_symbol").with_attr("op_pattern", OPAQUE)


def im2col(c: int, h: int, w: int, ks, st, pads, dil):
    """Unscheduled TIR (from TE): NCHW image -> patch rows for a convolution as a matmul.

    numpy: ``cols[b*OH*OW + oh*OW + ow, ci*KH*KW + r*KW + s] = xpad[b, ci, oh*SH + r*DH, ow*SW + s*DW]``
    where ``xpad`` is x zero-padded by ``pads`` (top, left, bottom, right), so ``cols @ W.reshape(N, -1).T``
    is the convolution (the x86 kernel of the same name, without its CPU schedule).
    """
    from tvm import te, tirx  # noqa: PLC0415

    kh, kw = ks
    sh, sw = st
    ph, pw = pads[0], pads[1]
    dh, dw = dil
    oh = (h + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    b = tirx.Var("b", "int64")
    x = te.placeholder((b, c, h, w), "float32", name="x")

    def patch(row, col):
        bo, o = row // ow, row % ow
        ih = (bo % oh) * sh - ph + (col // kw % kh) * dh
        iw = o * sw - pw + (col % kw) * dw
        inside = tirx.all(ih >= 0, ih < h, iw >= 0, iw < w)
        return tirx.if_then_else(inside, x[bo // oh, col // (kh * kw), ih, iw], tirx.const(0, "float32"))

    cols = te.compute((b * oh * ow, c * kh * kw), patch, name="cols")
    return te.create_prim_func([x, cols]).without_attr("global_symbol")
