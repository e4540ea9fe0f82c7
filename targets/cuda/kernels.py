"""Dequantizing matmul kernels for GPUs (TIR), with their numpy equivalents.

The weights stay in the canonical packing of :mod:`qcompile.passes.formats` (no retiling): per bit plane
of width ``pb`` a uint32 array [N, K*pb/32], code ``k`` of a row at bit ``pb*k % 32`` of word
``pb*k // 32``; float16 scales and zeros [N, K/g].  A row's words are contiguous, so lanes of a warp
walking along K read consecutive 16-byte vectors.

Two kernels compute ``y[M, N] = x[M, K] @ dequantize(W)[N, K].T`` (float32 x and y):

- :func:`dequant_matmul` — the unscheduled definition (a dequantize block feeding a matmul block),
  target-generic: dlight (``s_tir.dlight.gpu``) schedules it for CUDA, WebGPU, ...;
- :func:`gemv` — a hand-scheduled CUDA kernel for small M (decode): each warp owns ``rows`` output
  channels, each lane a chunk of ``CT`` consecutive codes (one 16-byte load of the first plane) per step,
  the group's integer codes are accumulated against x and scaled once per group::

      y[m, n] = sum_g  s[n, g] * sum_{k in g} code[n, k] * x[m, k]  +  z[n, g] * sum_{k in g} x[m, k]

  codes become floats with the exponent trick ``float(c) = bits_as_float(0x4B000000 | c) - 2**23``
  (exact for c < 2**23: one LOP3 + one FADD instead of the slower I2F), and the warp's partial sums
  are added with shuffles.  Each row of x is its own block row (``blockIdx.y``): M > 1 re-reads the
  weights (from L2 when they fit), so this kernel is for batch 1-8.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm.script import tirx as T

if TYPE_CHECKING:
    from qcompile.passes.formats import WeightFormat

__all__ = ["dequant_matmul", "gemv", "gemv_config", "chunk_codes", "im2col", "reference_matmul", "GemvConfig"]

OPAQUE = 8  # relax OpPatternKind.kOpaque: our kernels are called as they are, never fused
WARP = 32


def reference_matmul(x: np.ndarray, w_deq: np.ndarray) -> np.ndarray:
    """numpy equivalent of both kernels: ``x[M, K] @ w_deq[N, K].T`` in float32."""
    return x.astype(np.float32) @ w_deq.T


def dequant_matmul(fmt: WeightFormat, k: int, n: int, rows: int | None = None):
    """Unscheduled TIR (from TE) ``y[M, N] = x[M, K] @ dequantize(W)[N, K].T``, M symbolic (or ``rows``).

    Arguments: x (float32 [M, K]), planes (uint32 [N, K*pb/32] each; a 1-plane format passes its plane
    twice), scales, zeros (float16 [N, K/g]), y (float32 [M, N]).  numpy: ``x @ fmt.dequantize(q).T``.
    """
    from tvm import te, tirx  # noqa: PLC0415

    planes, g = fmt.planes, fmt.group_size
    if k % g:
        raise ValueError(f"dequant_matmul: K={k} must divide by group {g}")
    m = tirx.Var("m", "int64") if rows is None else rows
    x = te.placeholder((m, k), "float32", name="x")
    p0 = planes[0]
    p1 = planes[1] if len(planes) > 1 else planes[0]
    w0 = te.placeholder((n, k * p0 // 32), "uint32", name="w0")
    w1 = te.placeholder((n, k * p1 // 32), "uint32", name="w1")
    s = te.placeholder((n, k // g), "float16", name="s")
    z = te.placeholder((n, k // g), "float16", name="z")
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

    wd = te.compute((n, k), lambda nn, kk: code(nn, kk).astype("float32") * s[nn, kk // g].astype("float32")
                    + z[nn, kk // g].astype("float32"), name="dequantize")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r] * wd[j, r], axis=r), name="matmul")
    return te.create_prim_func([x, w0, w1, s, z, y]).without_attr("global_symbol")


class GemvConfig:
    """Launch shape of :func:`gemv`: ``rows`` output channels per warp, ``warps`` per block."""

    def __init__(self, rows: int = 4, warps: int = 4):
        self.rows, self.warps = rows, warps

    def __repr__(self) -> str:
        return f"GemvConfig(rows={self.rows}, warps={self.warps})"


def gemv_config(n: int) -> GemvConfig:
    """Rows per warp: 4 (x reused from registers 4 times) unless that leaves under ~2 blocks per SM."""
    return GemvConfig(rows=4 if n >= 4096 else 2 if n >= 1024 else 1, warps=4)


def chunk_codes(planes: tuple[int, ...], k: int) -> int:
    """Codes per lane and step: one 16-byte load of the first plane, halved until it divides K."""
    ct = 128 // planes[0]
    while k % ct:
        ct //= 2
    if ct * min(planes) % 32:
        raise ValueError(f"gemv: K={k} is not a multiple of 32 codes")
    return ct


def gemv(fmt: WeightFormat, k: int, n: int, config: GemvConfig | None = None):
    """Scheduled CUDA TIR ``y[M, N] = x[M, K] @ dequantize(W)[N, K].T`` for small (symbolic) M.

    Same arguments and numpy equivalent as :func:`dequant_matmul`; see the module docstring.
    """
    cfg = config or gemv_config(n)
    planes, g = tuple(fmt.planes), fmt.group_size
    if k % g:
        raise ValueError(f"gemv: K={k} must divide by group {g}")
    ct = chunk_codes(planes, k)
    rows, warps = cfg.rows, cfg.warps
    p0 = planes[0]
    p1 = planes[1] if len(planes) > 1 else planes[0]
    two = len(planes) > 1
    v0, v1 = ct * p0 // 32, ct * p1 // 32  # words of each plane per lane and step
    chunks = k // ct
    steps = (chunks + WARP - 1) // WARP
    sub = max(1, ct // g)  # groups a chunk spans
    cs = min(ct, g)  # codes per group within a chunk
    xv4 = ct // 4
    per_block = rows * warps
    blocks = (n + per_block - 1) // per_block
    kg = k // g

    def code(a0, a1, r, i):
        """Code ``i`` of lane chunk row ``r`` as uint32 (low bits from plane 0, high bits from plane 1)."""
        c = T.bitwise_and(T.shift_right(a0[r, (i * p0) // 32], T.uint32((i * p0) % 32)), T.uint32((1 << p0) - 1))
        if two:
            hi = T.bitwise_and(T.shift_right(a1[r, (i * p1) // 32], T.uint32((i * p1) % 32)),
                               T.uint32((1 << p1) - 1))
            c = T.bitwise_or(c, T.shift_left(hi, T.uint32(p0)))
        return c

    def as_float(c):
        """float32(c) for 0 <= c < 2**23: c in the mantissa of 2**23, minus 2**23 (exact)."""
        return T.reinterpret("float32", T.bitwise_or(c, T.uint32(0x4B000000))) - T.float32(8388608.0)

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, w0_h: T.handle, w1_h: T.handle, s_h: T.handle, z_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        w0 = T.match_buffer(w0_h, (n, k * p0 // 32), "uint32")
        w1 = T.match_buffer(w1_h, (n, k * p1 // 32), "uint32")
        s = T.match_buffer(s_h, (n, kg), "float16")
        z = T.match_buffer(z_h, (n, kg), "float16")
        y = T.match_buffer(y_h, (m, n), "float32")
        for mb in T.thread_binding(m, thread="blockIdx.y"):
            for nb in T.thread_binding(blocks, thread="blockIdx.x"):
                for wy in T.thread_binding(warps, thread="threadIdx.y"):
                    for tx in T.thread_binding(WARP, thread="threadIdx.x"):
                        acc = T.alloc_buffer((rows,), "float32", scope="local")
                        xv = T.alloc_buffer((ct,), "float32", scope="local")
                        xs = T.alloc_buffer((sub,), "float32", scope="local")
                        a0 = T.alloc_buffer((rows, v0), "uint32", scope="local")
                        a1 = T.alloc_buffer((rows, v1), "uint32", scope="local")
                        part = T.alloc_buffer((1,), "float32", scope="local")
                        for r in T.unroll(rows):
                            acc[r] = T.float32(0)
                        for st in range(steps):
                            if st * WARP + tx < chunks:
                                for i0 in T.unroll(xv4):
                                    for i1 in T.vectorized(4):
                                        xv[i0 * 4 + i1] = x[mb, (st * WARP + tx) * ct + i0 * 4 + i1]
                                for r in T.unroll(rows):
                                    if (nb * warps + wy) * rows + r < n:
                                        for j in T.vectorized(v0):
                                            a0[r, j] = w0[(nb * warps + wy) * rows + r, (st * WARP + tx) * v0 + j]
                                        if two:
                                            for j in T.vectorized(v1):
                                                a1[r, j] = w1[(nb * warps + wy) * rows + r, (st * WARP + tx) * v1 + j]
                                for sg in T.unroll(sub):
                                    xs[sg] = T.float32(0)
                                    for i in T.unroll(cs):
                                        xs[sg] = xs[sg] + xv[sg * cs + i]
                                for r in T.unroll(rows):
                                    if (nb * warps + wy) * rows + r < n:
                                        for sg in T.unroll(sub):
                                            part[0] = T.float32(0)
                                            for i in T.unroll(cs):
                                                part[0] = part[0] + as_float(code(a0, a1, r, sg * cs + i)) * xv[sg * cs + i]
                                            acc[r] = acc[r] + T.Cast(
                                                "float32", s[(nb * warps + wy) * rows + r, ((st * WARP + tx) * ct + sg * cs) // g]
                                            ) * part[0] + T.Cast(
                                                "float32", z[(nb * warps + wy) * rows + r, ((st * WARP + tx) * ct + sg * cs) // g]
                                            ) * xs[sg]
                        for r in T.unroll(rows):
                            for off in T.unroll(5):
                                acc[r] = acc[r] + T.tvm_warp_shuffle_down(
                                    T.uint32(0xFFFFFFFF), acc[r], T.shift_right(16, off), WARP, WARP)
                            if tx == 0 and (nb * warps + wy) * rows + r < n:
                                y[mb, (nb * warps + wy) * rows + r] = acc[r]

    return kernel


def im2col(c: int, h: int, w: int, ks, st, pads, dil):
    """Unscheduled TIR (from TE), scheduled by dlight: NCHW image -> patch rows (a convolution as a matmul).

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
